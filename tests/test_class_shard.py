"""Class-sharded text (fastprompt.parallel.class_shard): two gloo ranks against the single-process model."""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import fastprompt
from fastprompt.parallel.class_shard import class_slices

NAMES = ["red circle", "blue square", "green triangle"]
WORKER = os.path.join(os.path.dirname(__file__), "class_shard_worker.py")


def test_slices_are_contiguous_balanced_and_cover_every_class():
    assert class_slices(7, 2) == [(0, 4), (4, 7)]
    assert class_slices(5, 4) == [(0, 2), (2, 3), (3, 4), (4, 5)]  # no empty rank
    assert class_slices(8, 1) == [(0, 8)]
    with pytest.raises(ValueError, match="3 classes over 4 ranks"):
        class_slices(3, 4)


def test_two_gloo_ranks_match_the_single_process_model(tmp_path):
    """Features, logits, mean-all-reduced gradients and the eval cache (see class_shard_worker.py)."""
    store = str(tmp_path / "store")
    ranks = [subprocess.Popen([sys.executable, WORKER, str(rank), "2", store], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    outputs = []
    for proc in ranks:
        try:
            outputs.append(proc.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for p in ranks:
                p.kill()
            raise
    # Both logs: when one rank fails, the other usually fails too, in the collective it was left waiting in.
    failed = [f"rank {rank} failed:\n{text[-3000:]}" for rank, (proc, text) in enumerate(zip(ranks, outputs))
              if proc.returncode != 0]
    assert not failed, "\n".join(failed)


@pytest.mark.parametrize("name, options", [("cocoop", {}), ("mcpl", {"integration": "input"})])
def test_image_dependent_text_is_refused_by_name(tiny_clip, name, options):
    model = fastprompt.build(name, tiny_clip, NAMES, **options)
    with pytest.raises(ValueError, match=f"'{name}'.*depend on the image"):
        model.shard_text_classes()
    with pytest.raises(ValueError, match=f"'{name}'"):
        fastprompt.PromptedCLIP(tiny_clip, model.method, NAMES, shard_text_classes=True)


def test_sharding_without_a_process_group_says_so(tiny_clip):
    model = fastprompt.build("coop", tiny_clip, NAMES, n_ctx=4, text_path="reference")
    model.shard_text_classes()
    with pytest.raises(RuntimeError, match="torch.distributed process group"):
        model(torch.randn(1, 3, 32, 32))


def test_one_rank_runs_the_plain_text_pass_exactly(tiny_clip, tmp_path):
    plain = fastprompt.build("maple", tiny_clip, NAMES, text_path="packed")
    sharded = fastprompt.build("maple", tiny_clip, NAMES, text_path="packed")
    sharded.load_state_dict(plain.state_dict())
    sharded.shard_text_classes()
    images = torch.randn(2, 3, 32, 32)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        got = sharded(images)
    finally:
        dist.destroy_process_group()
    assert sharded.text_sharding.slice_model is None  # no second model: the model's own pass
    assert torch.equal(got.logits["main"], plain(images).logits["main"])


def test_the_runner_refuses_fewer_classes_than_processes_before_a_run_starts(monkeypatch):
    """shard_text=true over 3 processes with 2 classes is one ConfigError naming the key, when the model is built
    (it was a ValueError traceback from the first text pass, inside a started run)."""
    import fastprompt
    from fastprompt.backbones import create_clip
    from fastprompt.parallel import data_parallel
    from fastprompt.runner.config import ConfigError, RunConfig
    from fastprompt.runner.engine import shard_text_if_asked

    monkeypatch.setattr(data_parallel, "world_size", lambda: 3)
    model = fastprompt.build("coop", create_clip("tiny"), ["cat", "dog"])
    with pytest.raises(ConfigError, match=r"^shard_text=true gives each of the 3 processes a share of the classes,"
                                          r" but there are 2; use shard_text=false$"):
        shard_text_if_asked(model, RunConfig(shard_text=True))
    assert shard_text_if_asked(model, RunConfig(shard_text=False)) is model
