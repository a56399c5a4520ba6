"""The embedded procedural dataset: deterministic, the stated classes, and learnable from colour."""

import pickle

import numpy as np
import pytest
import torch

from fastprompt.data import (
    PROCEDURAL_CLASSNAMES,
    ProceduralDataset,
    build_dataset,
    eval_transform,
    procedural_splits,
    render_procedural_image,
)


def _pixels(image):
    return np.asarray(image, dtype=np.uint8)


def test_classes_are_the_stated_colour_shape_names():
    assert PROCEDURAL_CLASSNAMES == (
        "red circle",
        "blue square",
        "green triangle",
        "yellow star",
        "purple cross",
        "orange heart",
        "cyan ring",
        "pink crescent",
    )
    dataset = ProceduralDataset("train", num_per_class=3, image_size=32, seed=0)
    assert dataset.classnames == PROCEDURAL_CLASSNAMES
    assert len(dataset) == 24
    # Item i has label i // num_per_class, and the label is what __getitem__ returns.
    assert [dataset[i][1] for i in range(len(dataset))] == [i // 3 for i in range(24)]


def test_same_arguments_give_the_same_pixels_and_other_arguments_do_not():
    first = _pixels(render_procedural_image(3, 7, "train", seed=5, image_size=48))
    again = _pixels(render_procedural_image(3, 7, "train", seed=5, image_size=48))
    np.testing.assert_array_equal(first, again)
    for other in (
        render_procedural_image(3, 7, "train", seed=6, image_size=48),
        render_procedural_image(3, 7, "test", seed=5, image_size=48),
        render_procedural_image(3, 8, "train", seed=5, image_size=48),
    ):
        assert np.abs(_pixels(other).astype(int) - first).mean() > 5


def test_more_images_per_class_only_adds_images():
    small = ProceduralDataset("test", num_per_class=2, image_size=24, seed=1)
    large = ProceduralDataset("test", num_per_class=5, image_size=24, seed=1)
    # Image k of class c is the same whatever num_per_class is.
    np.testing.assert_array_equal(_pixels(small[1][0]), _pixels(large[1][0]))
    np.testing.assert_array_equal(_pixels(small[3][0]), _pixels(large[6][0]))


def test_images_are_rgb_of_the_requested_size_and_transform_gives_tensors():
    image, _ = ProceduralDataset("val", 1, image_size=40, seed=0)[0]
    assert image.mode == "RGB" and image.size == (40, 40)
    tensor, label = ProceduralDataset("val", 1, image_size=40, seed=0, transform=eval_transform(32))[0]
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32 and label == 0


def test_classes_separate_by_mean_colour_far_above_chance():
    """A nearest-class-mean classifier on each image's mean RGB, fit on train, scored on test."""

    def mean_colours(split, count):
        dataset = ProceduralDataset(split, count, image_size=32, seed=0)
        features = np.stack([_pixels(dataset[i][0]).reshape(-1, 3).mean(0) for i in range(len(dataset))])
        return features, np.array([s.label for s in dataset.samples])

    train_x, train_y = mean_colours("train", 16)
    test_x, test_y = mean_colours("test", 16)
    centres = np.stack([train_x[train_y == c].mean(0) for c in range(8)])
    predicted = ((test_x[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
    accuracy = (predicted == test_y).mean()
    assert accuracy > 0.5, accuracy  # chance is 1/8


def test_splits_record_matches_the_torch_dataset():
    splits = build_dataset(
        "procedural", num_train_per_class=2, num_val_per_class=0, num_test_per_class=3, image_size=16, seed=4
    )
    assert splits == procedural_splits(2, 0, 3, image_size=16, seed=4)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (16, 0, 24)
    assert splits.prompts()[0] == "a photo of a red circle."
    from_splits, label = splits.dataset("test")[5]
    direct, direct_label = ProceduralDataset("test", 3, image_size=16, seed=4)[5]
    assert label == direct_label == 1
    np.testing.assert_array_equal(_pixels(from_splits), _pixels(direct))


def test_datasets_pickle_for_dataloader_workers():
    dataset = ProceduralDataset("train", 2, image_size=16, seed=3, transform=eval_transform(16))
    clone = pickle.loads(pickle.dumps(dataset))  # what spawn/forkserver workers receive
    assert torch.equal(clone[3][0], dataset[3][0]) and clone[3][1] == dataset[3][1]


def test_fewer_classes_take_a_prefix():
    dataset = ProceduralDataset("train", 2, image_size=16, num_classes=3)
    assert dataset.classnames == PROCEDURAL_CLASSNAMES[:3] and len(dataset) == 6


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"split": "holdout"}, "split must be one of"),
        ({"num_per_class": 0}, "num_per_class must be at least 1"),
        ({"num_classes": 9}, "num_classes must be in 2..8"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProceduralDataset(**kwargs)
    with pytest.raises(ValueError, match="image_size must be at least 8"):
        render_procedural_image(0, 0, image_size=4)
