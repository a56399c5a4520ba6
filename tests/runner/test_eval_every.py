"""eval_every=N: the targets are scored during training (the novel accuracy per epoch users ask for), and the run
trains exactly as without it: the reference is the same run with eval_every=0."""

import pytest
from runner_support import FAST, PROCEDURAL, read_json
from safetensors.torch import load_file

ARGS = ["--shots", "2", "--seeds", "1", *FAST, *PROCEDURAL, "epochs=3", "batch_size=4"]


@pytest.mark.parametrize("method", ["coop", "maple"])
def test_evaluating_during_training_changes_nothing_it_trains(tmp_path, cli, method):
    plain, watched = tmp_path / "plain", tmp_path / "watched"
    code, _, err = cli("train", "--method", method, *ARGS, f"output_dir={plain}")
    assert code == 0, err
    code, out, err = cli("train", "--method", method, *ARGS, "eval_every=1", f"output_dir={watched}")
    assert code == 0, err

    for name, tensor in load_file(str(plain / "seed1" / "checkpoint.safetensors")).items():
        assert (load_file(str(watched / "seed1" / "checkpoint.safetensors"))[name] == tensor).all(), name
    reference, results = read_json(plain / "seed1" / "results.json"), read_json(watched / "seed1" / "results.json")
    assert [t["accuracy"] for t in results["targets"]] == [t["accuracy"] for t in reference["targets"]]
    assert [h["loss"] for h in results["history"]] == [h["loss"] for h in reference["history"]]

    # Epochs 1 and 2 carry base and novel scores; the last epoch's are the final results, not repeated.
    history = results["history"]
    assert [[(t["subset"], t["mode"]) for t in h.get("targets", [])] for h in history] == [
        [("base", "base"), ("novel", "novel")]] * 2 + [[]]
    assert all(0.0 <= t["accuracy"] <= 100.0 for h in history[:2] for t in h["targets"])
    assert "seed 1 epoch 1: evaluating the targets (eval_every=1)" in out
    assert "seed 1 epoch 3: evaluating" not in out


def test_eval_every_is_checked_and_may_change_on_resume(tmp_path, cli):
    code, _, err = cli("train", "--method", "coop", *ARGS, "eval_every=-1", f"output_dir={tmp_path / 'bad'}")
    assert code == 2 and "eval_every" in err
    run = tmp_path / "run"
    code, _, err = cli("train", "--method", "coop", *ARGS, f"output_dir={run}")
    assert code == 0, err
    state = read_json(run / "run.json")
    state["status"] = "interrupted"  # a resume after the fact: only the evaluation's schedule differs
    (run / "run.json").write_text(__import__("json").dumps(state))
    code, _, err = cli("train", "--resume", run, "eval_every=1")
    assert code == 0, err
