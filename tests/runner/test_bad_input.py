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
    assert not os.path.exists(out), "a failed start must leave no run folder"
    return err


def test_missing_dataset_root(tmp_path, cli):
    fails(cli, tmp_path / "run", *EUROSAT, "--root", tmp_path / "nowhere", match="dataset root")
    fails(cli, tmp_path / "run", *EUROSAT, match="dataset 'eurosat' needs root=")
    (tmp_path / "empty").mkdir()
    fails(cli, tmp_path / "run", *EUROSAT, "--root", tmp_path / "empty", match="EuroSAT dataset folder not found")


def test_split_file_naming_absent_files(tmp_path, cli, data_root):
    os.remove(data_root / "eurosat" / "2750" / "Forest" / "Forest_4.jpg")
    err = fails(cli, tmp_path / "run", *EUROSAT, "--root", data_root, match="names 1 files that do not exist")
    assert "Forest/Forest_4.jpg" in err


def test_corrupt_training_image_stops_before_the_run_starts(tmp_path, cli, data_root):
    bad = data_root / "eurosat" / "2750" / "Forest" / "Forest_1.jpg"  # a base class
    bad.write_bytes(b"this is not a jpeg")
    # 3 shots = every training image, so the corrupt one is in the sample.
    err = fails(cli, tmp_path / "run", *EUROSAT, "--root", data_root, "shots=3", match="cannot decode image")
    assert str(bad) in err


def test_corrupt_test_image_fails_the_run_without_results(tmp_path, cli, data_root):
    bad = data_root / "eurosat" / "2750" / "SeaLake" / "SeaLake_5.jpg"  # a test image: decoded only at evaluation
    bad.write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "run"
    code, _, err = cli("train", *EUROSAT, "shots=2", "batch_size=2", "--root", data_root, f"output_dir={out}")
    assert code == 2 and "cannot decode image" in err and str(bad) in err
    manifest = read_json(out / "run.json")
    assert manifest["status"] == "failed" and "CorruptImageError" in manifest["error"]
    assert not (out / "summary.json").exists() and not (out / "summary.md").exists()
    assert not (out / "seed1" / "results.json").exists() and not (out / "seed1" / "checkpoint.json").exists()


def test_batch_larger_than_the_few_shot_set(tmp_path, cli, data_root):
    fails(cli, tmp_path / "run", *EUROSAT, "--root", data_root, "batch_size=64",
          match="batch_size=64 is larger than the 2-shot training set of eurosat (4 images over 2 classes)")


def test_unknown_keys_and_values(tmp_path, cli):
    fails(cli, tmp_path / "run", "--method", "coop", *PROCEDURAL, *FAST, "epoch=3", match="did you mean 'epochs'")
    fails(cli, tmp_path / "run", "--method", "coop", *PROCEDURAL, *FAST, "dataset.num_tests=3",
          match="does not take option(s) ['num_tests']")
    fails(cli, tmp_path / "run", "--method", "coop", *PROCEDURAL, *without("precision"), "precision=fp8",
          match="precision must be one of auto, fp32, bf16, fp16-parity")
    fails(cli, tmp_path / "run", "--method", "coop", *PROCEDURAL, *without("backbone"), "backbone=ViT-B-61",
          match="unknown backbone 'ViT-B-61'; did you mean ViT-B-16")
    fails(cli, tmp_path / "run", "--method", "coop", *PROCEDURAL, *without("pretrained"),
          f"pretrained={tmp_path / 'w.pt'}", match="w.pt' not found")
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
