"""CPU proxy of a training step's host overhead (issue 8, item 2): host ms and dispatched ops per step.

On a GPU a step without a CUDA graph is host-bound when Python, the dispatcher and the launches take longer than
the kernels (the H200 MaPLe step at C = 1000, B = 32: 91 ms of wall time for 13.7 ms of GPU work). That host cost
is set by how many ops a step dispatches and what each costs to dispatch, not by tensor sizes, so it can be
tracked without a GPU:

- ops per step: every op that reaches the dispatcher below autograd in one whole step (forward, backward and
  the optimizer), counted with a TorchDispatchMode: fastprompt custom ops (one node each; their inside is one
  launch), view/metadata ops (no kernel on a GPU) and the rest (each one kernel launch on a GPU). Independent of
  widths and of the machine, so exact and comparable across commits.
- host ms per step: the wall time of a step on this CPU at ViT-B/16 depth (12 + 12 layers) with a width of 16,
  where the arithmetic is negligible and the time is Python and dispatch. It is measured at a few classes
  (`HOST_CLASSES`): at C = 1000 the CPU would do real work (77,000 text rows for eager, padded prefix attention
  for the packed path), which a GPU does in microseconds. The op counts are taken at the real 1,000 ImageNet
  class names and at the few; for the fast path they must agree (nothing per step grows with the class set).

    python -m bench.host                       # every method x contender; prints a table, writes JSON
    python -m bench.host --methods maple --contenders fastprompt --out /tmp/host.json

Contenders that compile (compiled, tuned) are recorded as skipped on CPU: inductor takes minutes per method there.
The numbers are CPU numbers: compare them across commits on one machine, not with a GPU's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .contenders import CONTENDERS, build_contender
from .proxy import classnames, python_calls, step_seconds  # noqa: F401  (part of this module's API)
from .workloads import METHODS

KIND = "host_overhead"
PROXY_BACKBONE = "host-proxy"
# ViT-B/16's depth (12 layers per tower, causal 77-token text, real tokenizer) at a width where arithmetic is noise.
PROXY_CONFIG = dict(
    embed_dim=16,
    vision_cfg=dict(image_size=32, layers=12, width=16, patch_size=8, head_width=8),
    text_cfg=dict(context_length=77, vocab_size=49408, width=16, heads=2, layers=12),
)
COUNT_CLASSES = 1000  # op counts at the real ImageNet class set
HOST_CLASSES = 10  # host time where the CPU's arithmetic is negligible (every 100th ImageNet name)
BATCH = 4
# The fields a host_overhead record adds to the suite's record (bench/results.py RECORD_FIELDS).
HOST_FIELDS = (
    "host_ms_per_step", "host_ms_p20", "host_ms_p80", "host_classes", "ops_per_step", "ops_custom", "ops_view",
    "ops_launch", "ops_classes", "ops_per_step_few", "ops_top",
)
COMPILE_REASON = ("compiles with inductor: minutes per method on CPU, and a compiled step's host cost is not the"
                  " eager dispatch this proxy measures")
_VIEW_LIKE = {"aten::detach", "aten::alias", "aten::lift_fresh", "aten::_unsafe_view"}


def register_proxy_backbone() -> None:
    """Make PROXY_BACKBONE creatable by fastprompt.backbones.create_clip (a random-weight config, like 'tiny')."""
    from fastprompt.backbones import TINY_CONFIGS

    TINY_CONFIGS.setdefault(PROXY_BACKBONE, PROXY_CONFIG)


class OpCounter(TorchDispatchMode):
    """Counts every op dispatched below autograd (custom ops count once: their inside is not re-entered)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        self.ops[name] += 1
        if func.is_view or name in _VIEW_LIKE:
            self.views += 1
        return func(*args, **(kwargs or {}))

    def summary(self) -> dict:
        total = sum(self.ops.values())
        custom = sum(n for name, n in self.ops.items() if name.startswith("fastprompt::"))
        return {"ops_per_step": total, "ops_custom": custom, "ops_view": self.views,
                "ops_launch": total - custom - self.views,
                "ops_top": dict(self.ops.most_common(12))}


def _batch(classes: int, batch: int = BATCH):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, 32, 32, generator=generator)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    return images, labels


def _build(contender: str, method: str, names):
    register_proxy_backbone()
    # fp32 on CPU: CPU autocast is emulated (extra casts a GPU step does not have in that form)
    return build_contender(contender, method, names, backbone=PROXY_BACKBONE, device="cpu", amp_dtype=None,
                           warmup_steps=1)


def count_ops(contender: str, method: str, classes: int, warmup: int = 1) -> dict:
    """Ops of one whole training step (after `warmup` steps: lazy state such as momentum buffers exists)."""
    names = classnames(classes)
    _, step = _build(contender, method, names)
    images, labels = _batch(len(names))
    for _ in range(warmup):
        step(images, labels)
    counter = OpCounter()
    with counter:
        step(images, labels)
    return counter.summary()


def time_steps(contender: str, method: str, classes: int, steps: int = 7, warmup: int = 2) -> list[float]:
    """Wall seconds of `steps` training steps at the proxy width (after `warmup` untimed ones)."""
    names = classnames(classes)
    _, step = _build(contender, method, names)
    return step_seconds(step, *_batch(len(names)), steps, warmup)


def host_record(method: str, contender: str, *, steps: int = 7, warmup: int = 2, count_classes: int = COUNT_CLASSES,
                host_classes: int = HOST_CLASSES) -> dict:
    """One host_overhead record: the suite's record fields (bench/results.py) that apply, plus HOST_FIELDS."""
    spec = CONTENDERS[contender]
    record = _fields()
    record.update(
        kind=KIND, workload=f"host-proxy-c{count_classes}-b{BATCH}", backbone=PROXY_BACKBONE, classes=count_classes,
        batch=BATCH, method=method, contender=contender, precision="fp32", clip_precision="fp32",
        text_path=spec.text_path, truncate_text=spec.truncate_text, patched=spec.patched, host_classes=host_classes,
        ops_classes=count_classes, memory_reason="host-overhead proxy: no memory measured",
        floor_reason="host-overhead proxy: CPU time of a tiny-width step, no FLOP floor",
    )
    if spec.compile:
        record.update(status="skipped", reason=COMPILE_REASON)
        return record
    with torch.inference_mode(False):
        times = time_steps(contender, method, host_classes, steps=steps, warmup=warmup)
        few = count_ops(contender, method, host_classes)
        full = count_ops(contender, method, count_classes) if count_classes != host_classes else few
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else times * 4
    median = statistics.median(times)
    record.update(status="ran", rounds=len(times), step_ms_median=median * 1e3, step_ms_p20=q[0] * 1e3,
                  step_ms_p80=q[3] * 1e3, images_per_s=BATCH / median, host_ms_per_step=median * 1e3,
                  host_ms_p20=q[0] * 1e3, host_ms_p80=q[3] * 1e3, ops_per_step_few=few["ops_per_step"], **full)
    return record


def _fields() -> dict:
    try:
        from .results import RECORD_FIELDS
    except ImportError:  # noqa: BLE001 - results.py being edited elsewhere: the host fields still stand alone
        RECORD_FIELDS = ()
    return dict.fromkeys(tuple(RECORD_FIELDS) + HOST_FIELDS)


def run(methods=METHODS, contenders=None, *, steps: int = 7, count_classes: int = COUNT_CLASSES,
        host_classes: int = HOST_CLASSES, progress=None) -> list[dict]:
    contenders = tuple(contenders or CONTENDERS)
    records = []
    for method in methods:
        for contender in contenders:
            record = host_record(method, contender, steps=steps, count_classes=count_classes,
                                 host_classes=host_classes)
            records.append(record)
            if progress:
                progress(record)
    return records


def describe(record: dict) -> str:
    if record["status"] != "ran":
        return f"{record['method']:9s} {record['contender']:11s} {record['status']}: {record['reason'][:60]}"
    return (f"{record['method']:9s} {record['contender']:11s} host {record['host_ms_per_step']:7.1f} ms/step"
            f"  ops {record['ops_per_step']:5d} (custom {record['ops_custom']:3d}, view {record['ops_view']:4d},"
            f" launch {record['ops_launch']:4d}; at C={record['host_classes']}: {record['ops_per_step_few']})")


def document(records: list[dict], note: str = "") -> dict:
    from .results import git_state, versions

    repo = Path(__file__).resolve().parent.parent
    return {"kind": KIND, "note": note, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "git": git_state(repo),
            "versions": versions(), "threads": torch.get_num_threads(), "proxy_config": PROXY_CONFIG,
            "results": records}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.host", description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--count-classes", type=int, default=COUNT_CLASSES)
    parser.add_argument("--host-classes", type=int, default=HOST_CLASSES)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--note", default="")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    contenders = [c for c in args.contenders.split(",") if c]
    for name, known, what in ((methods, METHODS, "method"), (contenders, CONTENDERS, "contender")):
        unknown = [n for n in name if n not in known]
        if unknown:
            parser.error(f"unknown {what} {unknown}; known: {', '.join(known)}")
    records = run(methods, contenders, steps=args.steps, count_classes=args.count_classes,
                  host_classes=args.host_classes, progress=lambda r: print(describe(r), flush=True))
    if args.out:
        from .results import atomic_write_json

        atomic_write_json(args.out, document(records, args.note))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
