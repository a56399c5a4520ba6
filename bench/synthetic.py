"""The runner epoch's data: a synthetic few-shot set decoded once onto the device, as the runner holds a real one.

`fewshot_splits` gives a DatasetSplits whose `loader` hands out random RGB images of varying sizes (shorter side
1.15-1.6x the model's input, aspect 3:4 to 4:3, the range a resized ImageNet set has); `device_set` runs them
through fastprompt.runner.device_data.DeviceAugmentedSet, the class the runner uses with data_on_device, so the
decode-once copy, the per-image RandomResizedCrop/flip/normalise on the device and the batch order are the runner's.
Pixels are drawn from one random pool (crops of it) so that building 16,000 images takes seconds, not minutes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from PIL import Image

from fastprompt.data.splits import DatasetSplits, Sample
from fastprompt.runner.config import RunConfig
from fastprompt.runner.device_data import DeviceAugmentedSet

CROP_SCALE = next(f.default for f in dataclasses.fields(RunConfig) if f.name == "crop_scale")


class _RandomImages:
    """Sample key -> a random RGB PIL image whose size depends on the key only (same key, same image)."""

    def __init__(self, image_size: int, seed: int):
        self.low, self.high = round(1.15 * image_size), round(1.6 * image_size)
        longest = round(self.high * 4 / 3) + 1
        self.pool = np.random.default_rng(seed).integers(0, 256, (2 * longest, 2 * longest, 3), dtype=np.uint8)
        self.seed = seed

    def __call__(self, key: str) -> Image.Image:
        rng = np.random.default_rng([self.seed, int(key.rsplit("/", 1)[1])])
        short = int(rng.integers(self.low, self.high + 1))
        long = int(round(short * rng.uniform(1.0, 4 / 3)))
        height, width = (short, long) if rng.random() < 0.5 else (long, short)
        top = int(rng.integers(0, self.pool.shape[0] - height))
        left = int(rng.integers(0, self.pool.shape[1] - width))
        return Image.fromarray(self.pool[top : top + height, left : left + width])


def fewshot_splits(classnames, shots: int, image_size: int, seed: int = 0) -> DatasetSplits:
    """`shots` synthetic training images per class, labels in class order (the runner's sampler shuffles)."""
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    train = tuple(Sample(f"synthetic/{label * shots + i}", label, name)
                  for label, name in enumerate(classnames) for i in range(shots))
    return DatasetSplits(name="synthetic", classnames=tuple(classnames), train=train, val=(), test=(),
                         fewshot=(shots, seed), loader=_RandomImages(image_size, seed))


_CACHE: dict = {}


def device_set(classnames, shots: int, image_size: int, device) -> DeviceAugmentedSet:
    """The decoded set on `device`, built once per (classes, shots, size, device) and reused across the methods and
    contenders of a workload; a new key frees the previous set first (one set on the device at a time)."""
    key = (tuple(classnames), shots, image_size, str(device))
    if key not in _CACHE:
        _CACHE.clear()
        splits = fewshot_splits(classnames, shots, image_size)
        _CACHE[key] = DeviceAugmentedSet(splits, image_size, CROP_SCALE, torch.device(device))
    return _CACHE[key]


def release() -> None:
    """Free the cached set (its images stay on the device until then)."""
    _CACHE.clear()
