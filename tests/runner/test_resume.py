"""Resume continues the same trajectory: a run interrupted after epoch 2 of 3 and resumed with
`--resume latest` (or a path) ends bit-identical on CPU to an uninterrupted run: weights, results and the
per-epoch losses. Resume is explicit: an existing run is never continued or overwritten silently."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from fastprompt.runner import resolve_config, train_run
from runner_support import FAST, read_json

ARGS = ["--method", "maple", "--dataset", "procedural", "dataset.num_test_per_class=2", "dataset.num_val_per_class=1",
        "--shots", "2", "--seeds", "1,2", *FAST, "epochs=3", "batch_size=4"]


class Interrupt(Exception):
    pass


def overrides(args):
    """The CLI arguments above as resolve_config overrides (flags to keys)."""
    result, items = {}, list(args)
    while items:
        item = items.pop(0)
        if item.startswith("--"):
            result[item[2:]] = items.pop(0)
        else:
            key, _, value = item.partition("=")
            result[key] = value
    return result


def interrupted_run(out, seed, epoch, data_on_device=False):
    values = {**overrides(ARGS), "output_dir": str(out), "data_on_device": str(data_on_device)}

    def stop(s, e):
        if (s, e) == (seed, epoch):
            raise Interrupt(f"stopped after seed {s} epoch {e}")

    with pytest.raises(Interrupt):
        train_run(resolve_config(overrides=values), printer=lambda line: None, on_epoch_end=stop)


def weights(run, seed):
    return load_file(os.path.join(run, f"seed{seed}", "checkpoint.safetensors"))


@pytest.mark.parametrize("data_on_device", [False, True])
def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path, cli, data_on_device):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    extra = [f"data_on_device={str(data_on_device).lower()}"]
    code, _, err = cli("train", *ARGS, *extra, f"output_dir={full}")
    assert code == 0, err

    interrupted_run(resumed, seed=2, epoch=2, data_on_device=data_on_device)
    manifest = read_json(resumed / "run.json")
    assert manifest["status"] == "failed" and "stopped after seed 2 epoch 2" in manifest["error"]
    assert not (resumed / "summary.json").exists() and not (resumed / "seed2" / "results.json").exists()
    assert read_json(resumed / "seed2" / "state" / "state.json")["epoch"] == 2

    code, out, err = cli("train", *ARGS, *extra, f"output_dir={resumed}", "--resume", "latest")
    assert code == 0, err
    assert "seed 1: complete already, results reused" in out and "seed 2: resuming after epoch 2" in out
    assert read_json(resumed / "run.json")["status"] == "complete"
    for seed in (1, 2):
        a, b = weights(full, seed), weights(resumed, seed)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (seed, key)
        ra, rb = read_json(full / f"seed{seed}" / "results.json"), read_json(resumed / f"seed{seed}" / "results.json")
        assert [h["loss"] for h in ra["history"]] == [h["loss"] for h in rb["history"]]
        assert ra["targets"] == rb["targets"]
    assert read_json(full / "summary.json")["b2n"] == read_json(resumed / "summary.json")["b2n"]


def test_resume_by_path_uses_the_stored_config(tmp_path, cli):
    run = tmp_path / "run"
    interrupted_run(run, seed=1, epoch=1)
    code, out, err = cli("train", "--resume", run / "seed1" / "state")
    assert code == 0, err
    assert "seed 1: resuming after epoch 1" in out
    assert read_json(run / "run.json")["status"] == "complete"


def test_resume_latest_with_only_the_folder_resumes_the_run_in_it(tmp_path, cli):
    run = tmp_path / "run"
    interrupted_run(run, seed=1, epoch=1)
    code, out, err = cli("train", "--resume", "latest", f"output_dir={run}", "num_workers=0")
    assert code == 0, err
    assert "seed 1: resuming after epoch 1" in out
    assert read_json(run / "run.json")["status"] == "complete"


def test_resume_refuses_a_changed_config_and_a_missing_run(tmp_path, cli):
    run = tmp_path / "run"
    interrupted_run(run, seed=1, epoch=1)
    code, _, err = cli("train", *ARGS, f"output_dir={run}", "lr=0.1", "--resume", "latest")
    assert code == 2 and "cannot resume" in err and "lr: 0.0035 -> 0.1" in err
    assert err.rstrip().endswith(f"To continue it as it started: fastprompt train --resume {run}")
    code, _, err = cli("train", "--resume", run, "epochs=5")
    assert code == 2 and "epochs: 3 -> 5" in err
    code, _, err = cli("train", "--resume", run, f"output_dir={tmp_path / 'elsewhere'}")
    assert code == 2 and "conflicting output folders" in err
    code, _, err = cli("train", *ARGS, f"output_dir={tmp_path / 'never'}", "--resume", "latest")
    assert code == 2 and "there is no run to resume" in err
    code, _, err = cli("train", "--resume", tmp_path / "never")
    assert code == 2 and "nothing to resume" in err


def test_an_existing_run_is_never_continued_or_overwritten_without_resume(tmp_path, cli):
    run = tmp_path / "run"
    interrupted_run(run, seed=1, epoch=1)
    before = json.dumps(read_json(run / "run.json"))
    code, _, err = cli("train", *ARGS, f"output_dir={run}")
    assert code == 2 and "already holds a run (status 'failed'). Pass --resume latest" in err
    code, _, err = cli("eval", "--run", run)
    assert code == 2 and "has no checkpoint (the seed did not finish training); eval never trains" in err
    assert json.dumps(read_json(run / "run.json")) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, _, err = cli("train", *ARGS, f"output_dir={other}")
    assert code == 2 and "is not empty and holds no fastprompt run" in err
    assert os.listdir(other) == ["notes.txt"]


def test_resume_refuses_data_that_changed_since_the_run_started(tmp_path, cli, data_root):
    run = tmp_path / "run"
    values = {"method": "coop", "dataset": "eurosat", "root": str(data_root), "shots": "2", "seeds": "1",
              "backbone": "tiny", "pretrained": "none", "device": "cpu", "num_workers": "0", "precision": "fp32",
              "epochs": "2", "batch_size": "2", "n_ctx": "4", "output_dir": str(run)}

    def stop(seed, epoch):
        raise Interrupt

    with pytest.raises(Interrupt):
        train_run(resolve_config(overrides=values), printer=lambda line: None, on_epoch_end=stop)
    split_file = data_root / "eurosat" / "split_zhou_EuroSAT.json"
    split = json.loads(split_file.read_text())
    split["test"] = split["test"][:-1]  # one test image fewer: the evaluation would not be the same
    split_file.write_text(json.dumps(split))
    code, _, err = cli("train", "--resume", run)
    assert code == 2 and "the data changed since the run started" in err
