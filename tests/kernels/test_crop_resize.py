"""crop_resize (one launch per batch of RandomResizedCrop + flip + normalisation) against torchvision's tensor ops
image by image, the reference the on-device few-shot set used before: the same values but for a rare pixel one uint8
level away at a rounding tie, for downscales, upscales, whole images, edge boxes, both flips and a batch mixing
image sizes."""

import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from fastprompt.data import CLIP_MEAN, CLIP_STD, procedural_splits
from fastprompt.kernels.crop_resize import crop_resize
from fastprompt.runner.device_data import DeviceAugmentedSet

MEAN, STD = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)

# (image height, width), (top, left, crop height, crop width, flip)
CASES = {
    "downscale 2.5x": ((70, 90), (5, 7, 60, 80, 0)),
    "upscale": ((20, 25), (2, 3, 10, 12, 1)),
    "whole image at the output size": ((24, 24), (0, 0, 24, 24, 0)),
    "bottom-right edge, flipped": ((50, 40), (20, 10, 30, 30, 1)),
    "tall strip": ((120, 30), (0, 5, 120, 9, 0)),
    "one pixel": ((9, 9), (4, 4, 1, 1, 1)),
    "large downscale": ((110, 96), (0, 0, 110, 96, 0)),
}


def torchvision_reference(image, box, size):
    """The set's former per-image path: torchvision's resized_crop (antialiased bicubic), hflip, normalisation."""
    top, left, height, width, flip = box
    crop = F.resized_crop(image, top, left, height, width, [size, size], InterpolationMode.BICUBIC, antialias=True)
    crop = F.hflip(crop) if flip else crop
    return (crop.float() / 255 - MEAN.to(image.device).view(3, 1, 1)) / STD.to(image.device).view(3, 1, 1)


def levels(normalised):
    return normalised * STD.to(normalised.device).view(3, 1, 1) * 255 + MEAN.to(normalised.device).view(3, 1, 1) * 255


def assert_same_pixels(ours, reference):
    """The same uint8 levels, but for a value that one side rounds up from x.5 and the other down: the kernel follows
    PyTorch's CUDA resampler, while on a CPU torchvision runs PyTorch's CPU resampler (its weights computed in
    another order: 1 value in 1,728 of the 24x24 upscale here), and on a GPU the compiler may fuse multiply-adds
    differently. The normalisation that follows is the same fp32 arithmetic, so equal levels give equal values."""
    difference = (levels(ours) - levels(reference)).abs()
    assert difference.max() < 1.01, difference.max()
    assert (difference > 0.01).float().mean() < 0.005, (difference > 0.01).float().mean()
    same = difference < 0.01
    assert torch.equal(ours[same], reference[same])


def images_for(shapes, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator).to(device) for h, w in shapes]


@pytest.mark.parametrize("size", [24, 17])
@pytest.mark.parametrize("case", sorted(CASES))
def test_one_box_matches_torchvision(kernel_device, case, size, poison):
    shape, box = CASES[case]
    (image,) = images_for([shape], kernel_device)
    ours = crop_resize([image], [box], size, MEAN.to(kernel_device), STD.to(kernel_device))
    assert ours.shape == (1, 3, size, size) and ours.dtype == torch.float32
    assert_same_pixels(ours[0], torchvision_reference(image, box, size))


def test_a_batch_mixes_image_sizes_and_boxes(kernel_device, poison):
    """One launch for the whole batch, each image read at its own address with its own taps (the large downscale's
    21 taps per axis beside the upscale's 5), in the order given (a repeated image too)."""
    cases = [CASES[name] for name in sorted(CASES)]
    images = images_for([shape for shape, _ in cases], kernel_device, seed=3)
    boxes = [box for _, box in cases]
    images.append(images[0])  # the same image again, another box
    boxes.append((1, 2, 8, 9, 1))
    ours = crop_resize(images, boxes, 24, MEAN.to(kernel_device), STD.to(kernel_device))
    for n, (image, box) in enumerate(zip(images, boxes)):
        assert_same_pixels(ours[n], torchvision_reference(image, box, 24))


def test_the_check_has_teeth(kernel_device):
    """A box one pixel off, or the other flip, gives other pixels: the comparisons above can fail."""
    shape, (top, left, height, width, flip) = CASES["downscale 2.5x"]
    (image,) = images_for([shape], kernel_device)
    args = (24, MEAN.to(kernel_device), STD.to(kernel_device))
    reference = torchvision_reference(image, (top, left, height, width, flip), 24)
    for box in ((top + 1, left, height, width, flip), (top, left, height, width, 1 - flip)):
        difference = (levels(crop_resize([image], [box], *args)[0]) - levels(reference)).abs()
        assert difference.max() > 20


BAD_INPUT = {
    "box outside its image": (lambda image: ([image], [(0, 0, 30, 31, 0)]), "crop 30x31 at (0, 0) is not inside"),
    "negative top": (lambda image: ([image], [(-1, 0, 5, 5, 0)]), "is not inside its 30x30 image"),
    "flip 2": (lambda image: ([image], [(0, 0, 5, 5, 2)]), "flip must be 0 or 1"),
    "short box": (lambda image: ([image], [(0, 0, 5, 5)]), "must be (top, left, height, width, flip)"),
    "counts differ": (lambda image: ([image, image], [(0, 0, 5, 5, 0)]), "2 images but 1 boxes"),
    "float image": (lambda image: ([image.float()], [(0, 0, 5, 5, 0)]), "contiguous uint8 [3, H, W]"),
    "grey image": (lambda image: ([image[:1]], [(0, 0, 5, 5, 0)]), "contiguous uint8 [3, H, W]"),
    "strided image": (lambda image: ([image[:, :, ::2]], [(0, 0, 5, 5, 0)]), "(non-contiguous)"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_clear_error(kernel_device, case):
    (image,) = images_for([(30, 30)], kernel_device)
    make, message = BAD_INPUT[case]
    images, boxes = make(image)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        crop_resize(images, boxes, 24, MEAN.to(kernel_device), STD.to(kernel_device))


def test_mean_and_size_are_checked(kernel_device):
    (image,) = images_for([(30, 30)], kernel_device)
    with pytest.raises(ValueError, match="mean must be 3 contiguous float32"):
        crop_resize([image], [(0, 0, 5, 5, 0)], 24, MEAN.double().to(kernel_device), STD.to(kernel_device))
    with pytest.raises(ValueError, match="size must be >= 1"):
        crop_resize([image], [(0, 0, 5, 5, 0)], 0, MEAN.to(kernel_device), STD.to(kernel_device))


# --- the runner's few-shot set on the kernel ------------------------------------------------------------------


def _sets(device):
    splits = procedural_splits(num_train_per_class=3, image_size=48, num_classes=3)
    return (DeviceAugmentedSet(splits, 32, (0.08, 1.0), device, resampler="kernel"),
            DeviceAugmentedSet(splits, 32, (0.08, 1.0), device, resampler="torchvision"))


def test_the_sets_batches_are_torchvisions_with_the_same_draws(kernel_device):
    kernel, reference = _sets(kernel_device)
    assert (kernel.resampler, reference.resampler) == ("kernel", "torchvision")
    torch.manual_seed(11)
    ours = [(images, labels) for images, labels in kernel.batches(4, torch.Generator().manual_seed(2))]
    torch.manual_seed(11)
    theirs = [(images, labels) for images, labels in reference.batches(4, torch.Generator().manual_seed(2))]
    assert len(ours) == len(theirs) == 2
    for (a, labels_a), (b, labels_b) in zip(ours, theirs):
        assert torch.equal(labels_a, labels_b)
        for n in range(a.shape[0]):
            assert_same_pixels(a[n], b[n])


def test_the_data_parallel_slices_render_through_the_kernel(kernel_device):
    from fastprompt.parallel.data_parallel import ShardedDeviceBatches

    kernel, reference = _sets(kernel_device)
    ours = list(ShardedDeviceBatches(kernel, 4, torch.Generator().manual_seed(0), rank=1, world=2))
    theirs = list(ShardedDeviceBatches(reference, 4, torch.Generator().manual_seed(0), rank=1, world=2))
    assert len(ours) == len(theirs) == 2
    for (a, labels_a), (b, labels_b) in zip(ours, theirs):
        assert torch.equal(labels_a, labels_b) and a.shape == (2, 3, 32, 32)
        for n in range(a.shape[0]):
            assert_same_pixels(a[n], b[n])


def test_a_kernel_batch_costs_the_same_ops_for_any_batch_size(kernel_device):
    """Rendering a batch (after the per-image draws, host RNG on either path) is a fixed number of ops with the
    kernel, where torchvision's path adds its ops for every image."""
    from bench.host import OpCounter

    kernel, reference = _sets(kernel_device)
    counts = {}
    for name, data in (("kernel", kernel), ("torchvision", reference)):
        for batch in (2, 8):
            indices = list(range(batch))
            boxes = [data.draw(data.images[i]) for i in indices]
            with OpCounter() as ops:
                data.render(indices, boxes)
            counts[name, batch] = sum(ops.ops.values())
    assert counts["kernel", 2] == counts["kernel", 8], counts
    assert counts["torchvision", 8] - counts["torchvision", 2] >= 6 * 5, counts  # >= 5 ops per extra image


def test_resampler_choice():
    splits = procedural_splits(num_train_per_class=1, image_size=32, num_classes=2)
    assert DeviceAugmentedSet(splits, 32, (0.5, 1.0), "cpu").resampler == "torchvision"  # never the interpreter
    with pytest.raises(ValueError, match="resampler must be one of"):
        DeviceAugmentedSet(splits, 32, (0.5, 1.0), "cpu", resampler="pil")
    with pytest.raises(ValueError, match="resampler 'kernel' cannot run on meta"):
        DeviceAugmentedSet(splits, 32, (0.5, 1.0), "meta", resampler="kernel")
