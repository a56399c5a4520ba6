"""Host time of the GPU kernel path's training step, measured on a CPU: the host-overhead proxy that runs real code.

bench/kernel_path.py counts the ops a GPU step dispatches; this times the Python and dispatcher work behind them. The
model is patched with the Triton kernels (allowed on a CPU under TRITON_INTERPRET=1) and every Triton launch is made a
no-op (or, with --launch jit, goes through Triton's own launch path to a no-op launcher), so a training step (forward, loss, backward, the guarded fused optimizer step) runs all of fastprompt's
wrappers, launchers, autograd Functions and aten ops for real, and no kernel. The backbone has ViT-B/16's depth (12 +
12 blocks, 77-token causal text, the real tokenizer and 1,000 ImageNet names) at width 64 with one head of 64, so the
aten arithmetic that remains is small beside the host work. What it cannot see: the C launcher's own cost per
Triton launch and the GPU's time; bench/device/host_gpu.py measures those on a GPU.

    python -m bench.kernel_host maple,coop [classes] [batch]     # a JSON line per method: median host ms per step
    python -m bench.kernel_host maple 100 2 --tree /tmp/old     # the same, timing another checkout's fastprompt
    python -m bench.kernel_host maple,coop 10 1 --launch jit    # compiled kernels' launch path (no TRITON_INTERPRET)

`--launch jit-triton` times the same step with every launch going through Triton's JIT launch path
(JITFunction.run: binding, per-argument specialisation, cache key, grid, launch metadata) up to a no-op launcher
(bench.proxy.jit_launches): the Python cost each launch adds on a GPU host, which the default stub (the
interpreter's launcher replaced) leaves out. `--launch jit` launches as fastprompt does on a GPU
(fastprompt.kernels._launch: Triton's path once per key, then the compiled kernel's launcher directly). What
remains unseen is the C launcher's own cost (argument marshalling and cuLaunchKernelEx) and the GPU's time.

`--tree DIR` imports fastprompt from the checkout DIR (a `git worktree` of an older commit) instead of this one, with
DIR/kernels as fastprompt.kernels as an install maps it: the same proxy and helpers (bench/proxy.py, which imports
no fastprompt) time both sides of an A/B. Commits before the MLP's GEMM plans (fastprompt.ops.gemm_plan) run the
plan they had, recorded as `mlp_gemm: null`.

Each record also counts the Python and C function calls of one step (bench.proxy.python_calls): milliseconds on a
shared 2-core machine vary by up to 40 % between runs, the call counts not at all, so they show a change that the
times cannot resolve.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import warnings

import torch

BACKBONE = "kernel-host-proxy"
CONFIG = dict(
    embed_dim=64,
    vision_cfg=dict(image_size=32, layers=12, width=64, patch_size=8, head_width=64, mlp_ratio=1),
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=12, mlp_ratio=1),
)


def _launches(launch: str):
    """The context that makes Triton launches no-ops: the interpreter's launcher stubbed ('stub'), or Triton's own JIT
    launch path with a stand-in launcher ('jit', bench.proxy.jit_launches)."""
    from .proxy import answer_interpreted, counted_triton_launches, jit_launches

    if launch == "stub":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("run with TRITON_INTERPRET=1: patch(backend='triton') is refused on a CPU otherwise")
        return counted_triton_launches()
    if launch not in ("jit", "jit-triton"):
        raise ValueError(f"launch must be 'stub', 'jit' or 'jit-triton', got {launch!r}")
    answer_interpreted()
    try:
        from fastprompt.kernels import _launch
    except ImportError:  # a checkout before fastprompt's own launcher (--tree): Triton's path is the only one
        _launch = None
    if _launch is not None:
        _launch.ENABLED = launch == "jit"
        _launch.clear()
    return jit_launches()


def host_ms_per_step(method: str, classes: int = 100, batch: int = 2, steps: int = 15, warmup: int = 3,
                     launch: str = "stub") -> dict:
    import fastprompt
    from fastprompt.backbones import TINY_CONFIGS, create_clip
    from fastprompt.training import TrainStep, make_optimizer

    from .proxy import classnames, python_calls, step_seconds

    with _launches(launch) as launches:  # every launch: counted, no kernel runs
        TINY_CONFIGS.setdefault(BACKBONE, CONFIG)
        clip = create_clip(BACKBONE, precision="fp32", device="cpu")
        # The frozen MLP's first-GEMM plan a CUDA device takes (fastprompt.ops.gemm_plan), not the CPU's: the op
        # sequence is the GPU's.
        try:
            from fastprompt.ops import gemm_plan
        except ImportError:  # an older checkout (--tree): one plan, the one it had
            mlp_gemm, plan = None, {}
        else:
            mlp_gemm = gemm_plan.default_plan("cuda")
            plan = {"mlp_gemm": mlp_gemm}
        fastprompt.patch(clip, backend="triton", **plan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ImageNet's duplicate class names
            model = fastprompt.build(method, clip, classnames(classes))
        model.train()
        step = TrainStep(model, make_optimizer(model.trainable_parameters(), "sgd", lr=2e-3))
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(batch, 3, *model.info.image_size, generator=generator)
        labels = torch.randint(0, classes, (batch,), generator=generator)
        times = [seconds * 1e3 for seconds in step_seconds(step, images, labels, steps, warmup)]
        launches.clear()
        calls = python_calls(step, images, labels)
    return {"method": method, "classes": classes, "batch": batch, "backbone": BACKBONE,
            "checkout": os.path.dirname(os.path.dirname(os.path.abspath(fastprompt.__file__))),
            "mlp_gemm": mlp_gemm, "launch": launch,
            "host_ms_per_step": round(statistics.median(times), 2), "host_ms_min": round(min(times), 2),
            "steps": steps, "threads": torch.get_num_threads(), **calls,
            "triton_launches_per_step": sum(launches.values()), "triton_launches": dict(sorted(launches.items()))}


def use_tree(tree: str) -> None:
    """Import fastprompt from the checkout `tree` (before anything imports it): tree/fastprompt first on the path and
    tree/kernels as fastprompt.kernels, the mapping pyproject.toml gives an install (an editable install of this
    checkout would otherwise supply its own kernels)."""
    import importlib.util

    if "fastprompt" in sys.modules:
        raise RuntimeError("use_tree must run before fastprompt is imported")
    root = os.path.abspath(tree)
    kernels = os.path.join(root, "kernels")
    if not os.path.isfile(os.path.join(root, "fastprompt", "__init__.py")) or not os.path.isdir(kernels):
        raise ValueError(f"--tree {tree}: not a fastprompt checkout (fastprompt/ and kernels/ expected)")
    sys.path.insert(0, root)
    import fastprompt

    spec = importlib.util.spec_from_file_location("fastprompt.kernels", os.path.join(kernels, "__init__.py"),
                                                  submodule_search_locations=[kernels])
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastprompt.kernels"] = module
    spec.loader.exec_module(module)
    fastprompt.kernels = module


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--tree" in argv:
        at = argv.index("--tree")
        if at + 1 >= len(argv):
            raise SystemExit("--tree needs a directory: a checkout of fastprompt")
        try:
            use_tree(argv[at + 1])
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        del argv[at:at + 2]
    launch = "stub"
    if "--launch" in argv:
        at = argv.index("--launch")
        if at + 1 >= len(argv) or argv[at + 1] not in ("stub", "jit", "jit-triton"):
            raise SystemExit("--launch takes stub (the interpreter's launcher stubbed), jit (compiled kernels launched"
                             " as fastprompt does) or jit-triton (every launch through Triton's JITFunction.run)")
        launch = argv[at + 1]
        del argv[at:at + 2]
    methods = argv[0].split(",") if argv else ["maple"]
    classes = int(argv[1]) if len(argv) > 1 else 100
    batch = int(argv[2]) if len(argv) > 2 else 2
    torch.set_num_threads(1)
    for method in methods:
        print(json.dumps(host_ms_per_step(method, classes, batch, launch=launch)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
