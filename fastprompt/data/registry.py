"""One entry point for every dataset: `build_dataset(name, root, **options) -> DatasetSplits`."""

from __future__ import annotations

import os

from ..keywords import accepts, closest, declared_types, plain_number, type_name
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


def _loader(canonical: str):
    """(loader function, leading positional parameters that are not options) of a canonical dataset name."""
    if canonical in BENCHMARKS:
        return _BENCHMARK_LOADERS[BENCHMARKS[canonical].kind], 2  # (info, root)
    return {"procedural": (procedural_splits, 0), "imagefolder": (load_image_folder, 1), "csv": (load_csv, 1)}[canonical]


def dataset_option_types(name: str) -> dict[str, object]:
    """The keyword options `build_dataset` accepts for `name`, each with its declared type."""
    return declared_types(*_loader(resolve_dataset_name(name)))


def dataset_options(name: str) -> list[str]:
    """The keyword options `build_dataset` accepts for `name`."""
    return list(dataset_option_types(name))


def check_dataset_options(name: str, options: dict) -> dict:
    """`options` checked before any file is read: an unknown one is named with the closest valid one, a value of the
    wrong type (num_test_per_class='abc' failed inside the loader with "'<' not supported ...") is named with its
    declared type. Returns them with numpy scalars made Python numbers."""
    canonical = resolve_dataset_name(name)
    declared = dataset_option_types(canonical)
    for option, value in options.items():
        if option not in declared:
            near = closest(option, declared)
            hint = f"; did you mean {near!r}? Its" if near else "; its"
            raise DatasetError(f"dataset {canonical!r} does not take option {option!r}{hint} options:"
                               f" {', '.join(declared) or 'none'}")
        if accepts(declared[option], value) is False:
            raise DatasetError(f"dataset {canonical!r} option {option}={value!r} is of type {type(value).__name__};"
                               f" expected {type_name(declared[option])}")
    return {option: plain_number(value) for option, value in options.items()}


def _call(function, name: str, args, options):
    return function(*args, **check_dataset_options(name, options))


def build_dataset(name: str, root: str | os.PathLike | None = None, /, **options) -> DatasetSplits:
    """Build a dataset by name.

    `name` and `root` are positional only, so that every option name is free (the csv loader's own `name`).
    Benchmarks: `root` is the folder that holds one folder per dataset (CoOp convention).
    "imagefolder": `root` is the class-folder tree; "csv": `root` is the CSV file.
    "procedural": no root; options num_train_per_class, num_val_per_class, num_test_per_class,
    image_size, seed, num_classes.
    """
    canonical = resolve_dataset_name(name)
    if canonical == "procedural":
        if root is not None:
            raise DatasetError("the procedural dataset is drawn on the fly and takes no root folder")
        return _call(procedural_splits, canonical, (), options)
    if root is None:
        raise DatasetError(f"dataset {canonical!r} needs a root folder")
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if canonical == "imagefolder":
        return _call(load_image_folder, canonical, (root,), options)
    if canonical == "csv":
        return _call(load_csv, canonical, (root,), options)
    info = BENCHMARKS[canonical]
    if not os.path.isdir(root):
        raise DatasetError(f"dataset root {root} is not a folder (it should hold the {info.folder}/ folder)")
    return _call(_BENCHMARK_LOADERS[info.kind], canonical, (info, root), options)
