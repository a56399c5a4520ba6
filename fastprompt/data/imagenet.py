"""ImageNet and its four test-only variants in the CoOp layouts (see layouts.py for the trees).

Labels follow Dassl: the index of the class folder in sorted wnid order (ImageNetV2: the folder
number, which indexes classnames.txt lines). Unlike Dassl, a class folder that is missing is an
error naming it, rather than a silent shift of every later label (the "label 998 vs 991 logits"
class of bugs), and images inside a folder are taken in sorted order.
"""

from __future__ import annotations

import os

from .classnames import read_imagenet_classnames
from .files import list_images, list_subdirs, require_dir, require_file, shorten
from .layouts import DatasetInfo
from .splits import DatasetError, DatasetSplits, Sample, clean_classname


def _classnames(info: DatasetInfo, dataset_dir: str):
    path = os.path.join(dataset_dir, "classnames.txt")
    require_file(path, f"{info.title} class-name file", info.hint())
    try:
        return read_imagenet_classnames(path)
    except ValueError as error:
        raise DatasetError(str(error)) from None


def read_class_folders(
    split_dir: str, wnids: list[str], names: dict[str, str], info: DatasetInfo
) -> tuple[Sample, ...]:
    """Samples from `split_dir/<wnid>/*`, label = position of the wnid in `wnids`.

    Every wnid must have a non-empty folder and every folder must be one of `wnids`.
    """
    require_dir(split_dir, f"{info.title} image folder", info.hint())
    folders = list_subdirs(split_dir)
    relative = os.path.relpath(split_dir, os.path.dirname(os.path.dirname(split_dir)))
    if not folders and list_images(split_dir):
        raise DatasetError(
            f"{split_dir} holds image files directly instead of one folder per class; sort them into "
            f"<wnid>/ folders first (for ImageNet val, the usual valprep.sh script does this).; {info.hint()}"
        )
    missing = [w for w in wnids if w not in set(folders)]
    if missing:
        raise DatasetError(
            f"{relative}: found {len(wnids) - len(missing)}/{len(wnids)} class folders; "
            f"missing: {shorten(missing)}; {info.hint()}"
        )
    unknown = sorted(set(folders) - set(wnids))
    if unknown:
        raise DatasetError(f"{relative}: class folders not named in classnames.txt: {shorten(unknown)}")
    samples = []
    for label, wnid in enumerate(wnids):
        folder = os.path.join(split_dir, wnid)
        images = list_images(folder)
        if not images:
            raise DatasetError(f"{relative}/{wnid}: class folder holds no images")
        samples.extend(Sample(os.path.join(folder, image), label, names[wnid]) for image in images)
    return tuple(samples)


def load_imagenet(info: DatasetInfo, root: str) -> DatasetSplits:
    """ImageNet: train = images/train, test = images/val (the standard practice; no val split)."""
    dataset_dir = info.dataset_dir(root)
    names = _classnames(info, dataset_dir)
    wnids = sorted(names)
    image_dir = os.path.join(dataset_dir, info.image_dir)
    train = read_class_folders(os.path.join(image_dir, "train"), wnids, names, info)
    test = read_class_folders(os.path.join(image_dir, "val"), wnids, names, info)
    return DatasetSplits(
        name=info.name,
        classnames=tuple(clean_classname(names[w]) for w in wnids),
        train=train,
        val=(),
        test=test,
        template=info.template,
        fewshot_dir=os.path.join(dataset_dir, "split_fewshot"),
        path_prefix=image_dir,
        class_ids=tuple(wnids),
    )


def load_imagenet_folders(info: DatasetInfo, root: str, check_classes: bool = True) -> DatasetSplits:
    """ImageNet-Sketch, -A, -R (test only): one folder per wnid, names from classnames.txt.

    A and R keep 200 classes and are evaluated with only those names. With check_classes the folder
    set must be exactly the published one (all 1000 classnames.txt wnids for Sketch, the 200 of
    IMAGENET_A_WNIDS / IMAGENET_R_WNIDS for A / R); without it, whatever class folders exist are used.
    """
    dataset_dir = info.dataset_dir(root)
    names = _classnames(info, dataset_dir)
    image_dir = os.path.join(dataset_dir, info.image_dir)
    require_dir(image_dir, f"{info.title} image folder", info.hint())
    if check_classes:
        wnids = list(info.expected_wnids) if info.expected_wnids else sorted(names)
    else:
        wnids = list_subdirs(image_dir)
    not_named = [w for w in wnids if w not in names]
    if not_named:
        raise DatasetError(
            f"{dataset_dir}/classnames.txt does not name these {info.title} classes: {shorten(not_named)}"
        )
    test = read_class_folders(image_dir, wnids, names, info)
    return DatasetSplits(
        name=info.name,
        classnames=tuple(clean_classname(names[w]) for w in wnids),
        train=(),
        val=(),
        test=test,
        template=info.template,
        path_prefix=image_dir,
        class_ids=tuple(wnids),
    )


def load_imagenetv2(info: DatasetInfo, root: str) -> DatasetSplits:
    """ImageNetV2 matched-frequency (test only): folder i holds class i of classnames.txt (file order)."""
    dataset_dir = info.dataset_dir(root)
    names = _classnames(info, dataset_dir)
    wnids = list(names)
    image_dir = os.path.join(dataset_dir, info.image_dir)
    require_dir(image_dir, f"{info.title} image folder", info.hint())
    folders = set(list_subdirs(image_dir))
    expected = [str(label) for label in range(len(wnids))]
    missing = [f for f in expected if f not in folders]
    if missing:
        raise DatasetError(
            f"{info.folder}/{info.image_dir}: found {len(expected) - len(missing)}/{len(expected)} class folders; "
            f"missing: {shorten(missing)}; {info.hint()}"
        )
    samples = []
    for label, folder in enumerate(expected):
        class_dir = os.path.join(image_dir, folder)
        samples.extend(
            Sample(os.path.join(class_dir, image), label, names[wnids[label]]) for image in list_images(class_dir)
        )
    return DatasetSplits(
        name=info.name,
        classnames=tuple(clean_classname(names[w]) for w in wnids),
        train=(),
        val=(),
        test=tuple(samples),
        template=info.template,
        path_prefix=image_dir,
        class_ids=tuple(wnids),
    )
