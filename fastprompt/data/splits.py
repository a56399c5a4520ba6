"""The common currency of fastprompt.data: samples, a dataset's splits, and a torch Dataset over them.

Every loader (the 11 + 4 benchmark layouts, ImageFolder/CSV, the procedural set) returns one
`DatasetSplits`; few-shot sampling and the base/novel split (protocols.py) map a `DatasetSplits` to
another, so the runner handles every source the same way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image, UnidentifiedImageError


class DatasetError(ValueError):
    """A dataset cannot be built from what is on disk or in the arguments (the message says why)."""


class CorruptImageError(OSError):
    """An image file exists but cannot be decoded."""


@dataclass(frozen=True)
class Sample:
    """One labelled image. `path` is an absolute file path (procedural sets use a key instead,
    read by the split's `loader`); `classname` is the name as the split source wrote it (may hold
    "_", as in the CoOp split files)."""

    path: str
    label: int
    classname: str


def open_rgb_image(path: str) -> Image.Image:
    """Decode an image file fully into RGB; a missing or corrupt file raises an error naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # convert() forces the full decode inside the `with`
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise CorruptImageError(f"cannot decode image {path}: {error}") from error


def clean_classname(name: str) -> str:
    """The class name the text tower sees: "_" replaced by a space (as every reference trainer does)."""
    return name.replace("_", " ").strip()


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset's train/val/test lists plus what a prompt learner needs to know about it.

    classnames: label -> name as the text tower sees it ("_" already replaced by a space).
    val: empty where the protocol has none (ImageNet and its variants evaluate on test).
    template: the dataset's zero-shot prompt template ("a photo of a {}.").
    fewshot_dir: folder for few-shot sample caches, `<dataset folder>/split_fewshot` for the
        benchmark layouts (None: samples are drawn every time and not cached).
    path_prefix: folder that cached split entries are written relative to.
    class_ids: per-label folder identifiers where the layout has them (ImageNet wnids), else None.
    subset: "all", "base" or "novel" (protocols.subsample_classes); labels are re-indexed in a subset.
    fewshot: (shots, seed) once protocols.sample_few_shot has drawn the train/val samples, else None.
    loader: turns a sample's path into a PIL RGB image.
    """

    name: str
    classnames: tuple[str, ...]
    train: tuple[Sample, ...]
    val: tuple[Sample, ...]
    test: tuple[Sample, ...]
    template: str = "a photo of a {}."
    fewshot_dir: str | None = None
    path_prefix: str = ""
    class_ids: tuple[str, ...] | None = None
    subset: str = "all"
    fewshot: tuple[int, int] | None = None
    loader: Callable[[str], Image.Image] = field(default=open_rgb_image, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def split(self, which: str) -> tuple[Sample, ...]:
        if which not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {which!r}")
        return getattr(self, which)

    def prompts(self) -> list[str]:
        """The dataset template filled with every class name, in label order."""
        return [self.template.format(name) for name in self.classnames]

    def dataset(self, which: str, transform: Callable | None = None) -> ImageListDataset:
        """A torch Dataset over one split, returning (transform(image), label)."""
        return ImageListDataset(self.split(which), transform, self.loader, self.classnames)


class ImageListDataset(torch.utils.data.Dataset):
    """(image, label) over a list of samples. Without a transform the image is a PIL RGB image
    (torchvision convention); pass a transform (transforms.py) to get tensors."""

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable | None = None,
        loader: Callable[[str], Image.Image] = open_rgb_image,
        classnames: Sequence[str] | None = None,
    ):
        self.samples = tuple(samples)
        self.transform = transform
        self.loader = loader
        self.classnames = tuple(classnames) if classnames is not None else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        image = self.loader(sample.path)
        if self.transform is not None:
            image = self.transform(image)
        return image, sample.label


def classnames_from_samples(splits: Iterable[Sequence[Sample]], source: str) -> tuple[str, ...]:
    """Label -> raw class name, checking that labels are 0..C-1 and each has exactly one name."""
    names: dict[int, str] = {}
    for samples in splits:
        for sample in samples:
            known = names.setdefault(sample.label, sample.classname)
            if known != sample.classname:
                raise DatasetError(
                    f"{source}: label {sample.label} has two class names: {known!r} and {sample.classname!r}"
                )
    if not names:
        raise DatasetError(f"{source}: no samples")
    missing = sorted(set(range(max(names) + 1)) - set(names))
    if missing or min(names) < 0:
        raise DatasetError(
            f"{source}: labels must be 0..C-1 with every label present; "
            f"missing {missing[:20]}{' ...' if len(missing) > 20 else ''}, smallest {min(names)}"
        )
    return tuple(names[label] for label in range(len(names)))


def read_split_json(path: str, path_prefix: str) -> dict[str, tuple[Sample, ...]]:
    """Read a CoOp split file: {"train"|"val"|"test": [[relative path, label, classname], ...]}.

    Paths are joined to `path_prefix`. A malformed file raises an error naming the file, the key
    and the entry.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            content = json.load(handle)
    except json.JSONDecodeError as error:
        raise DatasetError(f"split file {path} is not valid JSON: {error}") from None
    if not isinstance(content, dict):
        raise DatasetError(f"split file {path}: expected a JSON object with 'train', 'val', 'test'")
    result = {}
    for key in ("train", "val", "test"):
        if key not in content:
            raise DatasetError(f"split file {path} has no {key!r} list (keys: {sorted(content)})")
        entries = content[key]
        if not isinstance(entries, list):
            raise DatasetError(f"split file {path}: {key!r} must be a list")
        samples = []
        for position, entry in enumerate(entries):
            if (
                not isinstance(entry, list | tuple)
                or len(entry) != 3
                or not isinstance(entry[0], str)
                or isinstance(entry[1], bool)
                or not isinstance(entry[1], int | str)
                or not isinstance(entry[2], str)
            ):
                raise DatasetError(f"split file {path}: {key}[{position}] = {entry!r} is not [path, label, classname]")
            try:
                label = int(entry[1])
            except ValueError:
                raise DatasetError(
                    f"split file {path}: {key}[{position}] label {entry[1]!r} is not an integer"
                ) from None
            samples.append(Sample(os.path.join(path_prefix, entry[0]), label, entry[2]))
        result[key] = tuple(samples)
    return result


def relative_entries(samples: Iterable[Sample], path_prefix: str) -> list[list]:
    """Samples as CoOp split entries [path relative to path_prefix, label, classname]."""
    entries = []
    for sample in samples:
        path = os.path.relpath(sample.path, path_prefix) if path_prefix else sample.path
        entries.append([path.replace(os.sep, "/"), sample.label, sample.classname])
    return entries


def write_json_atomic(path: str, content) -> None:
    """Write JSON through a temporary file and a rename, so a crash never leaves half a file."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(content, handle, indent=1)
    os.replace(temporary, path)
