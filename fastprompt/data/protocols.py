"""The evaluation protocols' data side (METHODS.md §2): few-shot sampling, base/novel, pairings.

Few-shot sampling reproduces Dassl's `generate_fewshot_dataset` exactly: Python's `random` seeded
with the run seed; for each label in order of first appearance in the split, `random.sample(items, K)`
if the class has at least K items, else all of them (no RNG draw); train first, then val with
min(K, 4) from the same stream. Samples are cached as JSON (never pickle) at
`<dataset folder>/split_fewshot/shot_{K}-seed_{S}.json`, with paths relative to the image folder.

Order matters and is enforced: sampling happens over all classes before the base/novel subset is
taken (a subset cannot be sampled).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .splits import DatasetError, DatasetSplits, Sample, read_split_json, relative_entries, write_json_atomic

logger = logging.getLogger(__name__)

CACHE_FORMAT = "fastprompt.fewshot/1"
FEW_SHOT_SHOTS = (1, 2, 4, 8, 16)


def dassl_few_shot(samples: Sequence[Sample], shots: int, rng: random.Random) -> list[Sample]:
    """Dassl's per-class sampling of `shots` items without replacement (all items if fewer)."""
    by_label: dict[int, list[Sample]] = {}
    for sample in samples:
        by_label.setdefault(sample.label, []).append(sample)
    chosen = []
    for items in by_label.values():
        chosen.extend(rng.sample(items, shots) if len(items) >= shots else items)
    return chosen


def few_shot_cache_path(splits: DatasetSplits, shots: int, seed: int) -> str | None:
    if splits.fewshot_dir is None:
        return None
    return os.path.join(splits.fewshot_dir, f"shot_{shots}-seed_{seed}.json")


def _match_cached(path: str, cached: Sequence[Sample], source: Sequence[Sample], split: str) -> tuple[Sample, ...]:
    """The source split's own samples for the cached entries (an entry absent from it is an error)."""
    by_key = {(os.path.normpath(s.path), s.label): s for s in source}
    matched, stale = [], []
    for sample in cached:
        found = by_key.get((os.path.normpath(sample.path), sample.label))
        (matched if found is not None else stale).append(found or sample)
    if stale:
        raise DatasetError(
            f"few-shot cache {path} lists {len(stale)} {split} images that are not in the current {split} split "
            f"(e.g. {stale[0].path}); it was made from another split file. Delete it to draw the samples again."
        )
    return tuple(matched)


def _load_cache(
    path: str, splits: DatasetSplits, shots: int, seed: int
) -> tuple[tuple[Sample, ...], tuple[Sample, ...]]:
    try:
        with open(path, encoding="utf-8") as handle:
            header = json.load(handle)
    except json.JSONDecodeError as error:
        raise DatasetError(
            f"few-shot cache {path} is not valid JSON ({error}); delete it to draw the samples again"
        ) from None
    if header.get("format") != CACHE_FORMAT or header.get("shots") != shots or header.get("seed") != seed:
        raise DatasetError(
            f"few-shot cache {path} is not a {CACHE_FORMAT} file for shots={shots}, seed={seed} "
            f"(found format={header.get('format')!r}, shots={header.get('shots')!r}, seed={header.get('seed')!r})"
        )
    parts = read_split_json(path, splits.path_prefix)
    return _match_cached(path, parts["train"], splits.train, "train"), _match_cached(
        path, parts["val"], splits.val, "val"
    )


def sample_few_shot(splits: DatasetSplits, shots: int, seed: int, use_cache: bool = True) -> DatasetSplits:
    """K-shot train (and min(K, 4)-shot val) samples of `splits`, Dassl's rule, cached on disk.

    The test split is untouched. A cache file that does not match the current split is an error
    (it names the file); a cache folder that cannot be written is only logged (sampling is
    deterministic, the cache is a record and a speed-up, not a source of truth).
    """
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise DatasetError(f"shots must be a positive integer, got {shots!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DatasetError(f"seed must be an integer, got {seed!r}")
    if splits.subset != "all":
        raise DatasetError(
            f"few-shot sampling must happen before the base/novel split (got a {splits.subset!r} subset): "
            "sample over all classes, then call subsample_classes"
        )
    if splits.fewshot is not None:
        raise DatasetError(f"{splits.name} is already a {splits.fewshot[0]}-shot sample (seed {splits.fewshot[1]})")
    if not splits.train:
        raise DatasetError(f"{splits.name} has no train split to sample from (it is a test-only dataset)")
    path = few_shot_cache_path(splits, shots, seed) if use_cache else None
    if path is not None and os.path.isfile(path):
        train, val = _load_cache(path, splits, shots, seed)
    else:
        rng = random.Random(seed)  # same stream as Dassl's random.seed(seed) for an int seed
        train = tuple(dassl_few_shot(splits.train, shots, rng))
        val = tuple(dassl_few_shot(splits.val, min(shots, 4), rng)) if splits.val else ()
        if path is not None:
            content = {
                "format": CACHE_FORMAT,
                "dataset": splits.name,
                "shots": shots,
                "seed": seed,
                "train": relative_entries(train, splits.path_prefix),
                "val": relative_entries(val, splits.path_prefix),
                "test": [],
            }
            try:
                write_json_atomic(path, content)
            except OSError as error:
                logger.warning("could not write few-shot cache %s (%s); continuing without it", path, error)
    return replace(splits, train=train, val=val, fewshot=(shots, seed))


def subsample_classes(splits: DatasetSplits, subset: str) -> DatasetSplits:
    """Dassl's base/novel split: sorted labels of the train split (test if there is no train),
    base = first ceil(C/2), novel = the rest, labels re-indexed from 0 in each subset."""
    subset = {"new": "novel"}.get(subset, subset)
    if subset not in ("all", "base", "novel"):
        raise DatasetError(f"subset must be 'all', 'base' or 'novel' ('new'), got {subset!r}")
    if subset == "all":
        return splits
    if splits.subset != "all":
        raise DatasetError(f"{splits.name} is already the {splits.subset!r} subset")
    reference = splits.train or splits.test
    labels = sorted({s.label for s in reference})
    cut = math.ceil(len(labels) / 2)
    selected = labels[:cut] if subset == "base" else labels[cut:]
    new_label = {old: new for new, old in enumerate(selected)}

    def relabel(samples):
        return tuple(replace(s, label=new_label[s.label]) for s in samples if s.label in new_label)

    return replace(
        splits,
        classnames=tuple(splits.classnames[label] for label in selected),
        class_ids=tuple(splits.class_ids[label] for label in selected) if splits.class_ids else None,
        train=relabel(splits.train),
        val=relabel(splits.val),
        test=relabel(splits.test),
        subset=subset,
    )


# ----------------------------------------------------------------------------------------------
# Protocol pairings
# ----------------------------------------------------------------------------------------------

CROSS_DATASET_TARGETS = (
    "caltech101",
    "oxford_pets",
    "stanford_cars",
    "oxford_flowers",
    "food101",
    "fgvc_aircraft",
    "sun397",
    "dtd",
    "eurosat",
    "ucf101",
)
DOMAIN_GENERALISATION_TARGETS = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
PROTOCOLS = ("b2n", "fewshot", "xd", "dg")


@dataclass(frozen=True)
class ProtocolPlan:
    """What to train on and what to evaluate for one protocol run.

    train: (dataset, subset) trained on with `shots` samples per class.
    targets: (dataset, subset) pairs evaluated with the trained parameters, each with its own class
        names; for xd and dg the source dataset comes first (the papers' tables report it too).
    """

    protocol: str
    train: tuple[str, str]
    shots: int
    targets: tuple[tuple[str, str], ...]


def protocol_plan(protocol: str, dataset: str | None = None, shots: int = 16) -> ProtocolPlan:
    """The standard pairings: b2n and fewshot on one dataset; xd and dg train on ImageNet (16 shots)."""
    from .layouts import resolve_dataset_name  # local: keeps protocols importable without the table

    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise DatasetError(f"shots must be a positive integer, got {shots!r}")
    if protocol in ("b2n", "fewshot"):
        if dataset is None:
            raise DatasetError(f"protocol {protocol!r} needs a dataset")
        name = resolve_dataset_name(dataset)
        if protocol == "b2n":
            return ProtocolPlan("b2n", (name, "base"), shots, ((name, "base"), (name, "novel")))
        return ProtocolPlan("fewshot", (name, "all"), shots, ((name, "all"),))
    if protocol in ("xd", "dg"):
        source = resolve_dataset_name(dataset or "imagenet")
        pool = CROSS_DATASET_TARGETS if protocol == "xd" else DOMAIN_GENERALISATION_TARGETS
        if protocol == "dg" and source != "imagenet":
            raise DatasetError(
                f"domain generalisation trains on imagenet (its variants share its classes), not {source!r}"
            )
        targets = ((source, "all"), *((t, "all") for t in pool if t != source))
        return ProtocolPlan(protocol, (source, "all"), shots, targets)
    raise DatasetError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
