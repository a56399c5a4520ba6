"""The benchmark's workloads (DESIGN.md §5) and their selection.

GPU (selected when CUDA is present): ViT-B/16 shapes with random weights, data already on the device:
ImageNet scale (C = 1000) at B = 32 and at the papers' B = 4, a 100-class dataset at B = 4, and the two methods
whose text pass runs per image (CoCoOp, MCPL-CLIP) on the 100-class dataset at B = 32 too. CPU: the tiny CLIP at
tiny shapes, so CI proves the suite runs; its numbers do not count.

Class names are real (open_clip's ImageNet names; every tenth for the 100-class set) because the packed text
path's work depends on their token lengths.
"""

from __future__ import annotations

from dataclasses import dataclass

METHODS = ("coop", "cocoop", "vpt_deep", "maple", "mpl", "mudpt", "mmrl", "mcpl")
CONTENDERS = ("eager", "compiled", "fastprompt")


@dataclass(frozen=True)
class Workload:
    name: str
    backbone: str
    classes: int
    batch: int
    methods: tuple[str, ...] = METHODS

    def classnames(self) -> list[str]:
        from open_clip import IMAGENET_CLASSNAMES

        names = list(IMAGENET_CLASSNAMES) if self.classes > 100 else list(IMAGENET_CLASSNAMES[::10])
        if self.classes > len(names):
            raise ValueError(f"workload {self.name}: {self.classes} classes, only {len(names)} names")
        return names[: self.classes]


GPU_WORKLOADS = (
    Workload("imagenet-b32", "ViT-B-16", 1000, 32),
    Workload("imagenet-b4", "ViT-B-16", 1000, 4),
    Workload("c100-b4", "ViT-B-16", 100, 4),
    Workload("c100-b32", "ViT-B-16", 100, 32, ("cocoop", "mcpl")),
)
CPU_WORKLOADS = (Workload("tiny-c12-b2", "tiny", 12, 2),)
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
                 contenders: str | None = None) -> list[tuple[Workload, str, str]]:
    """(workload, method, contender) triples: the device's default workloads, or the comma-separated subsets."""
    names = _subset(workloads, WORKLOADS, "workloads")
    chosen = [WORKLOADS[n] for n in names] if names else list(GPU_WORKLOADS if cuda else CPU_WORKLOADS)
    method_subset = _subset(methods, METHODS, "methods")
    contender_subset = _subset(contenders, CONTENDERS, "contenders") or CONTENDERS
    return [
        (w, m, c)
        for w in chosen
        for m in w.methods
        if method_subset is None or m in method_subset
        for c in contender_subset
    ]
