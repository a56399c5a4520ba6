"""Users' own data: a folder of class folders, or a CSV file. No registry, no split file to write.

ImageFolder layouts:
    <folder>/<class>/*.jpg                        one pool, split per class (default 50/20/30, seeded)
    <folder>/train/<class>/*.jpg  (+ val/, test/)  the given splits; a lone val/ is the test split
CSV: a header with `path` and `label` and/or `classname` (optional `split`: train/val/test), fields separated
by ',', ';' or a tab, UTF-8; paths are relative to the CSV's folder unless `image_root` is given.

Class names are the folder names / CSV names ("_" read as a space) unless `classnames` maps them:
a dict or a JSON file {folder or label: name}.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random

from .benchmarks import split_by_class
from .files import list_images, list_subdirs, read_user_text, shorten
from .splits import DatasetError, DatasetSplits, Sample, classnames_from_samples, clean_classname

_SPLIT_NAMES = ("train", "val", "test")


def _name_map(classnames) -> dict[str, str]:
    if classnames is None:
        return {}
    if isinstance(classnames, str | os.PathLike):
        try:
            classnames = json.loads(read_user_text(classnames, "class-name mapping"))
        except (OSError, json.JSONDecodeError) as error:
            raise DatasetError(f"cannot read class-name mapping {classnames}: {error}") from None
    if not isinstance(classnames, dict):
        raise DatasetError("classnames must be a dict or a JSON file mapping folder/label -> class name")
    return {str(key): str(value) for key, value in classnames.items()}


def _fractions(val_fraction: float, test_fraction: float) -> tuple[float, float]:
    if not (val_fraction > 0 and test_fraction > 0 and val_fraction + test_fraction < 1):
        raise DatasetError(
            f"val_fraction and test_fraction must be positive with a sum below 1, got {val_fraction}, {test_fraction}"
        )
    return (1 - val_fraction - test_fraction, val_fraction)


def _check_mapping_keys(mapping: dict[str, str], keys, source: str) -> None:
    unknown = sorted(set(mapping) - set(keys))
    if unknown:
        raise DatasetError(f"class-name mapping names classes that {source} does not have: {shorten(unknown)}")


def load_image_folder(
    root: str,
    name: str = "imagefolder",
    template: str = "a photo of a {}.",
    classnames=None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.3,
    split_seed: int = 1,
    fewshot_dir: str | None = None,
) -> DatasetSplits:
    """A dataset from class folders (see the module docstring for the two layouts)."""
    if not os.path.isdir(root):
        raise DatasetError(f"image folder not found: {root} is not a folder")
    mapping = _name_map(classnames)
    present = [s for s in _SPLIT_NAMES if os.path.isdir(os.path.join(root, s))]
    if "train" in present:
        classes = list_subdirs(os.path.join(root, "train"))
        if not classes:
            raise DatasetError(f"{root}/train holds no class folders")
        label_of = {c: i for i, c in enumerate(classes)}
        parts = {s: [] for s in _SPLIT_NAMES}
        for split in present:
            split_dir = os.path.join(root, split)
            extra = sorted(set(list_subdirs(split_dir)) - set(classes))
            if extra:
                raise DatasetError(f"{split_dir} has class folders that train/ does not: {shorten(extra)}")
            for folder in list_subdirs(split_dir):
                class_dir = os.path.join(split_dir, folder)
                parts[split].extend(
                    Sample(os.path.join(class_dir, f), label_of[folder], folder) for f in list_images(class_dir)
                )
        if not parts["test"] and parts["val"]:
            parts["test"], parts["val"] = parts["val"], []
        train, val, test = parts["train"], parts["val"], parts["test"]
    else:
        classes = list_subdirs(root)
        if not classes:
            raise DatasetError(
                f"{root} holds no class folders (expected <folder>/<class>/*.jpg or <folder>/train/<class>/)"
            )
        samples = []
        for label, folder in enumerate(classes):
            class_dir = os.path.join(root, folder)
            images = list_images(class_dir)
            if not images:
                raise DatasetError(f"class folder {class_dir} holds no images")
            samples.extend(Sample(os.path.join(class_dir, f), label, folder) for f in images)
        train, val, test = split_by_class(samples, random.Random(split_seed), _fractions(val_fraction, test_fraction))
    _check_mapping_keys(mapping, classes, root)
    if not train:
        raise DatasetError(f"{root}: the train split holds no images")
    return DatasetSplits(
        name=name,
        classnames=tuple(clean_classname(mapping.get(c, c)) for c in classes),
        train=tuple(train),
        val=tuple(val),
        test=tuple(test),
        template=template,
        fewshot_dir=fewshot_dir,
        path_prefix=root,
        class_ids=tuple(classes),
    )


def _image_path(image_root: str, listed: str) -> str:
    """A CSV's path under `image_root`. A relative path written on Windows (imgs\\cat\\1.jpg) names the same file
    here with '/' between its parts, taken when the path as written is no file (a '\\' is legal in a POSIX name)."""
    path = os.path.join(image_root, listed)
    if os.sep == "/" and "\\" in listed and not os.path.exists(path):
        converted = os.path.join(image_root, listed.replace("\\", "/"))
        if os.path.exists(converted):
            return converted
    return path


def _delimiter(header: str) -> str:
    """The separator whose split of the header names a 'path' column: ',' or, as spreadsheets write CSV where the
    decimal mark is a comma (Excel in most of Europe), ';', or a tab. ',' when none does (the header's error)."""
    for delimiter in (",", ";", "\t"):
        if "path" in (field.strip() for field in next(csv.reader([header], delimiter=delimiter), [])):
            return delimiter
    return ","


def load_csv(
    path: str,
    name: str | None = None,
    template: str = "a photo of a {}.",
    classnames=None,
    image_root: str | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.3,
    split_seed: int = 1,
    fewshot_dir: str | None = None,
) -> DatasetSplits:
    """A dataset from a CSV file with columns path + label and/or classname (+ optional split)."""
    if not os.path.isfile(path):
        raise DatasetError(f"CSV file not found: {path}")
    image_root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    mapping = _name_map(classnames)
    text = read_user_text(path, "CSV file")
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=_delimiter(text.partition("\n")[0]))
    columns = [c.strip() for c in reader.fieldnames or []]
    if "path" not in columns or not ({"label", "classname"} & set(columns)):
        raise DatasetError(
            f"{path}: the header must have a 'path' column and 'label' and/or 'classname'; found {columns}"
        )
    rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    if not rows:
        raise DatasetError(f"{path} has a header but no rows")
    if "label" in columns:
        labels = []
        for line, row in enumerate(rows, start=2):
            try:
                labels.append(int(row["label"]))
            except ValueError:
                raise DatasetError(f"{path}, line {line}: label {row['label']!r} is not an integer") from None
        if "classname" in columns:
            names = [row["classname"] for row in rows]
        else:
            missing = sorted({str(label) for label in labels} - set(mapping))
            if missing:
                raise DatasetError(
                    f"{path} has labels but no 'classname' column, and `classnames` does not name labels "
                    f"{shorten(missing)}"
                )
            names = [mapping[str(label)] for label in labels]
    else:
        names = [row["classname"] for row in rows]
        order = {n: i for i, n in enumerate(sorted(set(names)))}
        labels = [order[n] for n in names]
    samples = [
        Sample(_image_path(image_root, row["path"]), label, n)
        for row, label, n in zip(rows, labels, names, strict=True)
    ]
    raw = classnames_from_samples([samples], path)
    if "split" in columns:
        parts = {s: [] for s in _SPLIT_NAMES}
        for line, (row, sample) in enumerate(zip(rows, samples, strict=True), start=2):
            if row["split"] not in parts:
                raise DatasetError(f"{path}, line {line}: split {row['split']!r} is not one of train, val, test")
            parts[row["split"]].append(sample)
        train, val, test = parts["train"], parts["val"], parts["test"]
    else:
        train, val, test = split_by_class(samples, random.Random(split_seed), _fractions(val_fraction, test_fraction))
    if not train:
        raise DatasetError(f"{path}: the train split holds no images")
    _check_mapping_keys(mapping, [*raw, *(str(label) for label in range(len(raw)))], path)
    if "label" in columns and "classname" not in columns:
        final = list(raw)  # already taken from the mapping
    else:
        final = [mapping.get(n, mapping.get(str(label), n)) for label, n in enumerate(raw)]
    return DatasetSplits(
        name=name or os.path.splitext(os.path.basename(path))[0],
        classnames=tuple(clean_classname(n) for n in final),
        train=tuple(train),
        val=tuple(val),
        test=tuple(test),
        template=template,
        fewshot_dir=fewshot_dir,
        path_prefix=image_root,
    )
