"""The ten non-ImageNet benchmarks in the CoOp layouts.

Nine read a CoOp split file (`split_zhou_<Name>.json`, the published splits: use it, its class names
are final). FGVCAircraft reads its official variant lists. Where the split file is absent, a split
can be generated from the raw layout with the CoOp rules (50/20/30 per class, or the official
train/test with 80/20 train/val), only when asked for (`generate_split=True`): a generated split
does not reproduce published numbers. Flowers and Cars keep their raw labels in MATLAB files, so
they need the split file.
"""

from __future__ import annotations

import os
import random
from collections import defaultdict

from .classnames import (
    CALTECH101_IGNORED,
    CALTECH101_RENAMES,
    EUROSAT_RENAMES,
    pets_breed,
    sun397_classname,
    ucf101_classname,
)
from .files import list_images, list_subdirs, require_dir, require_file, shorten
from .layouts import DatasetInfo
from .splits import DatasetError, DatasetSplits, Sample, classnames_from_samples, clean_classname, read_split_json


def _splits(info: DatasetInfo, dataset_dir: str, image_dir: str, train, val, test) -> DatasetSplits:
    raw = classnames_from_samples((train, val, test), f"{info.title} split")
    return DatasetSplits(
        name=info.name,
        classnames=tuple(clean_classname(name) for name in raw),
        train=tuple(train),
        val=tuple(val),
        test=tuple(test),
        template=info.template,
        fewshot_dir=os.path.join(dataset_dir, "split_fewshot"),
        path_prefix=image_dir,
    )


def _check_files_exist(info: DatasetInfo, split_path: str, parts) -> None:
    missing = [s.path for samples in parts for s in samples if not os.path.isfile(s.path)]
    if missing:
        raise DatasetError(
            f"{split_path} names {len(missing)} files that do not exist: {shorten(missing, 5)}; {info.hint()}"
        )


def load_split_file_dataset(
    info: DatasetInfo, root: str, generate_split: bool = False, split_seed: int = 1, verify_files: bool = True
) -> DatasetSplits:
    """A CoOp-split dataset. verify_files checks up front that every listed image exists."""
    dataset_dir = info.dataset_dir(root)
    image_dir = os.path.join(dataset_dir, info.image_dir) if info.image_dir else dataset_dir
    split_path = os.path.join(dataset_dir, info.split_file)
    if os.path.isfile(split_path):
        parts = read_split_json(split_path, image_dir)
        train, val, test = parts["train"], parts["val"], parts["test"]
        if verify_files:
            _check_files_exist(info, split_path, (train, val, test))
        return _splits(info, dataset_dir, image_dir, train, val, test)
    if not generate_split:
        raise DatasetError(
            f"{info.title} split file not found: {split_path}; the published CoOp file (the CoOp DATASETS.md links "
            f"it) reproduces published numbers, or dataset.generate_split=true (generate_split=True in Python) draws "
            f"a new random split from the raw layout, whose results are not comparable; {info.hint()}"
        )
    rng = random.Random(split_seed)
    generator = _GENERATORS.get(info.name)
    if generator is None:
        raise DatasetError(
            f"{info.title} cannot be split without {info.split_file}: its raw labels are in MATLAB files. "
            f"Place the published split file at {split_path}."
        )
    train, val, test = generator(info, dataset_dir, image_dir, rng)
    if verify_files:
        _check_files_exist(info, f"the {info.title} annotation lists", (train, val, test))
    return _splits(info, dataset_dir, image_dir, train, val, test)


def split_by_class(samples, rng: random.Random, fractions=(0.5, 0.2)) -> tuple[list, list, list]:
    """CoOp's per-class random split: shuffle each class; round(n*p_train) train, round(n*p_val) val, rest test.

    With fractions of length 1 (p_val) the class is split into (train, val) only, val first (CoOp's
    split_trainval); the third list is then empty.
    """
    by_label = defaultdict(list)
    for sample in samples:
        by_label[sample.label].append(sample)
    train, val, test = [], [], []
    for items in by_label.values():
        items = list(items)
        rng.shuffle(items)
        if len(fractions) == 1:
            n_val = round(len(items) * fractions[0])
            if n_val < 1:
                raise DatasetError(
                    f"class {items[0].classname!r} has {len(items)} images: too few to hold out a val image"
                )
            val.extend(items[:n_val])
            train.extend(items[n_val:])
            continue
        n_train, n_val = round(len(items) * fractions[0]), round(len(items) * fractions[1])
        if n_train < 1 or n_val < 1 or len(items) - n_train - n_val < 1:
            raise DatasetError(
                f"class {items[0].classname!r} has {len(items)} images: too few for a train/val/test split"
            )
        train.extend(items[:n_train])
        val.extend(items[n_train : n_train + n_val])
        test.extend(items[n_train + n_val :])
    return train, val, test


def _folder_classes(info, dataset_dir, image_dir, rng, ignored=(), renames=None):
    require_dir(image_dir, f"{info.title} image folder", info.hint())
    categories = [c for c in list_subdirs(image_dir) if c not in ignored]
    if not categories:
        raise DatasetError(f"{image_dir} holds no class folders")
    samples = []
    for label, category in enumerate(categories):
        name = (renames or {}).get(category, category)
        folder = os.path.join(image_dir, category)
        samples.extend(Sample(os.path.join(folder, image), label, name) for image in list_images(folder))
    return split_by_class(samples, rng)


def _caltech101(info, dataset_dir, image_dir, rng):
    return _folder_classes(info, dataset_dir, image_dir, rng, CALTECH101_IGNORED, CALTECH101_RENAMES)


def _eurosat(info, dataset_dir, image_dir, rng):
    return _folder_classes(info, dataset_dir, image_dir, rng, renames=EUROSAT_RENAMES)


def _plain_folders(info, dataset_dir, image_dir, rng):
    return _folder_classes(info, dataset_dir, image_dir, rng)


def _read_lines(path: str, info: DatasetInfo) -> list[str]:
    require_file(path, f"{info.title} annotation file", info.hint())
    with open(path, encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]


def _pets(info, dataset_dir, image_dir, rng):
    def read(name):
        samples = []
        for line in _read_lines(os.path.join(dataset_dir, "annotations", name), info):
            if line.startswith("#"):
                continue
            fields = line.split()
            stem, label = fields[0], int(fields[1]) - 1
            samples.append(Sample(os.path.join(image_dir, stem + ".jpg"), label, pets_breed(stem)))
        return samples

    train, val, _ = split_by_class(read("trainval.txt"), rng, fractions=(0.2,))
    return train, val, read("test.txt")


def _sun397(info, dataset_dir, image_dir, rng):
    categories = [line.lstrip("/") for line in _read_lines(os.path.join(dataset_dir, "ClassName.txt"), info)]
    label_of = {category: label for label, category in enumerate(categories)}

    def read(name):
        samples = []
        for line in _read_lines(os.path.join(dataset_dir, name), info):
            relative = line.lstrip("/")
            category = os.path.dirname(relative)
            if category not in label_of:
                raise DatasetError(f"{name}: {line!r} is in no category of ClassName.txt")
            samples.append(Sample(os.path.join(image_dir, relative), label_of[category], sun397_classname(category)))
        return samples

    train, val, _ = split_by_class(read("Training_01.txt"), rng, fractions=(0.2,))
    return train, val, read("Testing_01.txt")


def _ucf101(info, dataset_dir, image_dir, rng):
    lists = os.path.join(dataset_dir, "ucfTrainTestlist")
    label_of = {}
    for line in _read_lines(os.path.join(lists, "classInd.txt"), info):
        number, action = line.split()
        label_of[action] = int(number) - 1

    def read(name):
        samples = []
        for line in _read_lines(os.path.join(lists, name), info):
            action, video = line.split()[0].split("/")
            folder = ucf101_classname(action)  # mid-frame folders use the split-file form of the name
            frame = os.path.splitext(video)[0] + ".jpg"
            samples.append(Sample(os.path.join(image_dir, folder, frame), label_of[action], folder))
        return samples

    train, val, _ = split_by_class(read("trainlist01.txt"), rng, fractions=(0.2,))
    return train, val, read("testlist01.txt")


_GENERATORS = {
    "caltech101": _caltech101,
    "dtd": _plain_folders,
    "food101": _plain_folders,
    "eurosat": _eurosat,
    "oxford_pets": _pets,
    "sun397": _sun397,
    "ucf101": _ucf101,
}


def load_aircraft(info: DatasetInfo, root: str, verify_files: bool = True) -> DatasetSplits:
    """FGVCAircraft from its official variant lists (lines '<image id> <variant name>')."""
    dataset_dir = info.dataset_dir(root)
    image_dir = os.path.join(dataset_dir, info.image_dir)
    variants = _read_lines(os.path.join(dataset_dir, "variants.txt"), info)
    label_of = {name: label for label, name in enumerate(variants)}
    if len(label_of) != len(variants):
        raise DatasetError(f"{dataset_dir}/variants.txt names a variant twice")
    parts = {}
    for split in ("train", "val", "test"):
        list_name = f"images_variant_{split}.txt"
        samples = []
        for line in _read_lines(os.path.join(dataset_dir, list_name), info):
            image_id, _, variant = line.partition(" ")
            if variant not in label_of:
                raise DatasetError(f"{list_name}: variant {variant!r} of image {image_id} is not in variants.txt")
            samples.append(Sample(os.path.join(image_dir, image_id + ".jpg"), label_of[variant], variant))
        parts[split] = samples
    if verify_files:
        _check_files_exist(info, os.path.join(dataset_dir, "images_variant_*.txt"), parts.values())
    return DatasetSplits(
        name=info.name,
        classnames=tuple(clean_classname(v) for v in variants),
        train=tuple(parts["train"]),
        val=tuple(parts["val"]),
        test=tuple(parts["test"]),
        template=info.template,
        fewshot_dir=os.path.join(dataset_dir, "split_fewshot"),
        path_prefix=image_dir,
    )
