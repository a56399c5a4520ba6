"""Bad input through the CLI: each case exits with status 2 and one line naming the problem, and leaves no
run folder behind (or, for a failure during evaluation, a run marked failed with no results or summary)."""

import os

import pytest

from runner_support import FAST, PROCEDURAL, read_json

EUROSAT = ["--method", "coop", "--dataset", "eurosat", "--seeds", "1", *FAST, "epochs=2", "n_ctx=4"]


def without(key):
    return [a for a in FAST if not a.startswith(f"{key}=")]


def fails(cli, out, *args, match):
    for key, default in (("shots", "2"), ("batch_size", "2")):
        if not any(str(a).startswith((f"{key}=", f"--{key}")) for a in args):
            args = (*args, f"{key}={default}")
    code, stdout, err = cli("train", *args, f"output_dir={out}")
    assert code == 2, (stdout, err)
    assert err.startswith("fastprompt: error: ") and match in err, err
    assert err.count("\n") == 1, f"one line, not {err.count(chr(10))}: {err}"
    assert not os.path.exists(out), "a failed start must leave no run folder"
    return err


def test_missing_dataset_root(tmp_path, cli):
    fails(cli, tmp_path / "run", *EUROSAT, "--root", tmp_path / "nowhere", match="dataset root")
    fails(cli, tmp_path / "run", *EUROSAT, match="dataset 'eurosat' needs --root (root=)")
    (tmp_path / "empty").mkdir()
    err = fails(cli, tmp_path / "run", *EUROSAT, "--root", tmp_path / "empty", match="EuroSAT dataset folder not found")
    assert "run `fastprompt prepare eurosat --root <root>`" in err  # where the expected tree is shown


def test_split_file_naming_absent_files(tmp_path, cli, data_root):
    os.remove(data_root / "eurosat" / "2750" / "Forest" / "Forest_4.jpg")
    err = fails(cli, tmp_path / "run", *EUROSAT, "--root", data_root, match="names 1 files that do not exist")
    assert "Forest/Forest_4.jpg" in err


@pytest.mark.parametrize("on_device", ["false", "true"])
def test_corrupt_training_image_stops_before_the_run_starts(tmp_path, cli, data_root, on_device):
    bad = data_root / "eurosat" / "2750" / "Forest" / "Forest_1.jpg"  # a base class
    bad.write_bytes(b"this is not a jpeg")
    # 3 shots = every training image, so the corrupt one is in the sample; held on the device or not, it is found
    # before the run folder exists.
    err = fails(cli, tmp_path / "run", *EUROSAT, "--root", data_root, "shots=3", f"data_on_device={on_device}",
                match="cannot decode image")
    assert str(bad) in err


def test_corrupt_test_image_stops_before_the_run_starts(tmp_path, cli, data_root):
    # A novel-class test image: read only by the evaluation after training, yet checked before the run starts.
    bad = data_root / "eurosat" / "2750" / "SeaLake" / "SeaLake_5.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    err = fails(cli, tmp_path / "run", *EUROSAT, "--root", data_root, match="cannot decode image")
    assert str(bad) in err


def test_unknown_keys_and_values(tmp_path, cli):
    fails(cli, tmp_path / "run", "--method", "coop", *PROCEDURAL, *FAST, "epoch=3", match="did you mean 'epochs'")
    fails(cli, tmp_path / "run", "--method", "coop", *PROCEDURAL, *FAST, "dataset.num_tests=3",
          match="dataset 'procedural' has no option 'num_tests'; did you mean 'dataset.num_test_per_class'?")
    fails(cli, tmp_path / "run", "--method", "coop", *PROCEDURAL, *without("precision"), "precision=fp8",
          match="precision must be one of auto, fp32, bf16, fp16-parity")
    fails(cli, tmp_path / "run", "--method", "coop", *PROCEDURAL, *without("backbone"), "backbone=ViT-B-61",
          match="unknown backbone 'ViT-B-61'; did you mean ViT-B-16")
    fails(cli, tmp_path / "run", "--method", "coop", *PROCEDURAL, *without("pretrained"),
          f"pretrained={tmp_path / 'w.pt'}", match="w.pt' not found")
    fails(cli, tmp_path / "run", "--method", "coop", *PROCEDURAL, *without("pretrained"), "pretrained=openai",
          match="backbone 'tiny' has no published weights, so pretrained='openai' must be a weights file of it (use"
                " pretrained=none for random weights)")
    fails(cli, tmp_path / "run", "--method", "coop", *PROCEDURAL, *FAST, "device=cuda:7", "device=tpu",
          match="given twice")


def test_eval_never_trains(tmp_path, cli):
    code, _, err = cli("eval", "--checkpoint", tmp_path / "missing")
    assert code == 2 and "checkpoint not found" in err
    code, _, err = cli("eval", "--run", tmp_path)
    assert code == 2 and "is not a run folder" in err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("damage", ["tensors", "manifest"])
def test_eval_of_a_damaged_checkpoint(tmp_path, cli, damage):
    out = tmp_path / "run"
    code, _, err = cli("train", "--method", "coop", *PROCEDURAL, "--shots", "1", "--seeds", "1", *FAST, "epochs=0",
                       f"output_dir={out}")
    assert code == 0, err
    name = "checkpoint.safetensors" if damage == "tensors" else "checkpoint.json"
    path = out / "seed1" / name
    path.write_bytes(path.read_bytes()[:40])
    code, _, err = cli("eval", "--run", out)
    assert code == 2
    assert ("does not match its manifest" if damage == "tensors" else "is not valid JSON") in err


# --- issue 10: every bad input is one line, exit 2, no folder ----------------------------------------------
def one_line_error(cli, *args, match, folder=None):
    """Runs the CLI and checks the failure: exit 2, stderr exactly one line `fastprompt: error: ...` holding
    `match`, and no `folder` left behind."""
    code, stdout, err = cli(*args)
    assert code == 2, (stdout, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastprompt: error: "), err
    assert match in lines[0], lines[0]
    if folder is not None:
        assert not os.path.exists(folder), "a failed start must leave no folder"
    return lines[0]


COOP = ["--method", "coop", *PROCEDURAL, "--shots", "1", "--seeds", "1", *FAST, "batch_size=2"]


@pytest.mark.parametrize("values, message", [
    (["lr=nan"], "lr must be a finite number, got nan"),
    (["lr=inf"], "lr must be a finite number, got inf"),
    (["lr=0"], "lr must be > 0, got 0.0"),
    (["warmup_lr=nan"], "warmup_lr must be a finite number, got nan"),
    (["warmup_lr=-1e-5"], "warmup_lr must be >= 0, got -1e-05"),
    (["weight_decay=-1"], "weight_decay must be >= 0, got -1.0"),
    (["momentum=1"], "momentum must be >= 0 and < 1, got 1.0"),
    (["momentum=-0.5"], "momentum must be >= 0 and < 1, got -0.5"),
    (["epochs=-1"], "epochs must be >= 0, got -1"),
    (["batch_size=0"], "batch_size must be >= 1, got 0"),
    (["eval_batch_size=0"], "eval_batch_size must be >= 1, got 0"),
    (["save_every=0"], "save_every must be >= 1, got 0"),
    (["crop_scale=nan,1"], "crop_scale must be a finite number, got nan"),
    (["device_cache_side=0", "data_on_device=true"], "device_cache_side must be >= 1, got 0"),
    # a method option the preset's ctx_init makes CoOp ignore is still checked, not recorded as used
    (["n_ctx=-2"], "n_ctx must be >= 1, got -2"),
    (["n_ctx=0", "ctx_init=none"], "n_ctx must be >= 1, got 0"),
])
def test_numeric_keys_are_finite_and_in_range(tmp_path, cli, values, message):
    out = tmp_path / "run"
    given = {v.split("=")[0] for v in values}
    base = [a for a in [*COOP, "epochs=2"] if a.split("=")[0] not in given]
    one_line_error(cli, "train", *base, *values, f"output_dir={out}", match=message, folder=out)


def test_num_workers_and_method_option_ranges(tmp_path, cli):
    out = tmp_path / "run"
    args = [a for a in COOP if a != "num_workers=0"]
    one_line_error(cli, "train", *args, "num_workers=-2", f"output_dir={out}",
                   match="num_workers must be >= -1, got -2", folder=out)
    promptsrc = ["--method", "promptsrc", *COOP[2:], f"output_dir={out}"]
    one_line_error(cli, "train", *promptsrc, "gpa_std=0", match="gpa_std must be > 0, got 0.0", folder=out)
    one_line_error(cli, "train", *promptsrc, "kl_weight=nan", match="kl_weight must be a finite number, got nan",
                   folder=out)


def test_config_file_values_get_the_same_checks(tmp_path, cli):
    config = tmp_path / "config.json"
    config.write_text('{"lr": NaN, "epochs": 2}')  # Python's json reads NaN; it must not reach training
    out = tmp_path / "run"
    one_line_error(cli, "train", *COOP, "--config", config, f"output_dir={out}", match="lr must be a finite number",
                   folder=out)


def test_ctx_init_and_n_ctx_are_reconciled_and_said(tmp_path, cli):
    # CoOp's b2n preset sets ctx_init (4 tokens), which fixes the context length: a user n_ctx=8 used to be
    # recorded while the model had 4 tokens. The user's value wins, the preset's ctx_init is dropped, one note.
    out = tmp_path / "run"
    code, stdout, err = cli("train", *COOP, "epochs=0", "n_ctx=8", f"output_dir={out}")
    assert code == 0, err
    note = ("note: n_ctx=8 replaces the preset's ctx_init='a photo of a' (which fixes the context at its 4 tokens):"
            " the context is 8 randomly initialised tokens")
    assert note in stdout
    manifest = read_json(out / "run.json")
    assert manifest["config"]["options"] == {"n_ctx": 8, "ctx_init": None}
    assert manifest["preset"]["notes"] == [note[len("note: "):]]
    from fastprompt.runner.checkpoint import load_checkpoint

    _, tensors = load_checkpoint(str(out / "seed1"))
    (context,) = [t for name, t in tensors.items() if "text" in name]
    assert context.shape[0] == 8  # the recorded n_ctx is the one the model has
    # Both given and contradicting: an error naming both; MaPLe cannot initialise 8 tokens from 4 words.
    other = tmp_path / "other"
    one_line_error(cli, "train", *COOP, "n_ctx=8", "ctx_init=a photo", f"output_dir={other}",
                   match="n_ctx=8 and ctx_init='a photo' conflict", folder=other)
    one_line_error(cli, "train", "--method", "maple", *COOP[2:], "n_ctx=8", f"output_dir={other}",
                   match="n_ctx=8 but ctx_init='a photo of a' has 4 tokens", folder=other)


def test_ctx_init_given_by_the_user_replaces_the_presets_n_ctx(cli, capsys):
    code, stdout, err = cli("train", *COOP, "--protocol", "fewshot", "ctx_init=a photo of a", "--dry-run")
    assert code == 0, err
    assert "# note: ctx_init='a photo of a' sets the context length to its 4 tokens; the preset's n_ctx=16" in stdout
    assert "\nn_ctx = 4\n" in stdout


def test_a_run_whose_every_step_was_skipped_fails(tmp_path, cli, monkeypatch):
    import fastprompt.runner.engine as engine
    from fastprompt.training import TrainStep, prompted_loss

    class NaNStep(TrainStep):  # every loss non-finite, as lr=nan made it before lr was checked
        def __init__(self, *args, **kwargs):
            super().__init__(*args, loss_fn=lambda *a: prompted_loss(*a) * float("nan"), **kwargs)

    monkeypatch.setattr(engine, "TrainStep", NaNStep)
    out = tmp_path / "run"
    # b2n trains on the 4 base classes: 4 images in batches of 2 = 2 steps an epoch, fewer than max_bad_steps, so
    # no epoch trips the in-a-row guard; 2 epochs = 4 skipped steps.
    line = one_line_error(cli, "train", *COOP, "epochs=2", "warmup_epochs=0", f"output_dir={out}",
                          match="seed 1: every training step (4) had a non-finite loss or gradient and was skipped")
    manifest = read_json(out / "run.json")
    assert manifest["status"] == "failed" and "NonFiniteLossError" in manifest["error"], line
    assert not (out / "summary.json").exists() and not (out / "seed1" / "results.json").exists()
    assert not (out / "seed1" / "checkpoint.json").exists()


def test_resume_values_get_the_same_checks(tmp_path, cli):
    out = tmp_path / "run"
    code, _, err = cli("train", *COOP, "epochs=0", f"output_dir={out}")
    assert code == 0, err
    before = (out / "run.json").read_bytes()
    one_line_error(cli, "train", "--resume", out, "eval_batch_size=0", match="eval_batch_size must be >= 1, got 0")
    one_line_error(cli, "train", "--resume", out, "num_workers=-3", match="num_workers must be >= -1, got -3")
    one_line_error(cli, "train", *COOP, "epochs=0", "eval_batch_size=0", f"output_dir={out}", "--resume", "latest",
                   match="eval_batch_size must be >= 1, got 0")
    assert (out / "run.json").read_bytes() == before, "a refused resume must not rewrite the run"


def test_output_paths_that_are_files_or_folders(tmp_path, cli):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    one_line_error(cli, "train", *COOP, "epochs=0", "--output", a_file,
                   match=f"output folder {a_file} is a file; give a folder for the run")
    one_line_error(cli, "train", *COOP, "epochs=0", f"output_dir={a_file / 'run'}",
                   match=f"{a_file} is a file, not a folder")
    assert a_file.read_text() == "not a folder"
    run = tmp_path / "run"
    assert cli("train", *COOP, "epochs=0", f"output_dir={run}")[0] == 0
    one_line_error(cli, "eval", "--run", run, "--output", tmp_path, match=f"--output {tmp_path} is a folder")
    one_line_error(cli, "report", run, "--markdown", tmp_path, match=f"--markdown {tmp_path} is a folder")
    one_line_error(cli, "report", run, "--csv", a_file / "t.csv", match=f"{a_file} is a file, not a folder")


def test_report_over_different_protocols_and_eval_batch_size(tmp_path, cli):
    b2n, fewshot = tmp_path / "b2n", tmp_path / "fewshot"
    assert cli("train", *COOP, "epochs=0", f"output_dir={b2n}")[0] == 0
    assert cli("train", *COOP, "--protocol", "fewshot", "epochs=0", f"output_dir={fewshot}")[0] == 0
    table = tmp_path / "table.md"
    one_line_error(cli, "report", b2n, fewshot, "--markdown", table,
                   match="cannot put runs of different protocols in one table (b2n: coop procedural; fewshot: coop"
                         " procedural); report each protocol separately", folder=table)
    one_line_error(cli, "report", b2n, tmp_path / "absent", match=f"{tmp_path / 'absent'}: no such run folder")
    one_line_error(cli, "report", b2n, tmp_path, match=f"{tmp_path} is not a run folder (no run.json); report takes"
                                                       " the folders that `fastprompt train` wrote")
    # A seed's folder inside a run (where the checkpoint is) given for the run: the run is named.
    for command in (("report",), ("eval", "--run")):
        one_line_error(cli, *command, b2n / "seed1", match=f"{b2n / 'seed1'} is not a run folder (no run.json); it is"
                                                           f" a folder inside the run {b2n}: give that")
    results = tmp_path / "eval.json"
    one_line_error(cli, "eval", "--run", b2n, "eval_batch_size=0", "--output", results,
                   match="eval_batch_size must be >= 1, got 0", folder=results)


@pytest.fixture
def no_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.mark.parametrize("option, message", [
    (["--epochs", "0"], "demo: epochs must be an integer >= 1, got 0"),
    (["--shots", "-2"], "demo: shots must be an integer >= 1, got -2"),
    (["--batch-size", "0"], "demo: batch_size must be an integer >= 1, got 0"),
    (["--lr", "nan"], "demo: lr must be a finite number > 0, got nan"),
    (["--backbone", "ViT-B-61"], "demo: unknown backbone 'ViT-B-61'; did you mean ViT-B-16"),
    (["--device", "tpu"], "device='tpu' is not a device name"),
    (["--device", "cuda"], "device='cuda' but CUDA is not available on this machine"),
    (["--kernels", "bogus"], "demo: kernels must be auto or one of triton, xformers, sdpa, eager, got 'bogus'"),
    (["--method", "bogus"], "argument --method: invalid choice: 'bogus'"),
    (["--epochs", "many"], "argument --epochs: invalid int value: 'many' (see `fastprompt demo --help`)"),
])
def test_bad_demo_options(tmp_path, cli, monkeypatch, no_cuda, option, message):
    monkeypatch.chdir(tmp_path)
    defaults = ["--backbone", "tiny", "--device", "cpu", "--shots", "2", "--epochs", "1", "--batch-size", "2"]
    one_line_error(cli, "demo", *defaults, *option, match=message)  # later options win in argparse
    assert os.listdir(tmp_path) == []


def test_a_cuda_device_that_is_not_there(tmp_path, cli, monkeypatch, no_cuda):
    import torch

    out = tmp_path / "run"
    args = [a for a in COOP if a != "device=cpu"]
    one_line_error(cli, "train", *args, "device=cuda", f"output_dir={out}",
                   match="device='cuda' but CUDA is not available on this machine; use device=cpu", folder=out)
    one_line_error(cli, "train", *args, "device=mps", f"output_dir={out}",
                   match="device='mps': the runner runs on auto, cpu, cuda or cuda:N", folder=out)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    one_line_error(cli, "train", *args, "device=cuda:3", f"output_dir={out}",
                   match="device='cuda:3' but this machine has 1 CUDA device(s) (cuda:0..cuda:0)", folder=out)


def test_argument_errors_are_one_line(tmp_path, cli):
    one_line_error(cli, "train", "--shots", "many", match="argument --shots: invalid int value: 'many'")
    # The runner's commands take key=value after their options: a misspelt option gets the closest one, a config
    # key written as an option its key=value form.
    one_line_error(cli, "train", "--metod", "maple", match="unrecognised argument(s) --metod; did you mean --method?")
    one_line_error(cli, "train", "--method", "coop", "--eval-every=2",
                   match="unrecognised argument(s) --eval-every=2; eval_every is a config value: write it eval_every=2")
    one_line_error(cli, "eval", "--run", str(tmp_path), "--kernels", "eager",
                   match="unrecognised argument(s) --kernels; kernels is a config value: write it kernels=VALUE")
    one_line_error(cli, "frobnicate", match="invalid choice: 'frobnicate'")
    one_line_error(cli, "report", match="the following arguments are required: runs")
