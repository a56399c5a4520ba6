"""The on-device few-shot set augments like the PIL path (fastprompt.data.train_transform): the same crop
boxes and flips for the same torch seed, bit-identical pixels for a crop that is the whole image at the
target size, pixels within a few uint8 levels otherwise, and batches that cover the set once per epoch."""

import pytest
import torch
from torchvision import transforms as T

from fastprompt.data import CLIP_STD, procedural_splits, train_transform
from fastprompt.runner.device_data import DeviceAugmentedSet

STD = torch.tensor(CLIP_STD).view(3, 1, 1)


def pil_path(splits, index, size, scale, ratio=None):
    transform = train_transform(size, scale=scale)
    if ratio is not None:  # RandomResizedCrop is the second step of the PIL pipeline
        transform.transforms[1].ratio = ratio
    return transform(splits.loader(splits.train[index].path))


def test_full_image_crop_is_bit_identical_to_the_pil_path():
    splits = procedural_splits(num_train_per_class=1, image_size=32)
    data = DeviceAugmentedSet(splits, 32, (1.0, 1.0), "cpu", ratio=(1.0, 1.0))
    flips = 0
    for index in range(len(splits.train)):
        torch.manual_seed(index)
        reference = pil_path(splits, index, 32, (1.0, 1.0), ratio=(1.0, 1.0))
        torch.manual_seed(index)
        ours = data.augment(data.images[index])
        assert torch.equal(ours, reference), index
        torch.manual_seed(index)  # the same draws again, to see which way the flip went
        T.RandomResizedCrop.get_params(data.images[index], [1.0, 1.0], [1.0, 1.0])
        flips += int(torch.rand(1) < 0.5)
    assert 0 < flips < len(splits.train)  # both branches of the flip were exercised


def test_random_crops_match_the_pil_path_within_resampling_error():
    splits = procedural_splits(num_train_per_class=3, image_size=56)
    data = DeviceAugmentedSet(splits, 32, (0.08, 1.0), "cpu")
    worst, mean_error, other_seed_error = 0.0, [], []
    for index in range(len(splits.train)):
        torch.manual_seed(100 + index)
        reference = pil_path(splits, index, 32, (0.08, 1.0))
        torch.manual_seed(100 + index)
        ours = data.augment(data.images[index])
        levels = ((ours - reference) * STD * 255).abs()  # back to uint8 levels
        worst = max(worst, levels.max().item())
        mean_error.append(levels.mean().item())
        torch.manual_seed(999 + index)
        other_seed_error.append(((data.augment(data.images[index]) - reference) * STD * 255).abs().mean().item())
    # Same boxes and flips; only the bicubic implementations differ (most at edges of upscaled small crops).
    assert worst <= 8
    assert sum(mean_error) / len(mean_error) < 0.5
    # The check has teeth: another crop of the same image is tens of times further away.
    assert sum(other_seed_error) / len(other_seed_error) > 10 * sum(mean_error) / len(mean_error)


def test_batch_statistics_match_the_pil_path():
    splits = procedural_splits(num_train_per_class=4, image_size=48)
    data = DeviceAugmentedSet(splits, 32, (0.08, 1.0), "cpu")
    torch.manual_seed(0)
    ours = torch.stack([data.augment(image) for image in data.images for _ in range(3)])
    torch.manual_seed(1)
    theirs = torch.stack([pil_path(splits, i, 32, (0.08, 1.0)) for i in range(len(splits.train)) for _ in range(3)])
    assert ours.shape == theirs.shape == (len(splits.train) * 3, 3, 32, 32)
    # Per-channel mean and std over many random crops agree (independent draws, so not exactly).
    assert torch.allclose(ours.mean((0, 2, 3)), theirs.mean((0, 2, 3)), atol=0.15)
    assert torch.allclose(ours.std((0, 2, 3)), theirs.std((0, 2, 3)), rtol=0.15)


def test_batches_cover_the_set_once_and_drop_the_last_partial_batch():
    splits = procedural_splits(num_train_per_class=5, image_size=32, num_classes=2)
    data = DeviceAugmentedSet(splits, 32, (0.5, 1.0), "cpu", max_side=24)
    assert all(min(image.shape[1:]) == 24 for image in data.images)  # shrunk before caching
    batches = data.batches(3, torch.Generator().manual_seed(0))
    assert len(batches) == 3
    seen = []
    for images, labels in batches:
        assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32
        seen += labels.tolist()
    assert len(seen) == 9 and sorted(seen) in ([0] * 5 + [1] * 4, [0] * 4 + [1] * 5)


@pytest.mark.parametrize("max_side", [None, 40])
def test_memory_is_the_uint8_pixels(max_side):
    splits = procedural_splits(num_train_per_class=1, image_size=48, num_classes=2)
    data = DeviceAugmentedSet(splits, 32, (0.5, 1.0), "cpu", max_side=max_side)
    side = max_side or 48
    assert data.nbytes() == 2 * 3 * side * side


def test_a_batch_is_each_images_augmentation_normalised_once():
    """The batch path crops each image (same random draws, same order) and normalises the stacked uint8 crops in
    one pass: bit-identical to stacking `augment` of each image, with the normalisation's launches once per batch
    instead of once per image."""
    from bench.host import OpCounter

    splits = procedural_splits(num_train_per_class=3, image_size=40, num_classes=2)
    data = DeviceAugmentedSet(splits, 32, (0.08, 1.0), "cpu")
    order = [4, 0, 5, 2]
    torch.manual_seed(7)
    per_image = torch.stack([data.augment(data.images[i]) for i in order])
    torch.manual_seed(7)
    with OpCounter() as ops:
        batch = data.batch(order)
    assert torch.equal(batch, per_image)
    normalisation = ops.ops["aten::div"] + ops.ops["aten::sub"]
    assert normalisation == 3, ops.ops  # / 255, - mean, / std once for the batch
