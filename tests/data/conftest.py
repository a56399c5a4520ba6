"""Small fake datasets on disk in the CoOp layouts, built per test under tmp_path.

Images are tiny (8 x 8) real PNG/JPEG files so that decoding is exercised; each builder returns
what the test needs to know (root, expected names) and nothing is shared between tests.
"""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

IMAGENET_FAKE = {
    "n01440764": "tench",
    "n01443537": "goldfish",
    "n01484850": "great white shark",
    "n01491361": "tiger shark",
    "n01494475": "hammerhead shark",
}


def write_image(path, colour=(200, 30, 30), size=8, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path, format=fmt)
    return str(path)


def write_classnames(path, names: dict):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.writelines(f"{wnid} {name}\n" for wnid, name in names.items())


@pytest.fixture
def imagenet_names():
    """The fake ImageNet's classnames.txt content, wnid -> name."""
    return dict(IMAGENET_FAKE)


@pytest.fixture
def fake_imagenet(tmp_path):
    """imagenet/images/{train,val}/<wnid>/ with 3 train and 2 val images per class + classnames.txt."""
    root = tmp_path / "data"
    dataset_dir = root / "imagenet"
    write_classnames(dataset_dir / "classnames.txt", IMAGENET_FAKE)
    for index, wnid in enumerate(IMAGENET_FAKE):
        for k in range(3):
            write_image(
                dataset_dir / "images" / "train" / wnid / f"{wnid}_{k}.JPEG", (index * 40, k * 50, 90), fmt="JPEG"
            )
        for k in range(2):
            write_image(
                dataset_dir / "images" / "val" / wnid / f"ILSVRC2012_val_{index}{k}.JPEG",
                (index * 40, 10, 200),
                fmt="JPEG",
            )
    return root


@pytest.fixture
def fake_caltech(tmp_path):
    """caltech-101 with a split file naming 4 classes (names as CoOp wrote them) and its images."""
    root = tmp_path / "data"
    dataset_dir = root / "caltech-101"
    image_dir = dataset_dir / "101_ObjectCategories"
    classes = [("Faces", "face"), ("Leopards", "leopard"), ("accordion", "accordion"), ("water_lilly", "water_lilly")]
    split = {"train": [], "val": [], "test": []}
    for label, (folder, name) in enumerate(classes):
        for k in range(6):
            relative = f"{folder}/image_{k:04d}.jpg"
            write_image(image_dir / relative, (label * 60, k * 30, 100), fmt="JPEG")
            part = "train" if k < 4 else ("val" if k == 4 else "test")
            split[part].append([relative, label, name])
    with open(dataset_dir / "split_zhou_Caltech101.json", "w") as handle:
        json.dump(split, handle)
    return root, split


@pytest.fixture
def fake_imagenet_a(tmp_path):
    """imagenet-adversarial with all 200 ImageNet-A class folders (one PNG each) + README.txt."""
    from fastprompt.data.wnid_subsets import IMAGENET_A_WNIDS

    root = tmp_path / "data"
    dataset_dir = root / "imagenet-adversarial"
    names = {wnid: f"class {wnid[-4:]}" for wnid in IMAGENET_A_WNIDS}
    names.update({"n01440764": "tench"})  # classnames.txt lists all 1000 classes; A keeps 200
    write_classnames(dataset_dir / "classnames.txt", dict(sorted(names.items())))
    for wnid in IMAGENET_A_WNIDS:
        write_image(dataset_dir / "imagenet-a" / wnid / "0.png")
    (dataset_dir / "imagenet-a" / "README.txt").write_text("ImageNet-A\n")
    return root, names


@pytest.fixture
def image_writer():
    """write_image(path, colour=(r, g, b), size=8, fmt=None) -> str, for tests that build their own layout."""
    return write_image


@pytest.fixture
def classnames_writer():
    """write_classnames(path, {wnid: name}) writes a CoOp classnames.txt."""
    return write_classnames
