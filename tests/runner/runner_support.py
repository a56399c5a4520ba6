"""Helpers for the runner tests (imported by name; conftest.py holds the fixtures)."""

from __future__ import annotations

import json
import os
import time

import numpy as np
from PIL import Image

# Arguments every fast run shares: random-weight tiny backbone on the CPU, in-process data loading.
FAST = ["backbone=tiny", "pretrained=none", "device=cpu", "num_workers=0", "precision=fp32"]
PROCEDURAL = ["--dataset", "procedural", "dataset.num_test_per_class=2", "dataset.num_val_per_class=1"]

EUROSAT_CLASSES = [("AnnualCrop", "Annual Crop Land"), ("Forest", "Forest"), ("River", "River"),
                   ("SeaLake", "Sea or Lake")]
IMAGENET_CLASSES = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark",
                    "n01491361": "tiger shark"}
COLOURS = [(200, 40, 40), (40, 160, 60), (40, 60, 200), (220, 200, 40)]


def write_image(path, colour, seed, size=40):
    """A noisy image of one colour (PNG or JPEG by extension), so classes differ and images are real files."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour)[None, None] + rng.normal(0, 25, (size, size + 6, 3)), 0, 255)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return str(path)


def build_eurosat(root, train=3, val=1, test=2):
    """<root>/eurosat/2750/<Class>/<Class>_<k>.jpg + split_zhou_EuroSAT.json; returns the split dict."""
    dataset = root / "eurosat"
    split = {"train": [], "val": [], "test": []}
    for label, (folder, name) in enumerate(EUROSAT_CLASSES):
        for k in range(train + val + test):
            relative = f"{folder}/{folder}_{k}.jpg"
            write_image(dataset / "2750" / relative, COLOURS[label], seed=label * 100 + k)
            part = "train" if k < train else "val" if k < train + val else "test"
            split[part].append([relative, label, name])
    with open(dataset / "split_zhou_EuroSAT.json", "w") as handle:
        json.dump(split, handle)
    return split


def build_imagenet(root, train=3, val=2):
    """<root>/imagenet/{classnames.txt, images/train/<wnid>/, images/val/<wnid>/}."""
    dataset = root / "imagenet"
    os.makedirs(dataset, exist_ok=True)
    with open(dataset / "classnames.txt", "w") as handle:
        handle.writelines(f"{wnid} {name}\n" for wnid, name in IMAGENET_CLASSES.items())
    for label, wnid in enumerate(IMAGENET_CLASSES):
        for k in range(train):
            write_image(dataset / "images" / "train" / wnid / f"{wnid}_{k}.JPEG", COLOURS[label], label * 10 + k)
        for k in range(val):
            path = dataset / "images" / "val" / wnid / f"val_{label}{k}.JPEG"
            write_image(path, COLOURS[label], 500 + label * 10 + k)


def read_json(path):
    with open(path) as handle:
        return json.load(handle)


def wait_for(predicate, seconds, what):
    """Poll `predicate` until it holds; fail naming `what` after `seconds` (the subprocess tests' clock)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")
