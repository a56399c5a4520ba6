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

A batch's boxes and flips are drawn on the host first (`draw`, image by image in the PIL path's order), then
rendered (`render`) by one of two resamplers:
- "kernel": fastprompt.kernels.crop_resize, the whole batch in one launch from the images where they lie
  (torchvision's pixels: PyTorch's antialiased bicubic, its rounding, the flip and the normalisation), on CUDA
  devices that run fastprompt's Triton kernels. Image by image, torchvision's tensor ops cost 5-6 launches per
  image and ~1.7 ms of host time per batch of 32 (bench/data_host.py), beside a ~14 ms training step.
- "torchvision": those ops image by image, then one normalisation of the stacked crops: every other device, and
  the reference the kernel is tested against.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from ..data import CLIP_MEAN, CLIP_STD, DatasetSplits, normalise_pixels

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
        resampler: str = "auto",
    ):
        self.device = torch.device(device)
        self.resampler = _resampler(resampler, self.device)
        self.image_size, self.scale, self.ratio = image_size, tuple(scale), tuple(ratio)
        # get_params' log of the ratio range (in the default dtype, as it computes it) and a host tensor to draw into.
        self._log_ratio = tuple(float(v) for v in torch.log(torch.tensor(self.ratio)))
        self._uniform = torch.empty(1)
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

    def draw(self, image: torch.Tensor) -> tuple[int, int, int, int, int]:
        """One image's random box and flip, (top, left, height, width, flip): the PIL path's draws from torch's
        global RNG, in its order and with its values (RandomResizedCrop.get_params, then RandomHorizontalFlip's
        torch.rand(1) < 0.5), with fewer ops: the log of the ratio range once per set rather than per image, the
        uniform draws into one reused 1-element tensor (the same generator calls as torch.empty(1).uniform_ and
        torch.rand(1)), the exp still torch's in the default dtype. 12 us an image instead of get_params' 33 on the
        host, the larger part of a batch's host time once the kernel renders it; a test holds the draws and the
        generator's state after them to torchvision's."""
        height, width = image.shape[-2], image.shape[-1]
        area, (scale_low, scale_high), (log_low, log_high) = height * width, self.scale, self._log_ratio
        uniform = self._uniform
        for _ in range(10):
            target_area = area * uniform.uniform_(scale_low, scale_high).item()
            aspect = torch.exp(uniform.uniform_(log_low, log_high)).item()
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = torch.randint(0, height - h + 1, size=(1,)).item()
                left = torch.randint(0, width - w + 1, size=(1,)).item()
                break
        else:  # get_params' fallback: the central crop nearest the ratio range, no draw
            in_ratio = float(width) / float(height)
            if in_ratio < min(self.ratio):
                w, h = width, int(round(width / min(self.ratio)))
            elif in_ratio > max(self.ratio):
                w, h = int(round(height * max(self.ratio))), height
            else:
                w, h = width, height
            top, left = (height - h) // 2, (width - w) // 2
        return top, left, h, w, int(uniform.uniform_(0, 1).item() < 0.5)

    def _render_one(self, image: torch.Tensor, box) -> torch.Tensor:
        top, left, height, width, flip = box
        size = [self.image_size, self.image_size]
        crop = F.resized_crop(image, top, left, height, width, size, InterpolationMode.BICUBIC, antialias=True)
        return F.hflip(crop) if flip else crop

    def crop(self, image: torch.Tensor) -> torch.Tensor:
        """One image's random resized crop and flip, still uint8 CHW (torchvision's ops; the PIL path's draws)."""
        return self._render_one(image, self.draw(image))

    def normalise(self, crops: torch.Tensor) -> torch.Tensor:
        """uint8 [..., 3, H, W] -> CLIP-normalised float32, elementwise (a batch at once: three launches per batch
        rather than three per image)."""
        return normalise_pixels(crops)

    def augment(self, image: torch.Tensor) -> torch.Tensor:
        """One image: the PIL path's crop, resize, flip and normalisation on a uint8 CHW tensor."""
        return self.normalise(self.crop(image))

    def render(self, indices, boxes) -> torch.Tensor:
        """The images at `indices` cropped and flipped as `boxes` (from `draw`) say, [B, 3, size, size] float32,
        normalised: one kernel launch, or torchvision's ops per image and one normalisation of the stacked crops."""
        images = [self.images[i] for i in indices]
        if self.resampler == "kernel":
            from ..kernels.crop_resize import crop_resize

            return crop_resize(images, boxes, self.image_size, self.mean.view(3), self.std.view(3))
        return self.normalise(torch.stack([self._render_one(image, box) for image, box in zip(images, boxes)]))

    def batch(self, indices) -> torch.Tensor:
        """The augmented images at `indices`: each image's draws in order, then the batch rendered at once
        (equal to stacking `augment` of each with the same draws)."""
        return self.render(indices, [self.draw(self.images[i]) for i in indices])

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


RESAMPLERS = ("auto", "kernel", "torchvision")


def _resampler(choice: str, device: torch.device) -> str:
    """auto: the Triton kernel where fastprompt runs its kernels (fastprompt.ops.backends.block_kernels_problem),
    torchvision elsewhere; "kernel" on a device that cannot run it is one clear error."""
    if choice not in RESAMPLERS:
        raise ValueError(f"resampler must be one of {RESAMPLERS}, got {choice!r}")
    from ..ops.backends import block_kernels_problem, triton_interpreted

    problem = block_kernels_problem(device)
    if device.type == "cpu" and triton_interpreted():
        problem = None  # the interpreter runs the kernel on the CPU (tests)
    if choice == "auto":
        return "kernel" if problem is None and device.type == "cuda" else "torchvision"
    if choice == "kernel" and problem is not None:
        raise ValueError(f"resampler 'kernel' cannot run on {device}: {problem}")
    return choice
