"""The runner's numerics modes train with fp32 prompt masters over low-precision frozen weights, and
PromptSRC's Gaussian prompt aggregation is applied at the end and survives an interruption (its running
sums are part of the resumable state)."""

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from fastprompt.runner import resolve_config, train_run
from runner_support import FAST, PROCEDURAL, read_json


def base_args(*extra):
    return ["--method", "coop", *PROCEDURAL, "--shots", "1", "--seeds", "1", *extra, "epochs=2", "batch_size=4",
            "n_ctx=4"]


@pytest.mark.parametrize("precision", ["bf16", "fp16-parity"])
def test_low_precision_modes_train_fp32_prompt_masters(tmp_path, cli, precision):
    fast = [a for a in FAST if not a.startswith("precision=")]
    run = tmp_path / precision
    code, out, err = cli("train", *base_args(*fast), f"precision={precision}", f"output_dir={run}")
    assert code == 0, err
    assert f"{precision} on cpu" in out
    manifest = read_json(run / "seed1" / "checkpoint.json")
    assert manifest["precision"] == precision
    assert all(dtype == "float32" for _, dtype in manifest["tensors"].values())
    history = read_json(run / "seed1" / "results.json")["history"]
    assert all(h["skipped_steps"] == 0 for h in history)
    code, out, err = cli("eval", "--run", run)
    assert code == 0 and "0.0000 points" in out, err


PROMPTSRC = {"method": "promptsrc", "dataset": "procedural", "dataset.num_test_per_class": "2",
             "dataset.num_val_per_class": "1", "shots": "1", "seeds": "1", "backbone": "tiny", "pretrained": "none",
             "device": "cpu", "num_workers": "0", "precision": "fp32", "epochs": "3", "batch_size": "4",
             "depth": "2", "gpa_mean": "1", "gpa_std": "0.01"}


class Stop(Exception):
    pass


def test_gpa_is_applied_and_survives_resume(tmp_path):
    """gpa_mean=1, gpa_std=0.01 puts all the weight on epoch 1 (exp(-5000) = 0 for the others): the final
    prompts must equal those saved after epoch 1, exactly."""
    full = tmp_path / "full"
    kept = tmp_path / "after-epoch-1"

    def keep_epoch_one(seed, epoch):
        if epoch == 1:
            shutil.copytree(full / "seed1" / "state", kept)

    train_run(resolve_config(overrides={**PROMPTSRC, "output_dir": str(full)}), printer=lambda line: None,
              on_epoch_end=keep_epoch_one)
    final = load_file(str(full / "seed1" / "checkpoint.safetensors"))
    epoch_one = load_file(str(kept / "state.safetensors"))
    for key, value in final.items():
        assert torch.equal(value, epoch_one[f"model.{key}"]), key
    assert read_json(full / "run.json")["config"]["gpa"] is True

    # Interrupted after epoch 2 and resumed: the GPA sums come back from the state, so the result is identical.
    resumed = tmp_path / "resumed"

    def stop(seed, epoch):
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        train_run(resolve_config(overrides={**PROMPTSRC, "output_dir": str(resumed)}), printer=lambda line: None,
                  on_epoch_end=stop)
    assert "gpa.text_sources.1.tokens" in load_file(str(resumed / "seed1" / "state" / "state.safetensors"))
    config = resolve_config(overrides={**PROMPTSRC, "output_dir": str(resumed)}).config
    train_run(config=config, resume_dir=str(resumed), printer=lambda line: None)
    again = load_file(str(resumed / "seed1" / "checkpoint.safetensors"))
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)
    assert not os.path.exists(resumed / "seed1" / "state")
