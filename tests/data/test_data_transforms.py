"""Train/eval transforms: shapes, CLIP normalisation, and eval = bicubic shorter-side resize + centre crop."""

import numpy as np
import pytest
import torch
from PIL import Image

from fastprompt.data import transforms

MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])


def _gradient_image(width, height):
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], -1).astype(np.uint8), "RGB")


def test_eval_transform_matches_manual_resize_crop_normalise():
    image = _gradient_image(300, 250)
    result = transforms.eval_transform(224)(image)
    assert result.shape == (3, 224, 224) and result.dtype == torch.float32
    # Reference by hand: shorter side 250 -> 224, the other side scaled the same way, centre crop.
    new_width = int(224 * 300 / 250)
    resized = np.asarray(image.resize((new_width, 224), Image.Resampling.BICUBIC), dtype=np.float64) / 255
    left = int(round((new_width - 224) / 2.0))
    expected = ((resized[:, left : left + 224] - MEAN) / STD).transpose(2, 0, 1)
    # torchvision resizes PIL images with PIL's own bicubic filter, so only float rounding differs.
    np.testing.assert_allclose(result.numpy(), expected, atol=1e-5)


def test_constant_image_normalises_exactly_in_both_transforms():
    colour = (10, 128, 250)
    image = Image.new("RGB", (64, 48), colour)
    expected = (np.array(colour) / 255 - MEAN) / STD
    for transform in (transforms.eval_transform(32), transforms.train_transform(32, scale=(0.5, 1.0))):
        out = transform(image)
        assert out.shape == (3, 32, 32)
        np.testing.assert_allclose(out.numpy(), np.broadcast_to(expected[:, None, None], (3, 32, 32)), atol=1e-5)


def test_train_transform_is_random_and_grey_images_become_rgb():
    image = _gradient_image(256, 256)
    transform = transforms.train_transform(224)
    torch.manual_seed(0)
    first = transform(image)
    second = transform(image)
    assert first.shape == second.shape == (3, 224, 224)
    assert not torch.equal(first, second)
    grey = transforms.eval_transform(16)(Image.new("L", (20, 20), 100))
    assert grey.shape == (3, 16, 16)


def test_crop_scale_is_configurable_and_validated():
    crop = next(
        t for t in transforms.train_transform(64, scale=transforms.MMRL_CROP_SCALE).transforms if hasattr(t, "scale")
    )
    assert crop.scale == (0.5, 1.0) and crop.interpolation.value == "bicubic"
    default = next(t for t in transforms.train_transform(64).transforms if hasattr(t, "scale"))
    assert default.scale == (0.08, 1.0)
    with pytest.raises(ValueError, match="crop scale"):
        transforms.train_transform(64, scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="image size"):
        transforms.eval_transform(0)
