"""The on-device few-shot set augments like the PIL path (fastprompt.data.train_transform): the same crop
boxes and flips for the same torch seed, bit-identical pixels for a crop that is the whole image at the
target size, pixels within a few uint8 levels otherwise, and batches that cover the set once per epoch without
copying anything from the host to the device per batch."""

import pytest
import torch
import torch.utils._pytree as pytree
from torch.overrides import TorchFunctionMode
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


@pytest.mark.parametrize("shape, scale", [((3, 60, 45), (0.08, 1.0)), ((3, 31, 90), (0.5, 1.0)),
                                          ((3, 4, 200), (0.5, 1.0)), ((3, 200, 4), (0.5, 1.0)),
                                          ((3, 20, 20), (1.0, 1.0))])
def test_draws_are_torchvisions_and_leave_the_generator_where_it_leaves_it(shape, scale):
    """draw() against RandomResizedCrop.get_params + RandomHorizontalFlip's draw: the same boxes and flips for
    many seeds, the fallback central crops of images no box of the ratio range fits (4x200), and the same generator
    state afterwards (the next draw of anything agrees)."""
    splits = procedural_splits(num_train_per_class=1, image_size=32, num_classes=2)
    data = DeviceAugmentedSet(splits, 32, scale, "cpu")
    image = torch.zeros(shape, dtype=torch.uint8)
    for seed in range(40):
        torch.manual_seed(seed)
        theirs = [(*T.RandomResizedCrop.get_params(image, list(scale), list(data.ratio)), int(torch.rand(1) < 0.5))
                  for _ in range(5)]
        after_theirs = torch.rand(3)
        torch.manual_seed(seed)
        ours = [data.draw(image) for _ in range(5)]
        assert ours == theirs and torch.equal(torch.rand(3), after_theirs), seed
    if shape[1] == 4:  # no box fits: get_params' central crop, every time
        assert {box[:4] for box in ours} == {(0, 97, 4, 5)}


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


class HostToDevice(TorchFunctionMode):
    """Inside, every call that brings host data into an op on another device is recorded: a device tensor indexed
    with a Python list or a host tensor, host tensors (other than 0-dim scalars) mixed into a device op, a host
    tensor moved or copied to the device, a tensor built from Python data on the device. On a GPU each is a
    blocking copy that waits for every queued kernel. The "meta" device stands in for the GPU on a CPU machine."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", repr(func))
        leaves = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        on_device = [t for t in leaves if t.device.type != "cpu"]
        host = [t for t in leaves if t.device.type == "cpu" and t.dim() > 0]
        index_lists = name == "__getitem__" and any(isinstance(x, (list, tuple)) for x in pytree.tree_leaves(
            args[1:], is_leaf=lambda x: isinstance(x, list)))
        moved = name in ("to", "cuda", "copy_", "tensor", "as_tensor") and self._moves_to_device(name, args, kwargs)
        if (on_device and (host or index_lists)) or moved:
            self.calls.append(name)
        return func(*args, **kwargs)

    @staticmethod
    def _moves_to_device(name, args, kwargs) -> bool:
        if name in ("tensor", "as_tensor"):
            return torch.device(kwargs.get("device") or "cpu").type != "cpu"
        if name == "copy_":
            return args[0].device.type != "cpu" and args[1].device.type == "cpu"
        targets = [a for a in args[1:] if isinstance(a, (str, torch.device))] + [kwargs.get("device")]
        return args[0].device.type == "cpu" and any(t is not None and torch.device(t).type != "cpu"
                                                    for t in targets) or name == "cuda"


def test_the_host_to_device_watch_sees_each_kind_of_transfer():
    labels, index = torch.arange(6, device="meta"), torch.tensor([1, 2])
    for transfer in (lambda: labels[[1, 2]], lambda: labels[index], lambda: labels.index_select(0, index),
                     lambda: index.to("meta"), lambda: torch.tensor([1, 2], device="meta"),
                     lambda: labels[:2].copy_(index)):
        with HostToDevice() as watch:
            transfer()
        assert watch.calls, transfer
    with HostToDevice() as watch:
        labels[2:4] * torch.tensor(3) + labels[index.to("meta")][0]
    assert watch.calls == ["to"]


def _epoch_batches_copy_nothing(batches) -> list:
    """The batches after the first, iterated under the watch (the first copies the epoch's order to the device)."""
    iterator = iter(batches)
    next(iterator)
    with HostToDevice() as watch:
        rest = list(iterator)
    assert rest and watch.calls == [], watch.calls
    return rest


def test_a_batch_copies_nothing_from_the_host_to_the_device():
    splits = procedural_splits(num_train_per_class=4, image_size=32, num_classes=3)
    data = DeviceAugmentedSet(splits, 32, (0.5, 1.0), "meta")
    _epoch_batches_copy_nothing(data.batches(2, torch.Generator().manual_seed(0)))


def test_the_data_parallel_slices_copy_nothing_from_the_host_to_the_device():
    from fastprompt.parallel.data_parallel import ShardedDeviceBatches

    splits = procedural_splits(num_train_per_class=4, image_size=32, num_classes=3)
    data = DeviceAugmentedSet(splits, 32, (0.5, 1.0), "meta")
    _epoch_batches_copy_nothing(ShardedDeviceBatches(data, 4, torch.Generator().manual_seed(0), rank=1, world=2))


def test_each_batch_has_the_labels_of_its_images_in_the_generators_order():
    splits = procedural_splits(num_train_per_class=3, image_size=32, num_classes=4)
    data = DeviceAugmentedSet(splits, 32, (0.5, 1.0), "cpu")
    expected = [splits.train[i].label for i in torch.randperm(12, generator=torch.Generator().manual_seed(5))]
    labels = [labels for _, labels in data.batches(5, torch.Generator().manual_seed(5))]
    assert [t.tolist() for t in labels] == [expected[0:5], expected[5:10]]  # the last 2 dropped


@pytest.mark.gpu
def test_iterating_batches_on_a_gpu_does_not_synchronise():
    splits = procedural_splits(num_train_per_class=4, image_size=32, num_classes=3)
    data = DeviceAugmentedSet(splits, 32, (0.5, 1.0), "cuda")
    iterator = iter(data.batches(2, torch.Generator().manual_seed(0)))
    next(iterator)
    torch.cuda.set_sync_debug_mode("error")
    try:
        rest = list(iterator)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(rest) == 5
