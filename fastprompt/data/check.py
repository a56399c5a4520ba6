"""`check_layout(name, root)`: say precisely what is missing or corrupt in a dataset folder.

Loaders stop at the first problem; the check collects all of them (missing folders and files,
split files that name absent images, class folders that do not match classnames.txt, images that do
not decode) so that one run of `fastprompt prepare <dataset> --root DIR` lists everything to fix.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field

from PIL import Image

from .classnames import flowers_classnames, read_imagenet_classnames
from .files import list_images, list_subdirs, shorten
from .layouts import BENCHMARKS, DatasetInfo, resolve_dataset_name
from .registry import build_dataset
from .splits import DatasetError, classnames_from_samples, read_split_json

VERIFY_MODES = ("sample", "all", "none")


@dataclass
class LayoutReport:
    """Result of a layout check. `problems` make the dataset unusable or wrong; `warnings` mark
    deviations from the published setup (e.g. split sizes that differ from the CoOp files)."""

    dataset: str
    dataset_dir: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    images_checked: int = 0
    images_total: int = 0
    expected_layout: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        status = "OK" if self.ok else f"{len(self.problems)} problem(s)"
        lines = [f"{self.dataset} at {self.dataset_dir}: {status}"]
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  warning: {w}" for w in self.warnings]
        lines += [f"  {n}" for n in self.notes]
        if not self.ok and self.expected_layout:
            lines.append("expected layout:")
            lines += [f"  {line}" for line in self.expected_layout.splitlines()]
        return "\n".join(lines)


def _verify_images(report: LayoutReport, paths: list[str], mode: str, max_images: int, seed: int) -> None:
    report.images_total = len(paths)
    if not paths:
        report.notes.append("no listed image is on disk: nothing to decode")
        return
    if mode == "none":
        report.notes.append(f"{len(paths)} images on disk; image decoding not checked")
        return
    chosen = (
        sorted(paths)
        if mode == "all" or len(paths) <= max_images
        else sorted(random.Random(seed).sample(paths, max_images))
    )
    corrupt = []
    for path in chosen:
        try:
            with Image.open(path) as image:
                image.load()  # full decode: catches truncated files that Image.verify() accepts
        except Exception as error:  # noqa: BLE001 - any decoder failure means the file is unusable
            corrupt.append(f"{path} ({type(error).__name__}: {error})")
    report.images_checked = len(chosen)
    # Only images on disk are decoded; those missing are the layout's problems.
    scope = ("every image on disk" if len(chosen) == len(paths)
             else f"a random sample of {len(chosen)} of the {len(paths)} images on disk")
    report.notes.append(f"decoded {scope}; {len(corrupt)} failed")
    if corrupt:
        report.problems.append(
            f"{len(corrupt)} of {len(chosen)} checked images are corrupt or unreadable: {shorten(corrupt, 5)}"
        )


def _check_split_file(report: LayoutReport, info: DatasetInfo, dataset_dir: str) -> list[str]:
    image_dir = os.path.join(dataset_dir, info.image_dir) if info.image_dir else dataset_dir
    split_path = os.path.join(dataset_dir, info.split_file)
    if info.image_dir and not os.path.isdir(image_dir):
        report.problems.append(f"image folder {image_dir} does not exist")
    if not os.path.isfile(split_path):
        report.problems.append(
            f"split file {split_path} does not exist (use the published CoOp {info.split_file}; "
            "build_dataset(..., generate_split=True) draws a non-comparable random split instead)"
        )
        return []
    try:
        parts = read_split_json(split_path, image_dir)
        classnames = classnames_from_samples(parts.values(), split_path)
    except DatasetError as error:
        report.problems.append(str(error))
        return []
    samples = [s for split in ("train", "val", "test") for s in parts[split]]
    missing = [s.path for s in samples if not os.path.isfile(s.path)]
    if missing:
        shown = [os.path.relpath(p, image_dir) for p in missing]
        report.problems.append(f"split file names {len(missing)} files that do not exist: {shorten(shown)}")
    counts = tuple(len(parts[s]) for s in ("train", "val", "test"))
    report.notes.append(f"split file: {len(classnames)} classes, train/val/test = {counts[0]}/{counts[1]}/{counts[2]}")
    if len(classnames) != info.num_classes:
        report.warnings.append(f"split file has {len(classnames)} classes; the published split has {info.num_classes}")
    if info.counts and counts != info.counts:
        report.warnings.append(
            f"split sizes {counts[0]}/{counts[1]}/{counts[2]} differ from the published "
            f"{info.counts[0]}/{info.counts[1]}/{info.counts[2]}: not the published CoOp split file"
        )
    if info.name == "oxford_flowers":
        _compare_flowers_names(report, dataset_dir, classnames)
    return [s.path for s in samples if os.path.isfile(s.path)]


def _compare_flowers_names(report: LayoutReport, dataset_dir: str, classnames: tuple[str, ...]) -> None:
    """The split file's names should be cat_to_name.json's (label = category - 1) where both exist."""
    path = os.path.join(dataset_dir, "cat_to_name.json")
    if not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as handle:
            reference = flowers_classnames(json.load(handle))
    except (ValueError, AttributeError) as error:
        report.warnings.append(f"{path} is not a category -> name mapping: {error}")
        return
    differ = [
        f"{label}: {ours!r} vs {theirs!r}"
        for label, (ours, theirs) in enumerate(zip(classnames, reference, strict=False))
        if ours != theirs
    ]
    if differ or len(classnames) != len(reference):
        report.warnings.append(
            f"split file names differ from cat_to_name.json ({len(reference)} names) at labels: {shorten(differ, 5)}"
        )


def _check_aircraft(report: LayoutReport, info: DatasetInfo, root: str, dataset_dir: str) -> list[str]:
    needed = ["variants.txt", "images_variant_train.txt", "images_variant_val.txt", "images_variant_test.txt"]
    absent = [n for n in needed if not os.path.isfile(os.path.join(dataset_dir, n))]
    if absent:
        report.problems.append(f"missing files: {', '.join(absent)}")
        return []
    try:
        splits = build_dataset(info.name, root, verify_files=False)
    except DatasetError as error:
        report.problems.append(str(error))
        return []
    samples = [*splits.train, *splits.val, *splits.test]
    missing = [os.path.basename(s.path) for s in samples if not os.path.isfile(s.path)]
    if missing:
        report.problems.append(
            f"the variant lists name {len(missing)} images that do not exist in {info.image_dir}/: {shorten(missing)}"
        )
    report.notes.append(
        f"{splits.num_classes} variants, train/val/test = {len(splits.train)}/{len(splits.val)}/{len(splits.test)}"
    )
    return [s.path for s in samples if os.path.isfile(s.path)]


def _read_classnames(report: LayoutReport, dataset_dir: str):
    path = os.path.join(dataset_dir, "classnames.txt")
    if not os.path.isfile(path):
        report.problems.append(
            f"class-name file {path} does not exist (lines '<wnid> <class name>', CoOp's imagenet/classnames.txt)"
        )
        return None
    try:
        return read_imagenet_classnames(path)
    except ValueError as error:
        report.problems.append(str(error))
        return None


def _check_class_folders(report: LayoutReport, split_dir: str, label: str, expected: list[str]) -> list[str]:
    """Compare the class folders of split_dir with `expected`; return the image paths found."""
    if not os.path.isdir(split_dir):
        report.problems.append(f"{label}: folder {split_dir} does not exist")
        return []
    folders = list_subdirs(split_dir)
    loose = list_images(split_dir)
    if loose:
        report.problems.append(
            f"{label}: {len(loose)} images lie directly in the folder instead of in class folders "
            "(ImageNet val must be sorted into <wnid>/ folders, e.g. with valprep.sh)"
        )
    present = set(folders)
    missing = [w for w in expected if w not in present]
    if missing:
        report.problems.append(
            f"{label}: found {len(expected) - len(missing)}/{len(expected)} class folders; missing: {shorten(missing)}"
        )
    unknown = sorted(present - set(expected))
    if unknown:
        report.problems.append(f"{label}: {len(unknown)} class folders are not expected: {shorten(unknown)}")
    paths, empty = [], []
    for wnid in expected:
        if wnid in present:
            folder = os.path.join(split_dir, wnid)
            images = list_images(folder)
            if not images:
                empty.append(wnid)
            paths.extend(os.path.join(folder, name) for name in images)
    if empty:
        report.problems.append(f"{label}: {len(empty)} class folders hold no images: {shorten(empty)}")
    report.notes.append(f"{label}: {len(present & set(expected))}/{len(expected)} class folders, {len(paths)} images")
    return paths


def _check_imagenet_family(report: LayoutReport, info: DatasetInfo, dataset_dir: str) -> list[str]:
    names = _read_classnames(report, dataset_dir)
    image_dir = os.path.join(dataset_dir, info.image_dir)
    if names is not None and len(names) != 1000:
        report.warnings.append(f"classnames.txt names {len(names)} classes; ImageNet's file names 1000")
    if info.kind == "imagenet":
        if names is None:
            return []
        expected = sorted(names)
        return [
            *_check_class_folders(report, os.path.join(image_dir, "train"), f"{info.image_dir}/train", expected),
            *_check_class_folders(report, os.path.join(image_dir, "val"), f"{info.image_dir}/val", expected),
        ]
    if info.kind == "imagenetv2":
        count = len(names) if names is not None else info.num_classes
        return _check_class_folders(report, image_dir, info.image_dir, [str(i) for i in range(count)])
    expected = list(info.expected_wnids) if info.expected_wnids else sorted(names or ())
    if names is not None:
        unnamed = [w for w in expected if w not in names]
        if unnamed:
            report.problems.append(
                f"classnames.txt does not name {len(unnamed)} {info.title} classes: {shorten(unnamed)}"
            )
    if not expected:
        return []
    return _check_class_folders(report, image_dir, info.image_dir, expected)


def check_layout(
    name: str, root: str | os.PathLike, verify_images: str = "sample", max_images: int = 1000, seed: int = 0
) -> LayoutReport:
    """Check one dataset under `root` (the folder holding one folder per dataset).

    verify_images: "sample" decodes a seeded random sample of up to `max_images` images, "all"
    every image, "none" skips decoding. The report says how many were checked.
    """
    if verify_images not in VERIFY_MODES:
        raise ValueError(f"verify_images must be one of {VERIFY_MODES}, got {verify_images!r}")
    if max_images < 1:
        raise ValueError(f"max_images must be at least 1, got {max_images}")
    canonical = resolve_dataset_name(name)
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if canonical not in BENCHMARKS:
        return _check_custom(canonical, root, verify_images, max_images, seed)
    info = BENCHMARKS[canonical]
    dataset_dir = os.path.join(root, info.folder)
    report = LayoutReport(canonical, dataset_dir, expected_layout=info.describe())
    if not os.path.isdir(dataset_dir):
        hint = info.root_hint(root)
        report.problems.append(f"dataset folder {dataset_dir} does not exist" + (f"; {hint}" if hint else ""))
        return report
    if info.kind == "zhou":
        paths = _check_split_file(report, info, dataset_dir)
    elif info.kind == "aircraft":
        paths = _check_aircraft(report, info, root, dataset_dir)
    else:
        paths = _check_imagenet_family(report, info, dataset_dir)
    _verify_images(report, paths, verify_images, max_images, seed)
    return report


def _check_custom(canonical: str, root: str, verify_images: str, max_images: int, seed: int) -> LayoutReport:
    report = LayoutReport(canonical, root)
    if canonical == "procedural":
        report.notes.append("drawn on the fly: nothing on disk to check")
        return report
    try:
        splits = build_dataset(canonical, root)
    except DatasetError as error:
        report.problems.append(str(error))
        return report
    samples = [*splits.train, *splits.val, *splits.test]
    missing = [s.path for s in samples if not os.path.isfile(s.path)]
    if missing:
        report.problems.append(f"{len(missing)} listed images do not exist: {shorten(missing)}")
    report.notes.append(
        f"{splits.num_classes} classes, train/val/test = {len(splits.train)}/{len(splits.val)}/{len(splits.test)}"
    )
    _verify_images(report, [s.path for s in samples if os.path.isfile(s.path)], verify_images, max_images, seed)
    return report
