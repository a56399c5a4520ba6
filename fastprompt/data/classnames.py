"""Class-name rules and text templates of the CoOp-family datasets (METHODS.md §7).

The rules apply only where a layout has no CoOp split file: a split file already carries the
names (and fastprompt uses those). Every function here is pure string handling so it can be
tested against the examples in the reference code.
"""

from __future__ import annotations

import re
from collections import OrderedDict

from .files import read_user_text

# Caltech101: two folders are not classes, four plural/odd folder names are renamed.
CALTECH101_IGNORED = ("BACKGROUND_Google", "Faces_easy")
CALTECH101_RENAMES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}

# EuroSAT folder names are terse; CoOp renames them into phrases CLIP knows.
EUROSAT_RENAMES = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}

# Zero-shot / MMRL text template per registry name (METHODS.md §7 table).
DATASET_TEMPLATES = {
    "imagenet": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "oxford_pets": "a photo of a {}, a type of pet.",
    "stanford_cars": "a photo of a {}.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "food101": "a photo of {}, a type of food.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "sun397": "a photo of a {}.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenetv2": "a photo of a {}.",
    "imagenet_sketch": "a photo of a {}.",
    "imagenet_a": "a photo of a {}.",
    "imagenet_r": "a photo of a {}.",
}
DEFAULT_TEMPLATE = "a photo of a {}."

# The 7-template ImageNet ensemble found in the reference repos.
IMAGENET_TEMPLATES_7 = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


def ucf101_classname(action: str) -> str:
    """UCF101 CamelCase action to the split files' form: "ApplyEyeMakeup" -> "Apply_Eye_Makeup".

    This is also the mid-frame folder name; "_" becomes a space when prompts are built.
    """
    words = re.findall(r"[A-Z][^A-Z]*", action)
    if not words:
        raise ValueError(f"UCF101 action name {action!r} has no CamelCase words")
    return "_".join(words)


def sun397_classname(category_path: str) -> str:
    """SUN397 category path to a name: drop the letter folder, reverse so qualifiers come first.

    "/a/apse/indoor" -> "indoor apse"; "a/abbey" -> "abbey".
    """
    parts = [part for part in category_path.strip().strip("/").split("/") if part]
    if len(parts) < 2 or len(parts[0]) != 1:
        raise ValueError(f"SUN397 category path {category_path!r} is not '<letter>/<name>[/<qualifier>]'")
    return " ".join(reversed(parts[1:]))


def stanford_cars_classname(name: str) -> str:
    """Stanford Cars name with the year moved to the front: "Tesla Model S Sedan 2012" -> "2012 Tesla Model S Sedan"."""
    words = name.split(" ")
    return " ".join([words[-1], *words[:-1]])


def pets_breed(image_stem: str) -> str:
    """Oxford Pets breed from an image name: "Abyssinian_100" -> "abyssinian", "pug_10" -> "pug"."""
    parts = image_stem.split("_")
    if len(parts) < 2:
        raise ValueError(f"Oxford Pets image name {image_stem!r} is not '<breed>_<number>'")
    return "_".join(parts[:-1]).lower()


def flowers_classnames(cat_to_name: dict) -> tuple[str, ...]:
    """Oxford Flowers names in label order from cat_to_name.json ({"1": "pink primrose", ...}; label = key - 1)."""
    try:
        by_label = {int(key) - 1: str(value) for key, value in cat_to_name.items()}
    except ValueError as error:
        raise ValueError(f"cat_to_name.json keys must be category numbers 1..N: {error}") from None
    if sorted(by_label) != list(range(len(by_label))):
        raise ValueError(f"cat_to_name.json must number categories 1..{len(by_label)} without gaps")
    return tuple(by_label[label] for label in range(len(by_label)))


def read_imagenet_classnames(path: str) -> OrderedDict[str, str]:
    """Parse classnames.txt (lines "n01440764 tench") into wnid -> name, in file order.

    A malformed line raises an error with its line number; duplicate wnids are errors too.
    """
    names: OrderedDict[str, str] = OrderedDict()
    for number, line in enumerate(read_user_text(path, "class-name file").splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        wnid, _, name = line.partition(" ")
        if not re.fullmatch(r"n\d{8}", wnid) or not name.strip():
            raise ValueError(f"{path}, line {number}: expected '<wnid> <class name>', got {line!r}")
        if wnid in names:
            raise ValueError(f"{path}, line {number}: wnid {wnid} appears twice")
        names[wnid] = name.strip()
    if not names:
        raise ValueError(f"{path} holds no class names")
    return names
