"""What the pooled last blocks (PromptedCLIP.last_layer) save, measured on this CPU: the same model with
last_layer='full' and 'pooled', one after the other per round.

For each method it reports:
- step GFLOP: one training step's FLOPs at the benchmark's workload (C = 1000 ImageNet names, B = 32, ViT-B/16),
  from the geometry the benchmark's floor uses (bench/flops.py), full and pooled. Exact, machine-independent.
- inference ms: the median wall time of `model(images)` in eval mode without gradients (text features cached:
  the image tower alone) on a patched random-weight CLIP on this CPU (PyTorch ops and SDPA), full and pooled.
  Use the ratio, not the milliseconds, and never as a GPU figure.
- saved MiB: the bytes autograd keeps for one training step's backward (fastprompt.memory.saved_tensor_bytes),
  full and pooled.

    python -m bench.last_layer                                   # MaPLe, CoOp, VPT-deep on ViT-B/16, batch 8
    python -m bench.last_layer --methods maple --backbone tiny --batch 2 --rounds 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
import warnings

import torch

import fastprompt
from fastprompt.backbones import create_clip
from fastprompt.memory import options_for, saved_tensor_bytes, step_geometry, structural_model

from .flops import step_flops
from .host import classnames

MODES = ("full", "pooled")


def step_gflops(method: str) -> dict:
    """The benchmark workload's step FLOPs (fastprompt's options) with and without the pooled last blocks."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ImageNet's duplicate class names
        model = structural_model(method, classnames(1000), "ViT-B-16")
    options = options_for(patched=True, device="cuda")
    return {mode: step_flops(step_geometry(model, 32, dataclasses.replace(options,
                                                                          pooled_last_layer=mode == "pooled"))
                             ).total / 1e9 for mode in MODES}


def measure(clip, method: str, batch: int, rounds: int) -> dict:
    model = fastprompt.build(method, clip, classnames(100))
    size = model.info.image_size
    images = torch.randn(batch, 3, *size)
    labels = torch.arange(batch) % 100
    times = {mode: [] for mode in MODES}
    saved = {}
    for mode in MODES:
        model.last_layer = mode
        model.train()

        def step():
            return model.loss(model(images), labels)[0]

        step()  # run-long caches first
        saved[mode] = saved_tensor_bytes(step, exclude=list(model.parameters()))[0] / 2**20
    model.eval()
    with torch.no_grad():
        for mode in MODES:  # warm-up: the inference cache
            model.last_layer = mode
            model(images)
        for _ in range(rounds):
            for mode in MODES:
                model.last_layer = mode
                began = time.perf_counter()
                model(images)
                times[mode].append(time.perf_counter() - began)
    ms = {mode: 1e3 * statistics.median(times[mode]) for mode in MODES}
    return {"inference_ms": ms, "inference_pooled_over_full": ms["pooled"] / ms["full"], "saved_mib": saved}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="maple,coop,vpt_deep")
    parser.add_argument("--backbone", default="ViT-B-16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clip = fastprompt.patch(create_clip(args.backbone))
    for method in args.methods.split(","):
        record = {"method": method, "backbone": args.backbone, "batch": args.batch, "threads": args.threads,
                  "step_gflops_c1000_b32": step_gflops(method), **measure(clip, method, args.batch, args.rounds)}
        print(json.dumps(record))


if __name__ == "__main__":
    main()
