"""What each benchmark dataset looks like on disk (CoOp convention, METHODS.md §7), and its names.

One root folder holds one sub-folder per dataset. Loaders (benchmarks.py, imagenet.py) and the
layout check (check.py) read the same table, so an error message and `fastprompt prepare` describe
the same layout.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass

from .classnames import DATASET_TEMPLATES
from .splits import DatasetError
from .wnid_subsets import IMAGENET_A_WNIDS, IMAGENET_R_WNIDS


@dataclass(frozen=True)
class DatasetInfo:
    """One benchmark dataset's layout.

    kind: "zhou" (CoOp split JSON), "aircraft" (FGVC variant lists), "imagenet" (train/val class
        folders), "imagenetv2" (folders 0..999), "imagenet_folders" (Sketch, A, R: one folder per wnid).
    image_dir: image folder relative to the dataset folder ("" = the dataset folder itself); split
        file paths are relative to it.
    counts: published (train, val, test) sizes; None where not fixed.
    expected_wnids: the class folders a subset variant must have (ImageNet-A/R), else None.
    """

    name: str
    title: str
    folder: str
    image_dir: str
    kind: str
    num_classes: int
    counts: tuple[int, int, int] | None
    split_file: str | None = None
    aliases: tuple[str, ...] = ()
    expected_wnids: tuple[str, ...] | None = None

    @property
    def template(self) -> str:
        return DATASET_TEMPLATES[self.name]

    def hint(self) -> str:
        """What to run to see the expected layout: appended to loader errors. One clause, so that an error stays one
        line; the folder tree itself (`describe`) is in `fastprompt prepare`'s report and `check_layout`'s."""
        return (f"run `fastprompt prepare {self.name} --root <root>` (or fastprompt.data.check_layout) for the "
                f"expected layout and a full report")

    def dataset_dir(self, root: str) -> str:
        """`<root>/<folder>`, which must be a folder. The usual slip is a root that is the dataset's own folder
        (`--root /data/eurosat` where /data holds eurosat/): such a root is named with the one to give."""
        path = os.path.join(root, self.folder)
        if not os.path.isdir(path):
            raise DatasetError(f"{self.title} dataset folder not found: {path} is not a folder; "
                               f"{self.root_hint(root) or self.hint()}")
        return path

    def root_hint(self, root: str) -> str | None:
        """'--root is the folder that holds eurosat/ ...' when `root` looks like the dataset's folder itself: named
        like it, or holding its image folder or split file."""
        root = os.path.abspath(os.path.expanduser(root))
        itself = (os.path.basename(root).lower() == self.folder.lower()
                  or bool(self.image_dir) and os.path.isdir(os.path.join(root, self.image_dir))
                  or bool(self.split_file) and os.path.isfile(os.path.join(root, self.split_file)))
        if not itself:
            return None
        return (f"--root is the folder that holds {self.folder}/, and {root} looks like {self.folder}/ itself: "
                f"give --root {os.path.dirname(root)}")

    def describe(self) -> str:
        """The expected folder tree, for error messages and `fastprompt prepare`."""
        image_dir = f"{self.image_dir}/" if self.image_dir else ""
        lines = [f"<root>/{self.folder}/"]
        if self.kind == "zhou":
            lines.append(f"    {image_dir or '<image folders named in the split file>/'}")
            lines.append(
                f"    {self.split_file}   (CoOp split file; paths relative to {image_dir or 'the dataset folder'})"
            )
        elif self.kind == "aircraft":
            lines += [
                f"    {image_dir}<image id>.jpg",
                "    variants.txt",
                "    images_variant_train.txt, images_variant_val.txt, images_variant_test.txt",
            ]
        elif self.kind == "imagenet":
            lines += [
                "    classnames.txt   (1000 lines '<wnid> <class name>')",
                f"    {image_dir}train/<wnid>/*.JPEG",
                f"    {image_dir}val/<wnid>/*.JPEG   (val sorted into class folders)",
            ]
        elif self.kind == "imagenetv2":
            lines += ["    classnames.txt   (copy of imagenet/classnames.txt)", f"    {image_dir}<0..999>/*.jpeg"]
        else:
            count = len(self.expected_wnids) if self.expected_wnids else self.num_classes
            lines += [
                "    classnames.txt   (copy of imagenet/classnames.txt)",
                f"    {image_dir}<wnid>/*   ({count} class folders)",
            ]
        return "\n".join(lines)


def _zhou(name, title, folder, image_dir, classes, counts, split_name, aliases=()):
    return DatasetInfo(
        name, title, folder, image_dir, "zhou", classes, counts, f"split_zhou_{split_name}.json", aliases
    )


BENCHMARKS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo("imagenet", "ImageNet", "imagenet", "images", "imagenet", 1000, (1281167, 0, 50000)),
        _zhou("caltech101", "Caltech101", "caltech-101", "101_ObjectCategories", 100, (4128, 1649, 2465), "Caltech101"),
        _zhou(
            "oxford_pets",
            "OxfordPets",
            "oxford_pets",
            "images",
            37,
            (2944, 736, 3669),
            "OxfordPets",
            ("pets", "oxford_iiit_pet"),
        ),
        _zhou("stanford_cars", "StanfordCars", "stanford_cars", "", 196, (6509, 1635, 8041), "StanfordCars", ("cars",)),
        _zhou(
            "oxford_flowers",
            "OxfordFlowers",
            "oxford_flowers",
            "jpg",
            102,
            (4093, 1633, 2463),
            "OxfordFlowers",
            ("flowers102", "flowers"),
        ),
        _zhou("food101", "Food101", "food-101", "images", 101, (50500, 20200, 30300), "Food101", ("food",)),
        DatasetInfo(
            "fgvc_aircraft",
            "FGVCAircraft",
            "fgvc_aircraft",
            "images",
            "aircraft",
            100,
            (3334, 3333, 3333),
            aliases=("aircraft",),
        ),
        _zhou("sun397", "SUN397", "sun397", "SUN397", 397, (15880, 3970, 19850), "SUN397", ("sun",)),
        _zhou("dtd", "DescribableTextures", "dtd", "images", 47, (2820, 1128, 1692), "DescribableTextures"),
        _zhou("eurosat", "EuroSAT", "eurosat", "2750", 10, (13500, 5400, 8100), "EuroSAT"),
        _zhou("ucf101", "UCF101", "ucf101", "UCF-101-midframes", 101, (7639, 1898, 3783), "UCF101", ("ucf",)),
        DatasetInfo(
            "imagenetv2",
            "ImageNetV2",
            "imagenetv2",
            "imagenetv2-matched-frequency-format-val",
            "imagenetv2",
            1000,
            (0, 0, 10000),
        ),
        DatasetInfo(
            "imagenet_sketch",
            "ImageNetSketch",
            "imagenet-sketch",
            "images",
            "imagenet_folders",
            1000,
            (0, 0, 50889),
            aliases=("sketch",),
        ),
        DatasetInfo(
            "imagenet_a",
            "ImageNetA",
            "imagenet-adversarial",
            "imagenet-a",
            "imagenet_folders",
            200,
            (0, 0, 7500),
            aliases=("imagenet_adversarial",),
            expected_wnids=IMAGENET_A_WNIDS,
        ),
        DatasetInfo(
            "imagenet_r",
            "ImageNetR",
            "imagenet-rendition",
            "imagenet-r",
            "imagenet_folders",
            200,
            (0, 0, 30000),
            aliases=("imagenet_rendition",),
            expected_wnids=IMAGENET_R_WNIDS,
        ),
    )
}

# Names that are not benchmark layouts but are built by the same entry point (registry.py).
OTHER_DATASETS = ("procedural", "imagefolder", "csv")


def _normalise(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name.lower())


_LOOKUP: dict[str, str] = {}
for _info in BENCHMARKS.values():
    for _alias in (_info.name, _info.title, _info.folder, *_info.aliases):
        _LOOKUP[_normalise(_alias)] = _info.name
for _name in OTHER_DATASETS:
    _LOOKUP[_normalise(_name)] = _name


def known_dataset_names() -> tuple[str, ...]:
    return (*BENCHMARKS, *OTHER_DATASETS)


def resolve_dataset_name(name: str) -> str:
    """Canonical registry name for `name` (case, '-', '_' and Dassl class names are accepted)."""
    if not isinstance(name, str) or not name.strip():
        raise DatasetError(f"dataset name must be a non-empty string, got {name!r}")
    canonical = _LOOKUP.get(_normalise(name))
    if canonical is None:
        close = difflib.get_close_matches(_normalise(name), list(_LOOKUP), n=1, cutoff=0.6)
        hint = f" Did you mean {_LOOKUP[close[0]]!r}?" if close else ""
        raise DatasetError(f"unknown dataset {name!r}.{hint} Known datasets: {', '.join(known_dataset_names())}")
    return canonical


def benchmark_info(name: str) -> DatasetInfo:
    canonical = resolve_dataset_name(name)
    if canonical not in BENCHMARKS:
        raise DatasetError(
            f"{canonical!r} is not a benchmark layout (it has no fixed folder); benchmarks: {', '.join(BENCHMARKS)}"
        )
    return BENCHMARKS[canonical]
