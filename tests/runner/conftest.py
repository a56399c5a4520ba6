"""Shared set-up for the runner tests: fast CLI arguments and small on-disk fakes of two real layouts.

Runs use the random-weight "tiny" CLIP (32 px), 2 shots and 1-2 epochs so that a train + eval through
the CLI takes seconds on a CPU. The fakes follow the CoOp layouts the data package reads: EuroSAT with its
split_zhou JSON file, and ImageNet with classnames.txt and train/val class folders. Each class is one
colour with noise, so a prompt learner can fit it and accuracies are not all equal.
"""

from __future__ import annotations

import pytest

from fastprompt.cli import main
from runner_support import build_eurosat, build_imagenet


@pytest.fixture
def data_root(tmp_path):
    """A dataset root holding fake EuroSAT and ImageNet."""
    root = tmp_path / "data"
    build_eurosat(root)
    build_imagenet(root)
    return root


@pytest.fixture
def cli(capsys):
    """Run `fastprompt.cli.main(args)` in-process; returns (exit code, stdout, stderr)."""

    def run(*args):
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: the tiny model's ops are microseconds long, and with two threads on a busy 2-core
    CI machine thread hand-offs made training steps 30-50x slower. Restored after the module."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
