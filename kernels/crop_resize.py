"""A batch of RandomResizedCrop + flip + CLIP normalisation in one launch (Triton), from uint8 images on the device.

The few-shot training set lives on the GPU as uint8 pixels (fastprompt.runner.device_data). Augmenting a batch
image by image with torchvision's tensor ops costs 5-6 launches per image (to float, antialiased bicubic resize,
clamp, round, back to uint8, and the flip for half of them): ~180 tiny kernels per batch of 32 and, measured on a
CPU (bench/data_host.py), ~1.7 ms of host time beside the draws, next to a training step of ~14 ms on an H200. This
kernel produces the whole normalised batch from the images' pixels and a table of boxes in one launch.

Every output pixel is computed the way PyTorch's antialiased bicubic resize computes it (``F.interpolate(...,
mode="bicubic", antialias=True, align_corners=False)``, the CUDA kernel ``upsample_gen2d_aa_out_frame`` with
PIL's cubic filter a = -0.5), followed by torchvision's uint8 conversion (clamp to [0, 255], round half to even):

    scale   = crop / size                      (per axis, fp32)
    support = 2 * scale if scale >= 1 else 2   (the filter's half-width in input pixels)
    center  = scale * (i + 0.5),  first = max(int(center - support + 0.5), 0),
    count   = min(int(center + support + 0.5), crop) - first
    w_j     = cubic((j + first - center + 0.5) / max(scale, 1)), normalised to sum 1 over j < count

Each output pixel sums its taps row by row (the horizontal sum of a row, then the vertical sum of the rows), the
order of PyTorch's kernel, in fp32. The sum's rounding can still differ from PyTorch's by the compiler's choice to
fuse multiplies and adds, so a pixel may land one uint8 level away from torchvision's at an exact .5 boundary; the
tests hold it to that. The flip mirrors the output's columns; the normalisation is torchvision's
``(x / 255 - mean) / std`` in fp32 with IEEE division.

The images stay where they are, one contiguous uint8 CHW tensor each, so a batch mixes image sizes; one row of the
kernel's table per output image gives its image's address and shape and the box to crop:

    address, height, width, top, left, crop_height, crop_width, flip

A program covers BLOCK output pixels of one image, all three channels (they share the taps' weights). Its loops run
over the taps of its own image (``2 * ceil(support) + 1`` per axis), so a batch with one large crop does not slow
the other images. The table is built on the host from the image tensors themselves (their data_ptr, shape and
device are checked there), and copied to the device without blocking.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._host import cdiv, check_same_device
from ._launch import launch
from .linear_act import require_kernel_device

TABLE_FIELDS = ("address", "height", "width", "top", "left", "crop_height", "crop_width", "flip")
# 256 output pixels per program over 8 warps, one per thread: 47 registers and no spill on sm_90 (two pixels per
# thread over 4 warps spilled). Each pixel reads ~100 taps x 3 channels for a 2x downscale, bytes that neighbouring
# pixels share, so the loads hit L1/L2.
_BLOCK, _NUM_WARPS = 256, 8


@triton.jit
def _cubic(x):
    # PIL's bicubic convolution filter with a = -0.5 (the antialiased resampler's; plain bicubic uses -0.75).
    x = tl.abs(x)
    near = ((-0.5 + 2.0) * x - (-0.5 + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * -0.5
    return tl.where(x < 1.0, near, tl.where(x < 2.0, far, 0.0))


@triton.jit
def _axis(i, crop, size):
    """Scale, support, taps count bound, first tap, tap count and (first - center) of output positions `i`."""
    scale = tl.div_rn(crop.to(tl.float32), size.to(tl.float32))
    support = tl.where(scale >= 1.0, 2.0 * scale, 2.0)
    invscale = tl.where(scale >= 1.0, tl.div_rn(1.0, scale), 1.0)
    taps = tl.ceil(support).to(tl.int32) * 2 + 1
    center = scale * (i.to(tl.float32) + 0.5)
    first = tl.maximum((center - support + 0.5).to(tl.int32), 0)
    count = tl.minimum((center + support + 0.5).to(tl.int32), crop.to(tl.int32)) - first
    return invscale, taps, first, count, first.to(tl.float32) - center


@triton.jit
def _weight_total(first_m_center, invscale, count, taps):
    total = tl.zeros(first_m_center.shape, dtype=tl.float32)
    for j in range(0, taps):
        w = _cubic((j + first_m_center + 0.5) * invscale)
        total += tl.where(j < count, w, 0.0)
    return tl.where(total != 0.0, total, 1.0)


@triton.jit
def _to_level(x):
    # torchvision's uint8 conversion of the resized float image: clamp, then round half to even (torch.round).
    x = tl.minimum(tl.maximum(x, 0.0), 255.0)
    r = tl.floor(x + 0.5)  # exact: x + 0.5 <= 255.5 is representable
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return tl.where(((r - x) == 0.5) & odd, r - 1.0, r)


@triton.jit
def _normalised(value, channel, mean_ptr, std_ptr):
    level = _to_level(value)
    return tl.div_rn(tl.div_rn(level, 255.0) - tl.load(mean_ptr + channel), tl.load(std_ptr + channel))


@triton.jit
def crop_resize_kernel(
    table_ptr,  # int64 [B, 8]: TABLE_FIELDS
    mean_ptr,  # fp32 [3]
    std_ptr,  # fp32 [3]
    out_ptr,  # fp32 [B, 3, size, size]
    size,
    BLOCK: tl.constexpr,
):
    image = tl.program_id(1)
    box = table_ptr + image.to(tl.int64) * 8
    pixels = tl.load(box).to(tl.pointer_type(tl.uint8))  # the image's data_ptr
    width = tl.load(box + 2)
    plane = tl.load(box + 1) * width
    top = tl.load(box + 3)
    left = tl.load(box + 4)
    crop_h = tl.load(box + 5)
    crop_w = tl.load(box + 6)
    flip = tl.load(box + 7)

    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = index < size * size
    oy = index // size
    ox = index % size
    inv_y, taps_y, first_y, count_y, first_m_center_y = _axis(oy, crop_h, size)
    inv_x, taps_x, first_x, count_x, first_m_center_x = _axis(ox, crop_w, size)
    total_y = _weight_total(first_m_center_y, inv_y, count_y, taps_y)
    total_x = _weight_total(first_m_center_x, inv_x, count_x, taps_x)

    red = tl.zeros([BLOCK], dtype=tl.float32)
    green = tl.zeros([BLOCK], dtype=tl.float32)
    blue = tl.zeros([BLOCK], dtype=tl.float32)
    for jy in range(0, taps_y):
        row_ok = inside & (jy < count_y)
        wy = tl.where(row_ok, tl.div_rn(_cubic((jy + first_m_center_y + 0.5) * inv_y), total_y), 0.0)
        row = (top + first_y + jy) * width + left + first_x
        row_red = tl.zeros([BLOCK], dtype=tl.float32)
        row_green = tl.zeros([BLOCK], dtype=tl.float32)
        row_blue = tl.zeros([BLOCK], dtype=tl.float32)
        for jx in range(0, taps_x):
            ok = row_ok & (jx < count_x)
            wx = tl.div_rn(_cubic((jx + first_m_center_x + 0.5) * inv_x), total_x)
            at = pixels + row + jx
            row_red += tl.load(at, mask=ok, other=0).to(tl.float32) * wx
            row_green += tl.load(at + plane, mask=ok, other=0).to(tl.float32) * wx
            row_blue += tl.load(at + 2 * plane, mask=ok, other=0).to(tl.float32) * wx
        red += row_red * wy
        green += row_green * wy
        blue += row_blue * wy

    column = tl.where(flip != 0, size - 1 - ox, ox)
    out = out_ptr + image.to(tl.int64) * 3 * size * size + oy * size + column
    tl.store(out, _normalised(red, 0, mean_ptr, std_ptr), mask=inside)
    tl.store(out + size * size, _normalised(green, 1, mean_ptr, std_ptr), mask=inside)
    tl.store(out + 2 * size * size, _normalised(blue, 2, mean_ptr, std_ptr), mask=inside)


def _table(images: Sequence[torch.Tensor], boxes: Sequence[Sequence[int]],
           device: torch.device) -> list[tuple[int, ...]]:
    """The kernel's rows (TABLE_FIELDS), each image on `device` and each box checked against its image; else one
    ValueError naming the image or box."""
    if len(images) != len(boxes):
        raise ValueError(f"crop_resize: {len(images)} images but {len(boxes)} boxes (one box per image)")
    rows = []
    for n, (image, box) in enumerate(zip(images, boxes)):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3 or not image.is_contiguous():
            raise ValueError(f"crop_resize: image {n} must be a contiguous uint8 [3, H, W] tensor, got "
                             f"{image.dtype} {list(image.shape)}{'' if image.is_contiguous() else ' (non-contiguous)'}")
        if image.device != device:
            raise ValueError(f"crop_resize: image {n} is on {image.device}, mean and std on {device}")
        if len(box) != 5:
            raise ValueError(f"crop_resize: box {n} must be (top, left, height, width, flip), got {tuple(box)}")
        top, left, crop_h, crop_w, flip = box
        height, width = image.shape[1], image.shape[2]
        if crop_h < 1 or crop_w < 1 or top < 0 or left < 0 or top + crop_h > height or left + crop_w > width:
            raise ValueError(f"crop_resize: box {n}: crop {crop_h}x{crop_w} at ({top}, {left}) is not inside its "
                             f"{height}x{width} image")
        if flip not in (0, 1, False, True):
            raise ValueError(f"crop_resize: box {n}: flip must be 0 or 1, got {flip!r}")
        rows.append((image.data_ptr(), height, width, top, left, crop_h, crop_w, int(flip)))
    return rows


def crop_resize(images: Sequence[torch.Tensor], boxes: Sequence[Sequence[int]], size: int, mean: torch.Tensor,
                std: torch.Tensor) -> torch.Tensor:
    """[len(images), 3, size, size] fp32: each image's box (top, left, height, width, flip) cropped, resized to
    size x size (antialiased bicubic), flipped where flip is 1, normalised with `mean` and `std` ([3] fp32).

    The boxes are host integers, checked here against their images; the kernel's table goes to the device without
    blocking (from pinned memory on a GPU), so the host queues the batch behind the running training step instead
    of waiting for it."""
    for name, t in (("mean", mean), ("std", std)):
        if t.dtype != torch.float32 or t.numel() != 3 or not t.is_contiguous():
            raise ValueError(f"crop_resize: {name} must be 3 contiguous float32 values, got {t.dtype} {list(t.shape)}")
    if size < 1:
        raise ValueError(f"crop_resize: size must be >= 1, got {size}")
    check_same_device("crop_resize", {"mean": mean, "std": std})
    device = mean.device
    rows = _table(images, boxes, device)
    require_kernel_device("crop_resize", device)
    out = torch.empty(len(rows), 3, size, size, device=device)
    if not rows:
        return out
    table = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":
        # The caching host allocator keeps a pinned block until the copy that reads it has run, so the table can be
        # released at once; a pageable source would make this copy wait for every queued kernel.
        table = table.pin_memory().to(device, non_blocking=True)
    launch(crop_resize_kernel, (cdiv(size * size, _BLOCK), len(rows)),
        table, mean, std, out, size, BLOCK=_BLOCK, num_warps=_NUM_WARPS,
    )  # fmt: skip
    return out


def _aot_specs():
    from fastprompt.kernels.aot import AotSpec

    signature = {"table_ptr": "*i64", "mean_ptr": "*fp32", "std_ptr": "*fp32",
                 "out_ptr": "*fp32", "size": "i32"}
    # 224 (ViT-B/16's input) is a multiple of 16, which the JIT specialises on.
    return [AotSpec(name=f"crop_resize[BLOCK={_BLOCK}]", fn=crop_resize_kernel, signature=signature,
                    constexprs={"BLOCK": _BLOCK}, num_warps=_NUM_WARPS, num_stages=1,
                    divisible_by_16=tuple(signature), hot=True)]


AOT_SPECS = _aot_specs()
