"""`fastprompt eval RUN`: the run folder as a positional argument, beside `--run RUN`.

Why it exists: `torchrun ... -m fastprompt eval --run runs/x` never reaches fastprompt, because torchrun's own
argparse reads `--run` as an abbreviation of its `--run-path`; a positional run folder passes through it intact.
"""

import pytest

import fastprompt.runner.run as run_module
from fastprompt.cli import build_parser, main
from runner_support import FAST, PROCEDURAL

LAUNCH = ["--standalone", "--nproc-per-node", "2", "-m", "fastprompt"]


# --- (a) torchrun's parser -----------------------------------------------------------------------------
def test_torchrun_passes_the_positional_form_intact():
    from torch.distributed.run import get_args_parser

    launch = get_args_parser().parse_args([*LAUNCH, "eval", "runs/x"])
    assert launch.module and launch.training_script == "fastprompt"
    assert launch.training_script_args == ["eval", "runs/x"]
    assert not launch.run_path
    args, extra = build_parser().parse_known_args(launch.training_script_args)
    assert (args.command, args.run_folder, args.run, extra) == ("eval", "runs/x", None, [])


def test_torchrun_takes_dash_dash_run_for_its_own_option():
    """The reason for the positional form: torchrun refuses `--run` as ambiguous (torch 2.13: --run-path and
    --run_path) or, with one spelling, takes it as --run-path; either way `--run runs/x` does not reach us."""
    from torch.distributed.run import get_args_parser

    try:
        launch = get_args_parser().parse_args([*LAUNCH, "eval", "--run", "runs/x"])
    except SystemExit:
        return  # refused: the command never starts
    assert launch.training_script_args != ["eval", "--run", "runs/x"] or launch.run_path


# --- (b) both forms give fastprompt the same evaluation ------------------------------------------------
class _Stop(Exception):
    """Raised in place of the evaluation, once its arguments are recorded."""


@pytest.fixture
def recorded(monkeypatch):
    """The arguments each `eval` hands the evaluation (which then stops with _Stop), in a list."""
    calls = []

    def record(*args):
        calls.append(args)
        raise _Stop

    monkeypatch.setattr(run_module, "checkpoints_of_run", lambda run: [f"{run}/seed1"])
    monkeypatch.setattr(run_module, "evaluate_checkpoints", record)
    return calls


@pytest.mark.parametrize("words", [
    ["eval", "runs/x", "device=cpu"],
    ["eval", "device=cpu", "runs/x"],
    ["eval", "--dataset", "procedural", "runs/x", "device=cpu"],
    ["eval", "device=cpu", "--dataset", "procedural", "runs/x"],
])
def test_positional_and_dash_dash_run_evaluate_alike(words, recorded):
    """What the evaluation is handed (checkpoint folders, overrides, dataset, subset, mode) is the same for
    `eval RUN ...`, the run anywhere among the words, as for `eval --run RUN ...`."""
    calls = recorded
    dataset = ["--dataset", "procedural"] if "--dataset" in words else []
    for command in (words, ["eval", "--run", "runs/x", *dataset, "device=cpu"]):
        with pytest.raises(_Stop):
            main(command)
    assert len(calls) == 2 and calls[0] == calls[1], calls
    assert calls[0] == (["runs/x/seed1"], {"device": "cpu"}, "procedural" if dataset else None, "all", None)


def test_positional_run_evaluates_a_real_run(tmp_path, cli):
    run = tmp_path / "run"
    code, _, err = cli("train", "--method", "coop", *PROCEDURAL, "--shots", "1", "--seeds", "1", *FAST, "epochs=0",
                       f"output_dir={run}")
    assert code == 0, err
    tables = []
    for form in ([run], ["--run", run]):
        code, out, err = cli("eval", *form, "device=cpu", "num_workers=0")
        assert code == 0, err
        tables.append(out[out.index("| "):])  # the run's table (the log lines before it carry timings)
    assert "| coop" in tables[0] and tables[0] == tables[1]


# --- (c) a run folder given twice, or with --checkpoint --------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["runs/x", "--run", "runs/y"], "two run folders, runs/x and --run runs/y"),
    (["--run", "runs/y", "runs/x"], "two run folders, runs/x and --run runs/y"),
    (["runs/x", "--checkpoint", "ckpt"], "give a run folder (runs/x) or --checkpoint PATH, not both"),
    (["runs/x", "runs/y"], "eval takes one run folder, got 2: runs/x runs/y"),
    ([], "give exactly one of --run DIR (or DIR alone) or --checkpoint PATH"),
])
def test_run_folder_given_twice_is_one_error_line(tmp_path, cli, args, message):
    code, out, err = cli("eval", *args, "device=cpu")
    assert code == 2, (out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastprompt: error: ") and message in lines[0], err


# --- (d) --root, as train takes it ---------------------------------------------------------------------------
@pytest.mark.parametrize("target", [["runs/x"], ["--checkpoint", "ckpt", "--dataset", "imagefolder"]])
def test_dash_dash_root_is_the_root_override(target, recorded):
    """`eval ... --root DIR` is `root=DIR` (train's flag; it used to be read as a second run folder)."""
    calls = recorded
    for words in (["--root", "/data"], ["root=/data"]):
        with pytest.raises(_Stop):
            main(["eval", *target, *words, "device=cpu"])
    assert len(calls) == 2 and calls[0] == calls[1], calls
    assert calls[0][1] == {"device": "cpu", "root": "/data"}


def test_dash_dash_root_against_a_different_root_value_is_one_error_line(cli):
    code, out, err = cli("eval", "runs/x", "--root", "/data", "root=/other", "device=cpu")
    assert code == 2 and err.strip() == "fastprompt: error: conflicting values for root: --root /data and root=/other"
