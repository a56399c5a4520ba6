"""The runner's data side: which splits a protocol trains and evaluates on, loaders, and split hashes.

Everything that can fail on bad input (a missing root, a split file naming absent files, an image that
does not decode, a batch that does not split over the torchrun processes) fails here, before a run folder is created.
"""

from __future__ import annotations

import hashlib
import os
import platform
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from ..data import (
    CROSS_DATASET_TARGETS,
    DOMAIN_GENERALISATION_TARGETS,
    DatasetSplits,
    build_dataset,
    eval_pixels_transform,
    normalise_pixels,
    open_rgb_image,
    resolve_dataset_name,
    sample_few_shot,
    subsample_classes,
    train_pixels_transform,
)
from ..parallel import data_parallel
from .config import ConfigError, RunConfig
from .machine import usable_cpus
from .presets import DATASET_TEMPLATE_METHODS


@dataclass(frozen=True)
class Target:
    """One evaluation: a dataset's test split with its own class names, and the predict mode.

    mode is 'base' on the classes the prompts were trained on (MMRL fuses its two heads) and 'novel'
    on unseen classes and other datasets (MMRL uses the CLS head only).
    """

    dataset: str
    subset: str
    mode: str
    splits: DatasetSplits

    @property
    def key(self) -> str:
        return self.dataset if self.subset == "all" else f"{self.dataset}/{self.subset}"


def load_dataset(config: RunConfig, name: str, image_size: int) -> DatasetSplits:
    """build_dataset with the config's root; dataset options apply to the training dataset only."""
    canonical = name if name == "procedural" else resolve_dataset_name(name)
    options = dict(config.dataset_options) if canonical == config.dataset else {}
    if canonical == "procedural":
        options.setdefault("image_size", image_size)
        options.setdefault("seed", 0)  # the drawing seed: the data are the same for every run seed
        return build_dataset("procedural", None, **options)
    # The benchmarks' root holds one folder per dataset; a user's imagefolder root is the class-folder tree itself,
    # and a csv dataset's root is the CSV file (fastprompt.data.build_dataset).
    wants = {"csv": "the CSV file", "imagefolder": "the folder of class folders"}.get(
        canonical, "the folder holding one folder per dataset")
    if config.root is None:
        raise ConfigError(f"dataset {canonical!r} needs --root (root=): {wants}")
    root = os.path.abspath(os.path.expanduser(config.root))
    if not os.path.exists(root):
        raise ConfigError(f"dataset root {root} does not exist (root={config.root!r}); it should be {wants}")
    if os.path.isdir(root) != (canonical != "csv"):
        raise ConfigError(f"dataset root {root} is a {'folder' if os.path.isdir(root) else 'file'}; for dataset"
                          f" {canonical!r} it should be {wants}")
    return build_dataset(canonical, root, **options)


def target_names(config: RunConfig) -> list[str]:
    if config.targets is not None:
        return [t if t == "procedural" else resolve_dataset_name(t) for t in config.targets]
    pool = CROSS_DATASET_TARGETS if config.protocol == "xd" else DOMAIN_GENERALISATION_TARGETS
    return [t for t in pool if t != config.dataset]


def plan(config: RunConfig, full: DatasetSplits, seed: int, image_size: int, loaded: dict | None = None):
    """(training splits, targets) of one seed. `full` is the training dataset before sampling; `loaded`
    caches other datasets across seeds (their test splits do not depend on the seed)."""
    if config.protocol == "dg" and config.dataset != "imagenet" and config.targets is None:
        raise ConfigError(
            f"protocol dg evaluates ImageNet variants, so it trains on imagenet (got dataset={config.dataset!r});"
            " or name targets= explicitly"
        )
    sampled = sample_few_shot(full, config.shots, seed)
    if config.protocol == "b2n":
        if full.num_classes < 2:
            raise ConfigError(f"protocol b2n splits the classes of {full.name} into a base and a novel half, but it"
                              f" has {count_classes(full.num_classes)}: b2n needs at least 3 (2 base, 1 novel); use"
                              " protocol=fewshot to train and test on all classes")
        base, novel = subsample_classes(sampled, "base"), subsample_classes(sampled, "novel")
        targets = [Target(full.name, "base", "base", base), Target(full.name, "novel", "novel", novel)]
        return base, targets
    targets = [Target(full.name, "all", "base", sampled)]
    if config.protocol in ("xd", "dg"):
        loaded = loaded if loaded is not None else {}
        for name in target_names(config):
            if name not in loaded:
                loaded[name] = load_dataset(config, name, image_size)
            splits = loaded[name]
            if not splits.test:
                raise ConfigError(f"target {name!r} has an empty test split")
            targets.append(Target(name, "all", "novel", splits))
    return sampled, targets


def count_classes(count: int) -> str:
    """The count with its noun: '1 class', '3 classes'."""
    return f"{count} class" if count == 1 else f"{count} classes"


def check_targets(targets) -> None:
    """Every evaluation needs a class to score: an empty one (the novel half of a 1-class dataset) is an error
    here rather than a failure after training."""
    for target in targets:
        if target.splits.num_classes == 0:
            raise ConfigError(f"{target.dataset}/{target.subset} holds no class to evaluate (the {target.subset} half"
                              " of a dataset of one class)")


def one_class_targets_note(targets) -> str | None:
    """A line naming the evaluations over a single class (b2n's novel half of a 3-class dataset, a 1-class
    target): their accuracy is 100 % whatever the prompts are; None when there is none."""
    single = [f"{t.dataset}/{t.subset} ({t.splits.classnames[0]!r})" for t in targets if t.splits.num_classes == 1]
    if not single:
        return None
    return (f"note: {', '.join(single)} {'holds' if len(single) == 1 else 'hold'} a single class, so"
            f" {'its' if len(single) == 1 else 'their'} accuracy is 100 % whatever the prompts learn")


def short_classes_note(full: DatasetSplits, shots: int) -> str | None:
    """A line naming the classes with fewer than `shots` training images (Dassl's sampler, like ours, then takes
    all they have, so the run is not the K-shot run its name says for those classes); None when every class has
    enough."""
    counts = [0] * full.num_classes
    for sample in full.train:
        counts[sample.label] += 1
    short = [label for label, count in enumerate(counts) if count < shots]
    if not full.train or not short:
        return None
    fewest = min(short, key=lambda label: counts[label])
    return (f"note: {len(short)} of {full.num_classes} classes of {full.name} have fewer than {shots} training images"
            f" (fewest: {full.classnames[fewest]!r} with {counts[fewest]}); they train on all they have")


def check_training_set(config: RunConfig, train: DatasetSplits) -> None:
    if not train.train:
        raise ConfigError(f"{train.name}: the training split is empty")
    trained = train.num_classes
    if trained < 2:
        # Cross-entropy over one class is 0 whatever the logits: the prompts would get no gradient from it.
        half = " (b2n trains on the base half of its classes; 3 or more are needed)" if train.subset == "base" else ""
        raise ConfigError(f"the training set of {train.name} holds {count_classes(trained)}{half}: a classifier needs"
                          " at least 2 classes to learn anything (its cross-entropy is 0 over one); epochs=0 evaluates"
                          " without training")
    try:
        # Under torchrun each process takes 1/N of a batch: of batch_size, or of the whole set where it is smaller
        # (one batch of all its images per epoch, as Dassl's loader has it).
        data_parallel.check_batch(min(config.batch_size, len(train.train)))
    except ValueError as error:
        if len(train.train) < config.batch_size:
            raise ConfigError(f"the training set of {train.name} holds {len(train.train)} images, fewer than"
                              f" batch_size={config.batch_size}, so each epoch is one batch of all of them; that"
                              f" batch does not split over the {data_parallel.world_size()} processes torchrun"
                              " started (use a number of processes that divides it)") from None
        raise ConfigError(str(error)) from None


def verify_images(splits: DatasetSplits, progress=None) -> None:
    """Decode every training image once, so a missing or corrupt file stops the run before it starts.

    Threads overlap the decodes (PIL releases the GIL); the first failure is raised, naming its file.
    `progress(n)` is called as images finish."""
    verify_paths(image_paths(splits, "train"), progress)


def image_paths(splits: DatasetSplits, which: str) -> list[str]:
    """The files a split's images are decoded from ([] when they are generated in memory, as procedural's are)."""
    if splits.loader is not open_rgb_image:
        return []
    return [s.path for s in splits.split(which)]


def run_image_paths(plans: dict, train_too: bool) -> list[str]:
    """Every image file a run will read, once: each seed's training set (when it trains) and the test split of
    every target (b2n's base and novel halves and the seeds share test files), in a stable order."""
    paths: dict[str, None] = {}
    for train, targets in plans.values():
        if train_too:
            paths.update(dict.fromkeys(image_paths(train, "train")))
        for target in targets:
            paths.update(dict.fromkeys(image_paths(target.splits, "test")))
    return list(paths)


def verify_paths(paths: list[str], progress=None) -> None:
    """Decode each file once (open_rgb_image); the first missing or corrupt one raises, naming it."""
    if not paths:
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(16, usable_cpus())) as pool:
        for _ in pool.map(open_rgb_image, paths):
            if progress is not None:
                progress(1)


def split_hash(splits: DatasetSplits, which: str) -> str:
    """sha256 of a split's (path relative to the dataset, label) list and the class names."""
    digest = hashlib.sha256()
    digest.update("\n".join(splits.classnames).encode())
    for sample in splits.split(which):
        path = os.path.relpath(sample.path, splits.path_prefix) if splits.path_prefix else sample.path
        digest.update(f"\n{path.replace(os.sep, '/')}\t{sample.label}".encode())
    return digest.hexdigest()


def split_record(train: DatasetSplits, targets: list[Target]) -> dict:
    record = {
        "train": {"dataset": train.name, "subset": train.subset, "fewshot": list(train.fewshot or ()),
                  "images": len(train.train), "sha256": split_hash(train, "train")},
    }
    for target in targets:
        record[f"test:{target.key}"] = {"images": len(target.splits.test), "sha256": split_hash(target.splits, "test")}
    return record


def template_for(config: RunConfig, splits: DatasetSplits) -> str | None:
    """The dataset template for methods whose frozen text input is it (unless the user set one)."""
    if config.method in DATASET_TEMPLATE_METHODS and "template" not in config.options:
        return splits.template
    return None


# --- loaders -------------------------------------------------------------------------------------------
def worker_count(config: RunConfig, device: torch.device, evaluation: bool = False) -> int:
    """Loader worker processes: `num_workers`, or automatically none on a CPU device (the model's ops need the
    cores) and on spawn-based platforms, else up to 8 for training and, for evaluation, every core this process
    has less one for itself (up to 32): evaluation runs nothing else on the host, and its first pass over a test
    split is decoding-bound (a 500 x 375 JPEG to 224 px is ~5 ms of a core: bench/eval_decode.py). Under torchrun
    the processes on this node share its cores."""
    if config.num_workers >= 0:
        return config.num_workers
    if device.type == "cpu" or platform.system() != "Linux":
        return 0  # CPU training competes with workers; spawn-based platforms pay a large start cost
    cores = max(1, usable_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    return min(32, max(1, cores - 1)) if evaluation else min(8, cores)


def train_loader(config: RunConfig, train: DatasetSplits, image_size: int, generator: torch.Generator, workers: int,
                 pin_memory: bool = False):
    """(uint8 pixels, labels) batches of the augmented training set (train_transform's draws and pixels before
    ToTensor; NormalisedBatches normalises them on the device)."""
    dataset = train.dataset("train", train_pixels_transform(image_size, scale=tuple(config.crop_scale)))
    if data_parallel.world_size() > 1:  # torchrun: this process's slice of every global batch
        return data_parallel.sharded_loader(dataset, config.batch_size, generator, workers, pin_memory)
    # Dassl drops the last incomplete batch when the set holds at least one batch; a smaller set comes here with
    # batch_size lowered to its size (SeedTrainer.train): one batch of all its images per epoch.
    # The shuffle order and the workers' base seed come from `generator`, which the resumable state saves.
    # Workers decode and augment ahead of the step (4 batches each); no persistent workers, so that a resumed run
    # seeds its workers exactly as an uninterrupted one does at the same epoch.
    return DataLoader(
        dataset, batch_size=config.batch_size, shuffle=True, drop_last=True, generator=generator,
        num_workers=workers, pin_memory=pin_memory, prefetch_factor=4 if workers else None,
    )


class NormalisedBatches:
    """A loader of (uint8 pixels, labels) as (normalised float32 images, labels) on `device`: each batch goes to the
    device as uint8, a quarter of float32's bytes, and is normalised there (fastprompt.data.normalise_pixels: the
    values ToTensor + Normalize give on the host). Its length is the loader's."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for pixels, labels in self.loader:
            yield on_device(pixels, labels, self.device)


def on_device(pixels: torch.Tensor, labels: torch.Tensor, device: torch.device) -> tuple:
    """One loader batch of (uint8 pixels, labels) on `device` (without blocking from pinned memory), the pixels
    normalised there."""
    return normalise_pixels(pixels.to(device, non_blocking=True)), labels.to(device, non_blocking=True)


def eval_loader(config: RunConfig, splits: DatasetSplits, image_size: int, workers: int, pin_memory: bool = False):
    """(uint8 pixels, labels) batches of this process's share of the test split: eval_transform's pixels before
    ToTensor, normalised on the device by the caller (fastprompt.runner.eval_cache)."""
    dataset = data_parallel.shard(splits.dataset("test", eval_pixels_transform(image_size)))
    # A generator of its own: a DataLoader draws its workers' base seed from the global RNG otherwise, which the
    # in-process training augmentation reads, so an evaluation during training (eval_every) would change the run.
    return DataLoader(dataset, batch_size=config.eval_batch_size, shuffle=False, num_workers=workers,
                      pin_memory=pin_memory, generator=torch.Generator())
