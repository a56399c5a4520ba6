"""A few-shot training set kept decoded on the device, augmented there.

With 16 shots a dataset's training set is small (ImageNet: 16,000 images), while a training step on a
GPU takes milliseconds; decoding JPEGs and running PIL augmentation on the CPU is then the bottleneck.
This set decodes every image once into uint8 tensors on the device and produces each batch with the
same augmentation as `fastprompt.data.train_transform`, in the same order of random draws:

    per image: RandomResizedCrop box (torchvision's get_params, global torch RNG) -> bicubic resize of the
    uint8 crop with antialiasing -> horizontal flip if torch.rand(1) < 0.5 -> /255 -> CLIP normalisation.

So with the same torch seed the crop boxes and flips are exactly those of the PIL path; pixels differ only
by the resampling implementation (torchvision's tensor bicubic vs PIL's, at most a few uint8 levels), and a
crop that covers the whole image at the target size is bit-identical. Images keep their own sizes (a list
of tensors), so crops are taken from full-resolution pixels; `max_side` optionally shrinks the shorter side
before caching to bound memory, at the cost of cropping from a downscaled image.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from ..data import CLIP_MEAN, CLIP_STD, DatasetSplits

_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default aspect-ratio range, as in the PIL path


def _to_uint8_tensor(image, max_side: int | None) -> torch.Tensor:
    image = image.convert("RGB") if image.mode != "RGB" else image
    if max_side is not None and min(image.size) > max_side:
        scale = max_side / min(image.size)
        size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
        image = image.resize(size, resample=3)  # 3 = PIL bicubic
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class DeviceAugmentedSet:
    """(images, labels) batches from a few-shot set decoded once onto `device`."""

    def __init__(
        self,
        splits: DatasetSplits,
        image_size: int,
        scale: tuple[float, float],
        device: torch.device | str,
        max_side: int | None = None,
        progress=None,
        ratio: tuple[float, float] = _RATIO,
    ):
        self.device = torch.device(device)
        self.image_size, self.scale, self.ratio = image_size, tuple(scale), tuple(ratio)
        self.images: list[torch.Tensor] = []
        samples = splits.train
        iterator = progress(samples) if progress is not None else samples
        for sample in iterator:
            self.images.append(_to_uint8_tensor(splits.loader(sample.path), max_side).to(self.device))
        self.labels = torch.tensor([s.label for s in samples], device=self.device)
        self.mean = torch.tensor(CLIP_MEAN, device=self.device).view(3, 1, 1)
        self.std = torch.tensor(CLIP_STD, device=self.device).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def nbytes(self) -> int:
        return sum(t.numel() for t in self.images)

    def crop(self, image: torch.Tensor) -> torch.Tensor:
        """One image's random resized crop and flip, still uint8 CHW (the PIL path's draws, in its order)."""
        top, left, height, width = T.RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))
        size = [self.image_size, self.image_size]
        crop = F.resized_crop(image, top, left, height, width, size, InterpolationMode.BICUBIC, antialias=True)
        if torch.rand(1) < 0.5:
            crop = F.hflip(crop)
        return crop

    def normalise(self, crops: torch.Tensor) -> torch.Tensor:
        """uint8 [..., 3, H, W] -> CLIP-normalised float32, elementwise (a batch at once: three launches per batch
        rather than three per image)."""
        return (crops.float() / 255 - self.mean) / self.std

    def augment(self, image: torch.Tensor) -> torch.Tensor:
        """One image: the PIL path's crop, resize, flip and normalisation on a uint8 CHW tensor."""
        return self.normalise(self.crop(image))

    def batch(self, indices) -> torch.Tensor:
        """The augmented images at `indices`, [B, 3, size, size] float32: each image's crop in order, then one
        normalisation of the stacked uint8 crops (bit-identical to stacking `augment` of each)."""
        return self.normalise(torch.stack([self.crop(self.images[i]) for i in indices]))

    def labels_in_order(self, order: torch.Tensor) -> torch.Tensor:
        """The labels of the samples at `order` (host indices), gathered on the device: one host-to-device copy for
        a whole epoch, so that no batch copies anything to the device."""
        return self.labels[order.to(self.device)]

    def batches(self, batch_size: int, generator: torch.Generator):
        """Shuffled batches (the last incomplete one dropped, as the DataLoader path does)."""
        return _Batches(self, batch_size, generator)


class _Batches:
    def __init__(self, data: DeviceAugmentedSet, batch_size: int, generator: torch.Generator):
        self.data, self.batch_size, self.generator = data, batch_size, generator

    def __len__(self) -> int:
        return len(self.data) // self.batch_size

    def __iter__(self):
        order = torch.randperm(len(self.data), generator=self.generator)
        # The epoch's labels in order, gathered on the device from one copy of the order: a batch's labels are then
        # a slice. Indexing the device labels with each batch's Python list instead copied that list to the device
        # per batch, a blocking copy that waited for every queued kernel (the previous training step's), so host and
        # GPU time added up.
        labels = self.data.labels_in_order(order)
        host_order = order.tolist()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield self.data.batch(host_order[start : start + self.batch_size]), labels[start : start + self.batch_size]
