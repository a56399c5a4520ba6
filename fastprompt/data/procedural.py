"""An embedded dataset of coloured shapes drawn on the fly: real RGB images, no files, no downloads.

Each class is one colour and one shape ("red circle", "blue square", ...), so a CLIP text tower can
name it and even a random-weight image tower separates it (colour dominates the pixel statistics).
To keep it from being trivial, every image has a random position, size, rotation and colour jitter
for the object, on a noisy gradient background with grey clutter shapes.

An image is a pure function of (seed, split, label, index within the class): the same arguments give
the same pixels on any machine, and asking for more images per class only adds images.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

from .splits import DatasetSplits, ImageListDataset, Sample

# (class name, RGB colour, shape). Colours are far apart in RGB so that mean colour alone separates
# the classes; shapes differ so that a trained or pretrained network has a second cue.
PROCEDURAL_CLASSES: tuple[tuple[str, tuple[int, int, int], str], ...] = (
    ("red circle", (220, 30, 30), "circle"),
    ("blue square", (30, 70, 225), "square"),
    ("green triangle", (30, 170, 55), "triangle"),
    ("yellow star", (240, 215, 30), "star"),
    ("purple cross", (135, 40, 185), "cross"),
    ("orange heart", (250, 135, 20), "heart"),
    ("cyan ring", (20, 205, 215), "ring"),
    ("pink crescent", (250, 125, 190), "crescent"),
)
PROCEDURAL_CLASSNAMES: tuple[str, ...] = tuple(name for name, _, _ in PROCEDURAL_CLASSES)
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_SHAPES = tuple(shape for _, _, shape in PROCEDURAL_CLASSES)


def _rotate(points: np.ndarray, angle: float, centre: tuple[float, float]) -> list[tuple[float, float]]:
    cos, sin = math.cos(angle), math.sin(angle)
    rotated = points @ np.array([[cos, sin], [-sin, cos]])
    return [(float(x) + centre[0], float(y) + centre[1]) for x, y in rotated]


def _draw_shape(mask: ImageDraw.ImageDraw, shape: str, centre, radius: float, angle: float) -> None:
    """Draw `shape` filled with 255 into an L-mode mask (crescent also erases with 0)."""
    cx, cy = centre
    if shape == "circle":
        mask.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
    elif shape == "ring":
        width = max(1, round(radius * 0.42))
        mask.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), outline=255, width=width)
    elif shape == "crescent":
        mask.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
        ox, oy = cx + 0.45 * radius * math.cos(angle), cy + 0.45 * radius * math.sin(angle)
        inner = 0.85 * radius
        mask.ellipse((ox - inner, oy - inner, ox + inner, oy + inner), fill=0)
    else:
        mask.polygon(_rotate(_outline(shape) * radius, angle, centre), fill=255)


def _outline(shape: str) -> np.ndarray:
    """Unit-radius polygon of a shape, centred at the origin."""
    if shape == "square":
        corners = [math.pi / 4 + k * math.pi / 2 for k in range(4)]
        return np.array([(math.cos(a), math.sin(a)) for a in corners])
    if shape == "triangle":
        corners = [-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)]
        return np.array([(math.cos(a), math.sin(a)) for a in corners])
    if shape == "star":
        points = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.42
            a = -math.pi / 2 + k * math.pi / 5
            points.append((r * math.cos(a), r * math.sin(a)))
        return np.array(points)
    if shape == "cross":
        w = 0.34
        return np.array(
            [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
        )
    if shape == "heart":
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return np.stack([x, y + 2.5], axis=1) / 17.0
    raise ValueError(f"unknown shape {shape!r}")


def render_procedural_image(
    label: int, index: int, split: str = "train", seed: int = 0, image_size: int = 224
) -> Image.Image:
    """Draw image `index` of class `label` for `split` and `seed` as a PIL RGB image."""
    if not 0 <= label < len(PROCEDURAL_CLASSES):
        raise ValueError(f"label must be in 0..{len(PROCEDURAL_CLASSES) - 1}, got {label}")
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_CODES)}, got {split!r}")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be non-negative, got index={index}, seed={seed}")
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], label, index])
    # Draw at twice the size and downsample: anti-aliased edges, so tiny images still show shapes.
    canvas_size = 2 * image_size

    # Background: a desaturated linear gradient between two random greys in a random direction.
    start = rng.uniform(85, 170) + rng.uniform(-12, 12, size=3)
    end = rng.uniform(85, 170) + rng.uniform(-12, 12, size=3)
    direction = rng.uniform(0, 2 * math.pi)
    coords = np.linspace(-1, 1, canvas_size)
    ramp = (math.cos(direction) * coords[None, :] + math.sin(direction) * coords[:, None]) / math.sqrt(2) * 0.5 + 0.5
    background = start + (end - start) * ramp[..., None]
    canvas = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8), "RGB")

    # Clutter: a few small grey shapes of any kind, so shape alone is not a giveaway.
    for _ in range(int(rng.integers(2, 6))):
        grey = rng.uniform(40, 215)
        colour = tuple(int(np.clip(grey + rng.uniform(-12, 12), 0, 255)) for _ in range(3))
        radius = rng.uniform(0.05, 0.11) * canvas_size
        centre = tuple(rng.uniform(radius, canvas_size - radius, size=2))
        mask = Image.new("L", (canvas_size, canvas_size), 0)
        _draw_shape(
            ImageDraw.Draw(mask), _SHAPES[int(rng.integers(len(_SHAPES)))], centre, radius, rng.uniform(0, 2 * math.pi)
        )
        canvas.paste(colour, mask=mask)

    # The object: class shape in the class colour, jittered in brightness and per channel.
    _, base_colour, shape = PROCEDURAL_CLASSES[label]
    colour = np.array(base_colour, dtype=np.float64) * rng.uniform(0.8, 1.08) + rng.uniform(-15, 15, size=3)
    colour = tuple(int(c) for c in np.clip(colour, 0, 255))
    radius = rng.uniform(0.24, 0.36) * canvas_size
    centre = tuple(rng.uniform(radius, canvas_size - radius, size=2))
    mask = Image.new("L", (canvas_size, canvas_size), 0)
    _draw_shape(ImageDraw.Draw(mask), shape, centre, radius, rng.uniform(0, 2 * math.pi))
    canvas.paste(colour, mask=mask)

    pixels = np.asarray(canvas.resize((image_size, image_size), Image.Resampling.BOX), dtype=np.float64)
    pixels = pixels + rng.normal(0, 7, size=pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def _check_arguments(num_per_class: int, num_classes: int) -> None:
    if num_per_class < 1:
        raise ValueError(f"num_per_class must be at least 1, got {num_per_class}")
    if not 2 <= num_classes <= len(PROCEDURAL_CLASSES):
        raise ValueError(f"num_classes must be in 2..{len(PROCEDURAL_CLASSES)}, got {num_classes}")


def procedural_samples(
    split: str, num_per_class: int, num_classes: int = len(PROCEDURAL_CLASSES)
) -> tuple[Sample, ...]:
    """Samples grouped by class; a sample's path is the key "<split>/<label>/<index>"."""
    _check_arguments(num_per_class, num_classes)
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_CODES)}, got {split!r}")
    return tuple(
        Sample(f"{split}/{label}/{index}", label, PROCEDURAL_CLASSNAMES[label])
        for label in range(num_classes)
        for index in range(num_per_class)
    )


class ProceduralLoader:
    """Renders a procedural sample key ("<split>/<label>/<index>"); a class, not a closure, so that
    DataLoader workers started with spawn/forkserver can pickle it."""

    def __init__(self, seed: int, image_size: int):
        self.seed, self.image_size = seed, image_size

    # Equal loaders render equal images: the runner's evaluation cache (fastprompt.runner.eval_cache) recognises a
    # procedural set loaded again by its loader.
    def __eq__(self, other) -> bool:
        return type(other) is ProceduralLoader and (self.seed, self.image_size) == (other.seed, other.image_size)

    def __hash__(self) -> int:
        return hash((ProceduralLoader, self.seed, self.image_size))

    def __call__(self, key: str) -> Image.Image:
        try:
            split, label, index = key.split("/")
            label, index = int(label), int(index)
        except ValueError:
            raise ValueError(f"not a procedural sample key (expected '<split>/<label>/<index>'): {key!r}") from None
        return render_procedural_image(label, index, split, self.seed, self.image_size)


class ProceduralDataset(ImageListDataset):
    """Torch Dataset of procedural images: item i is (image, label) with label = i // num_per_class.

    Without a transform the image is a PIL RGB image of `image_size` pixels; pass a transform from
    transforms.py (e.g. `eval_transform(image_size)`) to get normalised tensors.
    """

    def __init__(
        self,
        split: str = "train",
        num_per_class: int = 16,
        image_size: int = 224,
        seed: int = 0,
        transform: Callable | None = None,
        num_classes: int = len(PROCEDURAL_CLASSES),
    ):
        super().__init__(
            procedural_samples(split, num_per_class, num_classes),
            transform,
            ProceduralLoader(seed, image_size),
            PROCEDURAL_CLASSNAMES[:num_classes],
        )
        self.split, self.num_per_class, self.image_size, self.seed = split, num_per_class, image_size, seed


def procedural_splits(
    num_train_per_class: int = 16,
    num_val_per_class: int = 4,
    num_test_per_class: int = 50,
    image_size: int = 224,
    seed: int = 0,
    num_classes: int = len(PROCEDURAL_CLASSES),
) -> DatasetSplits:
    """The procedural set as a `DatasetSplits` (so few-shot and base/novel work on it as on any dataset)."""
    return DatasetSplits(
        name="procedural",
        classnames=PROCEDURAL_CLASSNAMES[:num_classes],
        train=procedural_samples("train", num_train_per_class, num_classes),
        val=procedural_samples("val", num_val_per_class, num_classes) if num_val_per_class else (),
        test=procedural_samples("test", num_test_per_class, num_classes),
        template="a photo of a {}.",
        loader=ProceduralLoader(seed, image_size),
    )
