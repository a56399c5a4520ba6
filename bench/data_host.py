"""Host time per batch of the runner's on-device augmentation, measured on a CPU: the runner epoch's other host cost.

`fastprompt train` with the few-shot set on the GPU (fastprompt.runner.device_data.DeviceAugmentedSet) produces each
batch on the host thread between training steps: the per-image random draws (RandomResizedCrop's box and the flip,
torch's CPU RNG), then the rendering, queued on the GPU. With a CUDA-graphed step the host has the step's GPU time
to do it in, and more host time than that starves the GPU. This times both renderings on a CPU:

- `torchvision`: torchvision's ops image by image and one normalisation, computed on the CPU at a tiny output size
  (16 px from images of 18-26 px: the same ops per image as at 224, with next to no arithmetic), so the time is
  their Python and dispatcher cost, the part a GPU's host pays too. ("meta" tensors would compute nothing, but
  there clamp and round run PyTorch's Python decompositions, ~2.6 ms an image that no GPU pays.)
- `kernel`: fastprompt.kernels.crop_resize, its checks, table and one launch through fastprompt's launch path
  (fastprompt.kernels._launch) to a no-op launcher (bench.proxy.jit_launches), on CPU tensors: no pixel computed.

Both include the draws, which are the same host work on either path (`draws_us_per_batch` times them alone). The
images are the runner epoch's synthetic set (bench/synthetic.py). What it cannot see: the CUDA launches' own cost
(one per op on the torchvision path, one per batch on the kernel's), the pinned host-to-device copy of the kernel's
table (a few microseconds) and the GPU's time.

    python -m bench.data_host [batch] [images]    # a JSON line: median host us per batch for each path

Run without TRITON_INTERPRET=1 (the launch path is compiled kernels').
"""

from __future__ import annotations

import statistics
import sys
import time

import torch


def _seconds_per_batch(data, batch: int, batches: int, warmup: int) -> list[float]:
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data), generator=generator).tolist()
    picks = [[order[(n * batch + i) % len(order)] for i in range(batch)] for n in range(warmup + batches)]
    times = []
    for n, indices in enumerate(picks):
        start = time.perf_counter()
        data.batch(indices)
        if n >= warmup:
            times.append(time.perf_counter() - start)
    return times


def host_us_per_batch(batch: int = 32, images: int = 64, size: int = 16, batches: int = 20, warmup: int = 3) -> dict:
    from fastprompt.runner.device_data import DeviceAugmentedSet

    from . import synthetic
    from .proxy import answer_interpreted, jit_launches

    classes = max(1, images // 16)
    splits = synthetic.fewshot_splits([f"class {n}" for n in range(classes)], -(-images // classes), size)
    torch.manual_seed(0)
    reference = DeviceAugmentedSet(splits, size, synthetic.CROP_SCALE, "cpu", resampler="torchvision")
    record = {"batch": batch, "images": len(reference), "size": size, "threads": torch.get_num_threads()}
    times = _seconds_per_batch(reference, batch, batches, warmup)
    record["torchvision_us_per_batch"] = round(statistics.median(times) * 1e6)

    answer_interpreted()  # CPU tensors pass the launcher's device check; the launch itself is a no-op below
    with jit_launches() as launches:
        data = DeviceAugmentedSet(splits, size, synthetic.CROP_SCALE, "cpu", resampler="kernel")
        times = _seconds_per_batch(data, batch, batches, warmup)
    record["kernel_us_per_batch"] = round(statistics.median(times) * 1e6)
    record["kernel_launches_per_batch"] = sum(launches.values()) / (batches + warmup)
    record["draws_us_per_batch"] = round(statistics.median(_draw_seconds(data, batch, batches)) * 1e6)
    return record


def _draw_seconds(data, batch: int, batches: int) -> list[float]:
    """The draws alone (the host work both paths share)."""
    times = []
    for n in range(batches):
        start = time.perf_counter()
        for i in range(batch):
            data.draw(data.images[(n * batch + i) % len(data)])
        times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    from .proxy import run_measurement

    return run_measurement(host_us_per_batch, (32, 64), argv)


if __name__ == "__main__":
    sys.exit(main())
