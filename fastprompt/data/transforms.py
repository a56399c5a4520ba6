"""The research repos' image transforms (METHODS.md §2), built from torchvision.

Train: RandomResizedCrop(size, scale, bicubic) -> horizontal flip -> tensor -> CLIP normalisation.
Eval (test): resize the shorter side to `size` (bicubic) -> centre crop `size` -> tensor -> CLIP normalisation.
The default scale (0.08, 1) is Dassl's; MMRL trains with (0.5, 1).
"""

from __future__ import annotations

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MMRL_CROP_SCALE = (0.5, 1.0)


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"image size must be a positive integer, got {size!r}")


def _to_rgb(image):
    # Grey-scale and palette images exist in Caltech101 and ImageNet; CLIP expects 3 channels.
    return image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image


def train_transform(
    size: int = 224,
    scale: tuple[float, float] = (0.08, 1.0),
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
) -> T.Compose:
    """Training augmentation of the Dassl-based repos: PIL image -> normalised 3 x size x size tensor."""
    return T.Compose([*_train_steps(size, scale), T.ToTensor(), T.Normalize(mean, std)])


def train_pixels_transform(size: int = 224, scale: tuple[float, float] = (0.08, 1.0)) -> T.Compose:
    """train_transform's pixels before ToTensor (the same random draws): PIL image -> uint8 3 x size x size tensor,
    for `normalise_pixels` on the device (a quarter of the bytes to pass from a loader's workers)."""
    return T.Compose([*_train_steps(size, scale), T.PILToTensor()])


def _train_steps(size: int, scale: tuple[float, float]) -> list:
    _check_size(size)
    if not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"crop scale must be (low, high) with 0 < low <= high <= 1, got {scale!r}")
    return [T.Lambda(_to_rgb), T.RandomResizedCrop(size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip()]


def eval_transform(
    size: int = 224,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
) -> T.Compose:
    """Evaluation transform: shorter side to `size` (bicubic), centre crop, normalise.

    Dassl calls it the test transform; it is named eval_ so pytest never collects it as a test.
    """
    _check_size(size)
    return T.Compose(
        [
            T.Lambda(_to_rgb),
            T.Resize(size, interpolation=InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def eval_pixels_transform(size: int = 224) -> T.Compose:
    """eval_transform's pixels before ToTensor: PIL image -> uint8 3 x size x size tensor. A quarter of the bytes
    of the normalised float tensor to carry from a loader's workers (and to keep, fastprompt.runner.eval_cache);
    `normalise_pixels` then gives exactly eval_transform's values."""
    _check_size(size)
    return T.Compose([T.Lambda(_to_rgb), T.Resize(size, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(size),
                      T.PILToTensor()])


_NORMALISATION: dict = {}  # (device, mean, std) -> (mean, std) tensors [3, 1, 1] on that device


def normalise_pixels(pixels, mean: tuple[float, float, float] = CLIP_MEAN,
                     std: tuple[float, float, float] = CLIP_STD):
    """uint8 [..., 3, H, W] -> float32 CLIP-normalised, on the pixels' device: ToTensor's x / 255 then Normalize's
    (x - mean) / std, the same fp32 operations, so the values are bit-identical to eval_transform's. The mean and
    std go to a device once: building them per batch would copy from the host each time, a copy that waits for
    the kernels queued before it."""
    import torch

    key = (pixels.device, tuple(mean), tuple(std))
    constants = _NORMALISATION.get(key)
    if constants is None:
        constants = _NORMALISATION[key] = tuple(
            torch.tensor(values, dtype=torch.float32, device=pixels.device).view(3, 1, 1) for values in (mean, std))
    mean_t, std_t = constants
    return (pixels.to(torch.float32) / 255 - mean_t) / std_t
