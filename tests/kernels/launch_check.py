"""Run by tests/kernels/test_launch.py in a process without TRITON_INTERPRET (compiled @triton.jit kernels): every
Triton launch of whole training and evaluation steps, made through fastprompt.kernels._launch.launch, is also made
through Triton's own path (kernel[grid](...)), and the two must reach the same compiled kernel with the same
launcher arguments. A stand-in driver (device 0, stream 0, an sm_90 target) and a stand-in compile step (a compiled
kernel per Triton cache key, where Triton would store the real one) let it run on a CPU; nothing is compiled or
launched (bench.proxy.jit_launches). Prints one JSON line: launches compared, how many took the direct path, and
the first mismatch if any.

    python tests/kernels/launch_check.py maple,coop [--misorder] [--disabled]
    (--misorder: a broken launcher, to be caught; --disabled: fastprompt's direct path off)
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("launch_check needs compiled @triton.jit kernels: run it without TRITON_INTERPRET=1")

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: bench/

import torch  # noqa: E402
import triton  # noqa: E402

from bench.proxy import answer_interpreted, jit_launches  # noqa: E402

calls: list[tuple] = []  # (compiled kernel, launcher arguments) of each launch, in order
answer_interpreted()  # fastprompt's launchers accept CPU tensors (the kernels here are compiled ones)

from fastprompt.kernels import _launch  # noqa: E402

report = {"triton": triton.__version__, "enabled": _launch.ENABLED, "compared": 0, "direct": 0, "mismatch": None}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    return type(a) is type(b) and a == b


def checked_launch(kernel, grid, *args, **options):
    """Triton's own launch, then fastprompt's; the launcher calls must match (the metadata: Triton's, or None where
    no launch hook reads it)."""
    kernel[grid](*args, **options)
    theirs = calls[-1]
    entries = _launch._entries.get(id(kernel), {})
    key = _launch._key(0, args, options)
    direct = key is not None and key in entries
    _launch.launch(kernel, grid, *args, **options)
    ours = calls[-1]
    report["compared"] += 1
    report["direct"] += direct
    (k1, a1), (k2, a2) = theirs, ours
    hooks = triton.knobs.runtime.launch_enter_hook
    silent = hooks is None or (isinstance(hooks, triton.knobs.HookChain) and not hooks.calls)
    same_metadata = a2[6] is None and silent if a2[6] is None else type(a1[6]) is type(a2[6])
    rest_same = len(a1) == len(a2) and all(_same(x, y) for i, (x, y) in enumerate(zip(a1, a2)) if i != 6)
    if report["mismatch"] is None and not (k1 is k2 and same_metadata and rest_same):
        report["mismatch"] = {"kernel": kernel.fn.__name__, "same_kernel": k1 is k2, "same_metadata": same_metadata,
                              "triton": [repr(x)[:60] for x in a1], "fastprompt": [repr(x)[:60] for x in a2]}


def main(methods: list[str]) -> None:
    import fastprompt
    from fastprompt.backbones import create_clip
    from fastprompt.evaluation import EvalStep
    from fastprompt.training import TrainStep, make_optimizer

    for module in list(sys.modules.values()):
        if module is not None and getattr(module, "launch", None) is _launch.launch and module is not _launch:
            module.launch = checked_launch
    names = ["red circle", "blue square", "green triangle", "yellow star", "purple hexagon"]
    for method in methods:
        clip = create_clip("small")
        fastprompt.patch(clip, backend="triton")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = fastprompt.build(method, clip, names)
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(2, 3, *model.info.image_size, generator=generator)
        labels = torch.randint(0, len(names), (2,), generator=generator)
        if model.trainable_parameters():
            model.train()
            step = TrainStep(model, make_optimizer(model.trainable_parameters()), cuda_graph=False)
            for _ in range(3):
                step(images, labels)
        evaluation = EvalStep(model, cuda_graph=False)
        for _ in range(2):
            evaluation(images, labels)
    # A view 4 bytes into its storage: another specialisation (unaligned pointer), so never a remembered kernel of
    # the aligned case; Triton compiles (here: records) a kernel of its own for it.
    from fastprompt.kernels import layer_norm

    weight, bias = torch.ones(64), torch.zeros(64)
    aligned = torch.randn(8, 65)[:, :64]
    unaligned = torch.randn(8, 65)[:, 1:]
    for x in (aligned, aligned, unaligned, unaligned):
        layer_norm.layer_norm_forward(x, weight, bias, 1e-5)
    kernels = [k for k, _ in calls[-8:]]
    report["alignment_kernels"] = len({id(k) for k in kernels})


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--disabled" in argv:  # every launch through Triton's path, as for an unchecked release
        argv.remove("--disabled")
        _launch.ENABLED = False
    if "--misorder" in argv:  # the negative control: a launcher that passes the constexprs in reverse order
        argv.remove("--misorder")
        tail = _launch._tail
        _launch._tail = lambda kernel, positionals, options: tuple(reversed(tail(kernel, positionals, options)))
    with jit_launches(on_launch=lambda kernel, arguments: calls.append((kernel, arguments))):
        main(argv[0].split(",") if argv else ["maple"])
    print(json.dumps(report))
