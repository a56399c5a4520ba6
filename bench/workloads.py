"""The benchmark's workloads (DESIGN.md §5), the kinds of measurement, and their selection.

Kinds: `train_step` (timed TrainStep calls on one batch held on the device), `runner_epoch` (one epoch of the
runner's loop, fastprompt.training.train_epoch, over a synthetic 16-shot set held on the device with the runner's
on-device augmentation) and `inference` (`model(images)` under no_grad in eval mode). A workload names the kinds it
serves: inference runs at the batch of 100 that evaluation uses, training at the papers' batches.

GPU (selected when CUDA is present): ViT-B/16 shapes with random weights: ImageNet scale (C = 1000) at B = 32 and
at the papers' B = 4, a 100-class dataset at B = 4, and the two methods whose text pass runs per image (CoCoOp,
MCPL-CLIP) on the 100-class dataset at B = 32 too; inference at C = 1000, B = 100. CPU: the tiny CLIP at tiny
shapes (4 classes, so an epoch of the 16-shot set is 8 steps of 8), so CI proves the suite runs; its numbers do
not count.

Class names are real (open_clip's ImageNet names; every tenth for the 100-class set) because the packed text
path's work depends on their token lengths.
"""

from __future__ import annotations

from dataclasses import dataclass

METHODS = ("coop", "cocoop", "vpt_deep", "maple", "mpl", "mudpt", "mmrl", "mcpl")
CONTENDERS = ("eager", "compiled", "tuned", "fastprompt")
KINDS = ("train_step", "runner_epoch", "inference")
SHOTS = 16  # images per class in the runner epoch's few-shot set
# An epoch of every contender costs minutes per method at C = 1000 on a GPU; by default the GPU suite runs the
# epoch for the contender whose epoch-vs-step gap is tracked (FASTPROMPT_BENCH_CONTENDERS selects others).
GPU_DEFAULT_CONTENDERS = {"runner_epoch": ("fastprompt",)}


@dataclass(frozen=True)
class Workload:
    name: str
    backbone: str
    classes: int
    batch: int
    methods: tuple[str, ...] = METHODS
    kinds: tuple[str, ...] = ("train_step",)

    def classnames(self) -> list[str]:
        from open_clip import IMAGENET_CLASSNAMES

        names = list(IMAGENET_CLASSNAMES) if self.classes > 100 else list(IMAGENET_CLASSNAMES[::10])
        if self.classes > len(names):
            raise ValueError(f"workload {self.name}: {self.classes} classes, only {len(names)} names")
        return names[: self.classes]


GPU_WORKLOADS = (
    Workload("imagenet-b32", "ViT-B-16", 1000, 32, kinds=("train_step", "runner_epoch")),
    Workload("imagenet-b4", "ViT-B-16", 1000, 4),
    Workload("c100-b4", "ViT-B-16", 100, 4, kinds=("train_step", "runner_epoch")),
    Workload("c100-b32", "ViT-B-16", 100, 32, ("cocoop", "mcpl"), kinds=("train_step", "runner_epoch")),
    Workload("imagenet-b100", "ViT-B-16", 1000, 100, kinds=("inference",)),
)
# One CPU workload serves every kind, so the CPU run also derives the runner epoch's share of its train step.
CPU_WORKLOADS = (Workload("tiny-c4-b8", "tiny", 4, 8, kinds=KINDS),)
WORKLOADS = {w.name: w for w in GPU_WORKLOADS + CPU_WORKLOADS}


def _subset(value: str | None, known, what: str) -> tuple[str, ...] | None:
    if not value:
        return None
    chosen = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [v for v in chosen if v not in known]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; known: {', '.join(known)}")
    return chosen


def select_cases(cuda: bool, workloads: str | None = None, methods: str | None = None,
                 contenders: str | None = None, kind: str = "train_step") -> list[tuple[Workload, str, str]]:
    """(workload, method, contender) triples of one kind: the device's default workloads serving `kind`, or those
    of the comma-separated subsets that serve it."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; known: {', '.join(KINDS)}")
    names = _subset(workloads, WORKLOADS, "workloads")
    chosen = [WORKLOADS[n] for n in names] if names else list(GPU_WORKLOADS if cuda else CPU_WORKLOADS)
    method_subset = _subset(methods, METHODS, "methods")
    default = GPU_DEFAULT_CONTENDERS.get(kind, CONTENDERS) if cuda else CONTENDERS
    contender_subset = _subset(contenders, CONTENDERS, "contenders") or default
    return [
        (w, m, c)
        for w in chosen
        if kind in w.kinds
        for m in w.methods
        if method_subset is None or m in method_subset
        for c in contender_subset
    ]
