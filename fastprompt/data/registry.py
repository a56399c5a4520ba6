"""One entry point for every dataset: `build_dataset(name, root, **options) -> DatasetSplits`."""

from __future__ import annotations

import inspect
import os

from .benchmarks import load_aircraft, load_split_file_dataset
from .custom import load_csv, load_image_folder
from .imagenet import load_imagenet, load_imagenet_folders, load_imagenetv2
from .layouts import BENCHMARKS, resolve_dataset_name
from .procedural import procedural_splits
from .splits import DatasetError, DatasetSplits

_BENCHMARK_LOADERS = {
    "zhou": load_split_file_dataset,
    "aircraft": load_aircraft,
    "imagenet": load_imagenet,
    "imagenetv2": load_imagenetv2,
    "imagenet_folders": load_imagenet_folders,
}


def _option_names(function, skip: int) -> list[str]:
    return list(inspect.signature(function).parameters)[skip:]


def _call(function, name: str, skip: int, args, options):
    allowed = _option_names(function, skip)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise DatasetError(f"dataset {name!r} does not take option(s) {unknown}; its options: {allowed or 'none'}")
    return function(*args, **options)


def dataset_options(name: str) -> list[str]:
    """The keyword options `build_dataset` accepts for `name`."""
    canonical = resolve_dataset_name(name)
    if canonical in BENCHMARKS:
        return _option_names(_BENCHMARK_LOADERS[BENCHMARKS[canonical].kind], 2)
    return {
        "procedural": _option_names(procedural_splits, 0),
        "imagefolder": _option_names(load_image_folder, 1),
        "csv": _option_names(load_csv, 1),
    }[canonical]


def build_dataset(name: str, root: str | os.PathLike | None = None, **options) -> DatasetSplits:
    """Build a dataset by name.

    Benchmarks: `root` is the folder that holds one folder per dataset (CoOp convention).
    "imagefolder": `root` is the class-folder tree; "csv": `root` is the CSV file.
    "procedural": no root; options num_train_per_class, num_val_per_class, num_test_per_class,
    image_size, seed, num_classes.
    """
    canonical = resolve_dataset_name(name)
    if canonical == "procedural":
        if root is not None:
            raise DatasetError("the procedural dataset is drawn on the fly and takes no root folder")
        return _call(procedural_splits, canonical, 0, (), options)
    if root is None:
        raise DatasetError(f"dataset {canonical!r} needs a root folder")
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if canonical == "imagefolder":
        return _call(load_image_folder, canonical, 1, (root,), options)
    if canonical == "csv":
        return _call(load_csv, canonical, 1, (root,), options)
    info = BENCHMARKS[canonical]
    if not os.path.isdir(root):
        raise DatasetError(f"dataset root {root} is not a folder (it should hold the {info.folder}/ folder)")
    return _call(_BENCHMARK_LOADERS[info.kind], canonical, 2, (info, root), options)
