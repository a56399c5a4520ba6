"""Nothing trained is lost: the resumable state is published by one rename, so a crash between any two of its
file operations leaves a complete state that resumes to the same weights as an uninterrupted run; leftovers of
a crash are ignored and cleaned; the final checkpoint is written before the evaluation, so a failing
evaluation loses no training."""

import os
import shutil
import tempfile

import pytest
import torch
from safetensors.torch import load_file

from fastprompt.runner import checkpoint as ckpt
from fastprompt.runner import resolve_config, train_run
from fastprompt.runner.engine import SeedTrainer
from runner_support import read_json

VALUES = {"method": "coop", "dataset": "procedural", "dataset.num_test_per_class": "2",
          "dataset.num_val_per_class": "1", "shots": "2", "seeds": "1", "backbone": "tiny", "pretrained": "none",
          "device": "cpu", "num_workers": "0", "precision": "fp32", "epochs": "2", "batch_size": "4", "n_ctx": "4",
          "save_every": "1"}


class Crash(Exception):
    pass


def stop_after(last: int):
    """An on_epoch_end that crashes the run once epoch `last` has ended (its state saved)."""

    def stop(seed, epoch):
        if epoch == last:
            raise Crash(f"stopped after epoch {last}")

    return stop


def config(out):
    return resolve_config(overrides={**VALUES, "output_dir": str(out)}).config


def train(out, resume=False, on_epoch_end=None, lines=None):
    printer = (lambda line: None) if lines is None else lines.append
    return train_run(config=config(out), resume_dir=str(out) if resume else None, printer=printer,
                     on_epoch_end=on_epoch_end)


def final(out):
    return load_file(os.path.join(out, "seed1", "checkpoint.safetensors")), read_json(out / "seed1" / "results.json")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    train(out)
    return final(out)


def assert_same_as_reference(out, reference):
    weights, results = final(out)
    assert weights.keys() == reference[0].keys()
    for key in weights:
        assert torch.equal(weights[key], reference[0][key]), key
    assert [h["loss"] for h in results["history"]] == [h["loss"] for h in reference[1]["history"]]
    assert results["targets"] == reference[1]["targets"]


# Every file-system step the state save takes: a crash is injected before each of them in turn.
STEPS = [(os, "rename"), (os, "replace"), (os, "fsync"), (os, "chmod"), (shutil, "rmtree"), (tempfile, "mkstemp")]


class Injector:
    """Counts the steps of the epoch-2 state save (which replaces epoch 1's state) and raises Crash before step
    `crash_at` (None: count only). Steps outside that save are not counted or touched."""

    def __init__(self, monkeypatch, crash_at):
        self.crash_at, self.count, self.armed, self.names = crash_at, 0, False, []
        for module, name in STEPS:
            monkeypatch.setattr(module, name, self._wrap(getattr(module, name), name))
        original = ckpt.save_state

        def save_state(folder, epoch, *args, **kwargs):
            self.armed = epoch == 2
            try:
                return original(folder, epoch, *args, **kwargs)
            finally:
                self.armed = False

        monkeypatch.setattr(ckpt, "save_state", save_state)

    def _wrap(self, function, name):
        def step(*args, **kwargs):
            if self.armed:
                if self.count == self.crash_at:
                    self.armed = False
                    raise Crash(f"crash before step {self.count} ({name})")
                self.count += 1
                self.names.append(name)
            return function(*args, **kwargs)

        return step


def test_a_crash_between_any_two_steps_of_a_state_save_loses_nothing(tmp_path, monkeypatch, reference):
    counter = Injector(monkeypatch, crash_at=None)
    train(tmp_path / "count")
    steps = counter.count
    assert counter.names.count("rename") == 2 and steps >= 10, counter.names  # the save did replace a state
    monkeypatch.undo()

    resumed_from = {}
    for crash_at in range(steps):
        out = tmp_path / f"crash{crash_at}"
        with monkeypatch.context() as patch:
            Injector(patch, crash_at)
            with pytest.raises(Crash):
                train(out)
        assert read_json(out / "run.json")["status"] == "failed"
        state = ckpt.find_state(str(out / "seed1" / "state"))
        assert state is not None, f"crash before step {crash_at} left no state"
        epoch = ckpt.load_state(str(out / "seed1" / "state"))[0]["epoch"]
        lines = []
        train(out, resume=True, lines=lines)
        assert any(f"resuming after epoch {epoch}" in line for line in lines), lines
        resumed_from[crash_at] = epoch
        assert_same_as_reference(out, reference)
        leftovers = sorted(set(os.listdir(out / "seed1")) - {"checkpoint.json", "checkpoint.safetensors",
                                                              "results.json"})
        assert leftovers == [], leftovers
    # Crashes before the publishing rename resume from epoch 1's state, crashes after it from epoch 2's.
    assert set(resumed_from.values()) == {1, 2}, resumed_from


def test_leftovers_of_a_crash_are_ignored_and_cleaned(tmp_path, reference):
    out = tmp_path / "run"
    with pytest.raises(Crash):
        train(out, on_epoch_end=stop_after(1))
    seed = out / "seed1"
    # What a SIGKILL in the middle of the next save leaves: a half-written new state and a stray temp file.
    (seed / ".state-new").mkdir()
    (seed / ".state-new" / "state.json").write_text('{"format": "fastprompt.train-state/1", "epo')
    (seed / ".state-new" / ".state.safetensors.x1y2.tmp").write_bytes(b"\0" * 100)
    assert ckpt.load_state(str(seed / "state"))[0]["epoch"] == 1
    lines = []
    train(out, resume=True, lines=lines)
    assert any("resuming after epoch 1" in line for line in lines), lines
    assert_same_as_reference(out, reference)
    assert not (seed / ".state-new").exists() and not (seed / "state").exists()


def test_the_previous_state_is_used_when_the_crash_came_before_the_publish(tmp_path):
    """The window between moving the old state aside and publishing the new one, made by hand."""
    out = tmp_path / "run"
    with pytest.raises(Crash):
        train(out, on_epoch_end=stop_after(2))
    seed = out / "seed1"
    os.rename(seed / "state", seed / ".state-old")
    assert ckpt.find_state(str(seed / "state")) == str(seed / ".state-old")
    assert ckpt.load_state(str(seed / "state"))[0]["epoch"] == 2
    shutil.rmtree(seed / ".state-old")
    with pytest.raises(ckpt.CheckpointError, match="training state not found"):
        ckpt.load_state(str(seed / "state"))


def test_a_failing_evaluation_loses_no_training(tmp_path, monkeypatch, reference, cli):
    out = tmp_path / "run"
    evaluate = SeedTrainer.evaluate_targets

    def broken(self, model, targets):
        raise Crash("evaluation failed")

    monkeypatch.setattr(SeedTrainer, "evaluate_targets", broken)
    with pytest.raises(Crash):
        train(out)
    manifest = read_json(out / "run.json")
    assert manifest["status"] == "failed" and "evaluation failed" in manifest["error"]
    seed = out / "seed1"
    assert (seed / "checkpoint.json").exists() and not (seed / "results.json").exists()
    trained = load_file(str(seed / "checkpoint.safetensors"))
    assert all(torch.equal(trained[k], reference[0][k]) for k in reference[0])  # the trained weights, saved

    monkeypatch.setattr(SeedTrainer, "evaluate_targets", evaluate)
    code, _, err = cli("eval", "--run", out)
    assert code == 2 and "has its final checkpoint but no results.json" in err and "status 'failed'" in err, err
    code, out_text, err = cli("eval", "--checkpoint", seed)  # the saved weights evaluate
    assert code == 0 and "accuracy" in out_text, err
    lines = []
    train(out, resume=True, lines=lines)
    assert any("resuming after epoch 2" in line for line in lines), lines  # nothing retrained
    assert_same_as_reference(out, reference)
    assert read_json(out / "run.json")["status"] == "complete"
