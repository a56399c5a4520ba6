"""fastprompt.data — datasets, transforms and evaluation protocols for prompt learning on CLIP.

Public API (stable; the runner and CLI use only these names):

Datasets
    build_dataset(name, root=None, /, **options) -> DatasetSplits
        name: a benchmark ("imagenet", "caltech101", "oxford_pets", "stanford_cars",
        "oxford_flowers", "food101", "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101",
        "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"; Dassl names such as
        "OxfordPets" or "DescribableTextures" are accepted too), "procedural", "imagefolder" or
        "csv". An unknown name raises DatasetError listing the known ones.
        root: the folder holding one folder per dataset (CoOp layout); the class-folder tree for
        "imagefolder"; the CSV file for "csv"; None for "procedural".
    dataset_options(name) -> list of the keyword options build_dataset takes for that name.
    known_dataset_names() -> tuple of registry names.
    DatasetSplits: frozen record with
        .name, .classnames (label order, "_" already read as space), .train / .val / .test
        (tuples of Sample(path, label, classname)), .template ("a photo of a {}."), .prompts(),
        .num_classes, .class_ids (wnids or folder names, else None), .subset ("all"/"base"/"novel"),
        .fewshot ((shots, seed) or None), .dataset(split, transform) -> torch Dataset of
        (image, label).
    ProceduralDataset(split="train", num_per_class=16, image_size=224, seed=0, transform=None,
        num_classes=8): torch Dataset of drawn coloured shapes, (image, label), `.classnames`.
        Without a transform the image is a PIL image; pass eval_transform(size) for tensors.
    procedural_splits(num_train_per_class=16, num_val_per_class=4, num_test_per_class=50,
        image_size=224, seed=0, num_classes=8) -> DatasetSplits (same as build_dataset("procedural")).
    PROCEDURAL_CLASSNAMES: the 8 class names ("red circle", "blue square", ...).
    load_image_folder(root, ...), load_csv(path, ...): users' own data (see custom.py).
    ImageListDataset(samples, transform=None, loader=open_rgb_image): torch Dataset over samples.

Transforms
    train_transform(size=224, scale=(0.08, 1.0)) and eval_transform(size=224): the research repos'
    augmentation and test transform (bicubic, CLIP mean/std); MMRL_CROP_SCALE = (0.5, 1.0);
    CLIP_MEAN, CLIP_STD.

Protocols
    sample_few_shot(splits, shots, seed, use_cache=True) -> DatasetSplits: Dassl's seeded K-shot
        sampling (val: min(K, 4)), cached as <dataset folder>/split_fewshot/shot_{K}-seed_{S}.json.
    subsample_classes(splits, "all" | "base" | "novel") -> DatasetSplits: base = first ceil(C/2)
        sorted labels, labels re-indexed from 0. Call after sample_few_shot, never before.
    protocol_plan(protocol, dataset=None, shots=16) -> ProtocolPlan(train, shots, targets) for
        "b2n", "fewshot", "xd" (ImageNet -> 10 datasets), "dg" (ImageNet -> 4 variants).
    CROSS_DATASET_TARGETS, DOMAIN_GENERALISATION_TARGETS, FEW_SHOT_SHOTS.

Layout check
    check_layout(name, root, verify_images="sample", max_images=1000) -> LayoutReport with
        .ok, .problems, .warnings, .notes, .images_checked, and .format() for a message that
        names every missing folder, missing file and corrupt image.

Downloads (datasets with a stable public archive: caltech101, dtd, food101, oxford_flowers,
oxford_pets, eurosat, sun397, fgvc_aircraft)
    download_dataset(name, root, keep_archives=True, sources=None) -> list of archive paths:
        fetches into <root>/downloads/ (resumable, MD5-verified) and unpacks into the CoOp layout.
        CoOp's split files (linked from its DATASETS.md, on Google Drive) are not fetched: place
        them by hand; check_layout names the one that is missing.
    download_file(url, destination, md5=None, retries=3); DOWNLOADS (the recorded archives);
    ChecksumError (OSError).

Templates and class names
    DATASET_TEMPLATES (per-dataset template), IMAGENET_TEMPLATES_7, and the class-name rules in
    classnames.py (used only where a layout has no split file).

Errors
    DatasetError (ValueError): a dataset cannot be built; the message names the file or folder.
    CorruptImageError (OSError): an image exists but cannot be decoded.
"""

from .check import LayoutReport, check_layout
from .classnames import DATASET_TEMPLATES, IMAGENET_TEMPLATES_7
from .custom import load_csv, load_image_folder
from .download import DOWNLOADS, ChecksumError, download_dataset, download_file
from .layouts import BENCHMARKS, DatasetInfo, benchmark_info, known_dataset_names, resolve_dataset_name
from .procedural import PROCEDURAL_CLASSNAMES, ProceduralDataset, procedural_splits, render_procedural_image
from .protocols import (
    CROSS_DATASET_TARGETS,
    DOMAIN_GENERALISATION_TARGETS,
    FEW_SHOT_SHOTS,
    ProtocolPlan,
    protocol_plan,
    sample_few_shot,
    subsample_classes,
)
from .registry import build_dataset, dataset_options
from .splits import (
    CorruptImageError,
    DatasetError,
    DatasetSplits,
    ImageListDataset,
    Sample,
    clean_classname,
    open_rgb_image,
)
from .transforms import (CLIP_MEAN, CLIP_STD, MMRL_CROP_SCALE, eval_pixels_transform, eval_transform, normalise_pixels,
                         train_pixels_transform, train_transform)

__all__ = [
    "BENCHMARKS",
    "CLIP_MEAN",
    "CLIP_STD",
    "CROSS_DATASET_TARGETS",
    "DATASET_TEMPLATES",
    "DOMAIN_GENERALISATION_TARGETS",
    "DOWNLOADS",
    "FEW_SHOT_SHOTS",
    "IMAGENET_TEMPLATES_7",
    "MMRL_CROP_SCALE",
    "PROCEDURAL_CLASSNAMES",
    "ChecksumError",
    "CorruptImageError",
    "DatasetError",
    "DatasetInfo",
    "DatasetSplits",
    "ImageListDataset",
    "LayoutReport",
    "ProceduralDataset",
    "ProtocolPlan",
    "Sample",
    "benchmark_info",
    "build_dataset",
    "check_layout",
    "clean_classname",
    "dataset_options",
    "download_dataset",
    "download_file",
    "eval_pixels_transform",
    "eval_transform",
    "known_dataset_names",
    "load_csv",
    "load_image_folder",
    "normalise_pixels",
    "open_rgb_image",
    "procedural_splits",
    "protocol_plan",
    "render_procedural_image",
    "resolve_dataset_name",
    "sample_few_shot",
    "subsample_classes",
    "train_pixels_transform",
    "train_transform",
]
