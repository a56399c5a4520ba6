"""fastprompt.kernels._launch: a launch through the compiled kernel's launcher is the launch Triton's own path makes.

On a CPU (tests/kernels/launch_check.py, in a process with compiled @triton.jit kernels, a stand-in driver and a
recording stand-in for each compiled kernel): every launch of whole training and evaluation steps of every method
reaches the same compiled kernel with the same launcher arguments both ways, most of them through the direct path;
an unaligned pointer is another specialisation, never a kernel remembered for aligned ones; a launcher that
misorders its arguments is caught. On a GPU: training steps give bit-identical results both ways.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

import fastprompt
from fastprompt.kernels import _launch
from fastprompt.methods import METHODS

CHECK = Path(__file__).resolve().parent / "launch_check.py"


def _check(*arguments: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(CHECK), *arguments], capture_output=True, text=True, env=env,
                          cwd=str(CHECK.parents[2]), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


# On a Triton release the direct path was not checked against, it is off and every launch takes Triton's own path
# (test_only_checked_triton_releases_take_the_direct_path): there is nothing to compare. Checking a new release is
# adding it to CHECKED_RELEASES and running these.
checked = pytest.mark.skipif(not _launch.checked_release(triton.__version__),
                             reason=f"Triton {triton.__version__} is not a release the direct launch path was checked"
                                    " against; its launches take Triton's own path")


@checked
def test_direct_launches_are_tritons_launches_for_every_method():
    report = _check(",".join(sorted(METHODS)))
    assert report["enabled"], f"Triton {report['triton']} is not a checked release"
    assert report["mismatch"] is None, report["mismatch"]
    assert report["compared"] > 5000 and report["direct"] > 0.95 * report["compared"], report
    assert report["alignment_kernels"] == 2  # the aligned and the unaligned layer norm: two compiled kernels


@checked
def test_the_comparison_catches_a_misordered_launch_and_the_switch_turns_the_direct_path_off():
    broken = _check("coop", "--misorder")
    assert broken["mismatch"] is not None and broken["mismatch"]["same_kernel"]
    off = _check("coop", "--disabled")
    assert off["direct"] == 0 and off["mismatch"] is None and off["compared"] > 100


def test_only_checked_triton_releases_take_the_direct_path():
    assert [_launch.checked_release(v) for v in ("3.6.0", "3.7.1", "3.7.0+git1234", "3.8.0")] == [True] * 4
    assert [_launch.checked_release(v) for v in ("3.5.1", "3.9.0", "3.10.0", "4.0.0")] == [False] * 4


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["maple", "mcpl", "cocoop"])
def test_direct_launches_train_bit_identically(method):
    from fastprompt.backbones import create_clip
    from fastprompt.training import TrainStep, make_optimizer

    names = ["red circle", "blue square", "green triangle", "yellow star"]
    results = []
    try:
        for enabled in (False, True):  # the same model, data and steps, launched through Triton's path, then ours
            _launch.ENABLED = enabled
            _launch.clear()
            torch.manual_seed(0)
            clip = fastprompt.patch(create_clip("small", precision="bf16", device="cuda"), backend="triton")
            model = fastprompt.build(method, clip, names).cuda().train()
            generator = torch.Generator().manual_seed(1)
            images = torch.randn(4, 3, *model.info.image_size, generator=generator).cuda()
            labels = torch.arange(4, device="cuda")
            step = TrainStep(model, make_optimizer(model.trainable_parameters()), cuda_graph=False,
                             amp_dtype=torch.bfloat16)
            losses = torch.stack([step(images, labels) for _ in range(3)])
            results.append((losses, [p.detach().clone() for p in model.trainable_parameters()]))
    finally:
        _launch.ENABLED = _launch.checked_release(triton.__version__)
    (loss_a, params_a), (loss_b, params_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
