"""The runner's `accumulate` key: a run with gradient accumulation trains the same weights as one without (the
update equals the whole batch's), it is recorded in the run's config, and bad values are refused up front."""

import os

import pytest
import torch
from safetensors.torch import load_file

from fastprompt.runner import resolve_config, train_run
from fastprompt.runner.config import ConfigError
from runner_support import FAST, read_json

ARGS = {"method": "maple", "dataset": "procedural", "dataset.num_test_per_class": "2",
        "dataset.num_val_per_class": "1", "shots": "2", "seeds": "1", "epochs": "2", "batch_size": "4",
        **{k: v for k, v in (item.split("=") for item in FAST)}}


def _trained(out, **extra):
    train_run(resolve_config(overrides={**ARGS, "output_dir": str(out), **extra}), printer=lambda line: None)
    return load_file(os.path.join(str(out), "seed1", "checkpoint.safetensors")), out


def test_accumulated_run_trains_the_same_weights(tmp_path):
    plain, _ = _trained(tmp_path / "plain")
    accumulated, out = _trained(tmp_path / "accumulated", accumulate="2")
    assert plain.keys() == accumulated.keys() and plain
    for name in plain:
        torch.testing.assert_close(accumulated[name], plain[name], rtol=1e-4, atol=1e-5, msg=name)
    assert read_json(os.path.join(str(out), "run.json"))["config"]["accumulate"] == 2


@pytest.mark.parametrize("value,message", [
    ("0", "accumulate must be >= 1, got 0"),
    ("1.5", "accumulate: expected an integer"),
    ("8", "accumulate=8 splits a batch of batch_size=4 into more micro-batches than it has images"),
])
def test_bad_accumulate_values_are_refused(value, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(overrides={**ARGS, "accumulate": value})


def test_the_runner_memory_line_reads_the_run(monkeypatch, tiny_clip):
    """SeedTrainer._memory_line (printed before the first step on a GPU) predicts this run's step: its batch, its
    accumulation, its optimizer; the GPU's total memory read from torch.cuda.mem_get_info (faked here)."""
    import fastprompt
    from fastprompt.memory import memory_line, options_for_model, train_step_blas_workspaces
    from fastprompt.runner.engine import SeedTrainer, numerics

    config = resolve_config(overrides={**ARGS, "accumulate": "2", "optimizer": "adamw"}).config
    model = fastprompt.build("maple", tiny_clip, ["a", "b", "c", "d"])
    trainer = SeedTrainer(config, tiny_clip, torch.device("cpu"), numerics("fp32", torch.device("cpu")), 32,
                          echo=lambda line: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 2**40))
    options = options_for_model(model, None, "adamw", blas_workspaces=train_step_blas_workspaces(cuda_graph=True))
    import dataclasses

    expected = memory_line(model, 4, dataclasses.replace(options, accumulate=2), 2**40)
    assert trainer._memory_line(model, config.batch_size) == expected and expected.endswith("of 1024.0 GiB")
    # A set smaller than a batch trains batches of the whole set: the line predicts that batch.
    assert trainer._memory_line(model, 2) == memory_line(model, 2, dataclasses.replace(options, accumulate=2), 2**40)
