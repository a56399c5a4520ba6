"""One engine: `fastprompt train` and `fastprompt demo` step through fastprompt.training.TrainStep and nothing
else trains; the runner's epoch log carries the loader's rate next to the step's."""

from __future__ import annotations

import pytest

from fastprompt import training
from fastprompt.demo import run_demo
from runner_support import FAST, PROCEDURAL, read_json


@pytest.fixture
def counted_steps(monkeypatch):
    """Counts TrainStep calls and the optimizer steps taken anywhere (an optimizer stepped outside TrainStep —
    a second loop — would show as a difference)."""
    import torch

    counts = {"train_step": 0, "optimizer": 0, "inside": False}
    call = training.TrainStep.__call__

    def counting_call(self, images, labels):
        counts["train_step"] += 1
        counts["inside"] = True
        try:
            return call(self, images, labels)
        finally:
            counts["inside"] = False

    for cls in (torch.optim.SGD, torch.optim.AdamW):
        original = cls.step

        def counting_step(self, *args, _original=original, **kwargs):
            assert counts["inside"], "an optimizer stepped outside TrainStep"
            counts["optimizer"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "step", counting_step)
    monkeypatch.setattr(training.TrainStep, "__call__", counting_call)
    return counts


def test_the_demo_steps_through_train_step(counted_steps):
    lines = []
    result = run_demo(backbone="tiny", epochs=2, shots=2, test_per_class=1, batch_size=4, device="cpu",
                      echo=lines.append)
    # 8 classes x 2 shots = 16 images = 4 full batches per epoch, 2 epochs.
    assert counted_steps["train_step"] == 8 == counted_steps["optimizer"]
    assert len(result["losses"]) == 2 and "device cpu" in lines[0]


def test_the_demo_trains_a_set_smaller_than_its_batch_as_one_batch(counted_steps):
    lines = []
    run_demo(backbone="tiny", epochs=2, shots=1, test_per_class=1, batch_size=16, device="cpu", echo=lines.append)
    assert counted_steps["train_step"] == 2  # 8 classes x 1 shot = 8 images: one step per epoch
    assert "the training set holds 8 images, fewer than batch_size=16: each epoch is one batch of all of them" in lines


def test_the_runner_steps_through_train_step_and_logs_the_loader_rate(counted_steps, cli, tmp_path):
    run = tmp_path / "run"
    code, out, err = cli("train", "--method", "coop", *PROCEDURAL, "--shots", 2, "--seeds", "1", *FAST,
                         "epochs=2", "batch_size=3", "data_on_device=false", f"output_dir={run}")
    assert code == 0, err
    # b2n trains the 4 base classes x 2 shots = 8 images -> 2 full batches of 3 per epoch (the incomplete last
    # batch is dropped, as Dassl's training sampler does), 2 epochs.
    assert counted_steps["train_step"] == 4 == counted_steps["optimizer"]
    history = read_json(run / "seed1" / "results.json")["history"]
    assert [h["images"] for h in history] == [6, 6] and all(h["skipped_steps"] == 0 for h in history)
    assert all("loader_images_per_second" in h for h in history)
    assert all(h["starved_steps"] is None for h in history)  # asked of a CUDA stream only
    assert "images/s (loader " in out


def test_each_epoch_line_says_when_the_run_ends(cli, tmp_path):
    """Two seeds of 3 epochs: every epoch line but the run's last gives the time left for the whole run."""
    code, out, err = cli("train", "--method", "coop", *PROCEDURAL, "--shots", 1, "--seeds", "1,2", *FAST,
                         "epochs=3", "batch_size=2", f"output_dir={tmp_path / 'run'}")
    assert code == 0, err
    lines = [line for line in out.splitlines() if " epoch " in line and line.startswith("seed ")]
    assert len(lines) == 6
    assert all("; run ends in about " in line for line in lines[:-1]) and "run ends" not in lines[-1]


def test_time_left_leaves_out_the_first_epoch_and_reads_well():
    from fastprompt.runner.engine import _format_duration, time_left

    assert time_left([30.0, 2.0, 4.0], 10) == 30.0  # the first epoch held the compilation: pace 3 s
    assert time_left([5.0], 4) == 20.0
    assert [_format_duration(s) for s in (0.2, 7.4, 65, 3599, 3725)] == ["<1s", "7s", "1m05s", "59m59s", "1h02m"]


@pytest.mark.parametrize("on_device", ["false", "true"])
def test_a_set_smaller_than_a_batch_is_one_batch_per_epoch_as_in_dassl(counted_steps, cli, tmp_path, on_device):
    """Dassl's loader drops the last incomplete batch only when the set holds a whole batch (drop_last=is_train and
    len(data_source) >= batch_size): CoOp's 1-shot EuroSAT (10 images, batch 32) trains one batch of 10 per epoch.
    The runner refused such runs."""
    run = tmp_path / "run"
    code, out, err = cli("train", "--method", "coop", *PROCEDURAL, "--shots", 1, "--seeds", "1", *FAST, "epochs=3",
                         "batch_size=32", f"data_on_device={on_device}", f"output_dir={run}")
    assert code == 0, err
    # b2n trains the 4 base classes x 1 shot = 4 images: one step of 4 per epoch.
    assert counted_steps["train_step"] == 3 == counted_steps["optimizer"]
    assert [h["images"] for h in read_json(run / "seed1" / "results.json")["history"]] == [4, 4, 4]
    assert ("seed 1: the training set holds 4 images, fewer than batch_size=32: each epoch is one batch of all of"
            " them, as in Dassl") in out
    assert read_json(run / "run.json")["config"]["batch_size"] == 32  # the run's config is what was asked


def test_under_torchrun_a_set_smaller_than_a_batch_must_split_over_the_processes(monkeypatch):
    from fastprompt.data import procedural_splits
    from fastprompt.parallel import data_parallel
    from fastprompt.runner.config import ConfigError, resolve_config
    from fastprompt.runner.data import check_training_set

    config = resolve_config(overrides={"method": "coop", "dataset": "procedural", "batch_size": "32"}).config
    train = procedural_splits(num_train_per_class=1, num_classes=5, image_size=32)  # 5 images
    monkeypatch.setattr(data_parallel, "world_size", lambda: 2)
    with pytest.raises(ConfigError, match="holds 5 images, fewer than batch_size=32, so each epoch is one batch of"
                                          " all of them; that batch does not split over the 2 processes"):
        check_training_set(config, train)
    monkeypatch.setattr(data_parallel, "world_size", lambda: 5)
    check_training_set(config, train)
