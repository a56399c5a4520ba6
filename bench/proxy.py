"""What the CPU host proxies share (bench/host.py, bench/kernel_host.py, bench/kernel_path.py): the class names, the
step timer, the Python-call count, the counted no-op Triton launcher (interpreter) and Triton's own JIT launch path
with a counted no-op launcher. Nothing here imports fastprompt, so bench/kernel_host.py can time another
checkout's code (`--tree`, an A/B against an older commit) with the same helpers.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections import Counter


def classnames(count: int) -> list[str]:
    """Real ImageNet class names: all 1,000, or `count` of them spread over the set."""
    from open_clip import IMAGENET_CLASSNAMES

    names = list(IMAGENET_CLASSNAMES)
    return names if count >= len(names) else names[:: len(names) // count][:count]


def step_seconds(step, images, labels, steps: int, warmup: int) -> list[float]:
    """Wall seconds of each of `steps` calls of step(images, labels), after `warmup` untimed ones."""
    for _ in range(warmup):
        step(images, labels)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step(images, labels)
        times.append(time.perf_counter() - start)
    return times


def python_calls(step, images, labels) -> dict:
    """Python function calls and C function calls made by one call of step(images, labels), counted with
    sys.setprofile: a host-time measure that, unlike milliseconds on a shared machine, does not vary between runs
    (each call costs roughly 0.3-1 us of host time; the interpreter's own work per call is what a step without a
    CUDA graph pays on top of the launches)."""
    counts = {"call": 0, "c_call": 0}

    def count(frame, event, arg):
        if event in counts:
            counts[event] += 1

    sys.setprofile(count)
    try:
        step(images, labels)
    finally:
        sys.setprofile(None)
    return {"python_calls_per_step": counts["call"], "c_calls_per_step": counts["c_call"]}


@contextlib.contextmanager
def counted_triton_launches():
    """Inside, every Triton launch is a no-op counted per kernel name (under TRITON_INTERPRET=1, where @triton.jit
    gives interpreted kernels): fastprompt's launchers and everything around them run for real, no kernel does.
    Yields the Counter; the interpreter's launcher is put back on exit."""
    import triton.runtime.interpreter as interpreter

    launches: Counter = Counter()

    def count(self, *args, **kwargs):
        launches[self.fn.__name__] += 1

    run, interpreter.InterpretedFunction.run = interpreter.InterpretedFunction.run, count
    try:
        yield launches
    finally:
        interpreter.InterpretedFunction.run = run


# The functions through which fastprompt's launchers and backend choice ask whether Triton is interpreted: answered
# yes, CPU tensors pass the launchers' device checks and patch(backend='triton') is allowed on a CPU, while
# jit_launches runs compiled kernels' launch path (the launchers then take the GPU's configurations: the only
# interpreter-specific choice, grouped_mlp's fp32 chunk, is the one a GPU's bf16 takes).
INTERPRETER_QUESTIONS = (("fastprompt.kernels.attention", "interpreted"),
                         ("fastprompt.kernels.linear_act", "_uses_interpreter"),
                         ("fastprompt.kernels.layer_norm", "_uses_interpreter"),
                         ("fastprompt.kernels.grouped_mlp", "_uses_interpreter"),
                         ("fastprompt.ops.backends", "triton_interpreted"))


def answer_interpreted() -> None:
    """fastprompt's "is Triton interpreted?" questions answered yes for the rest of the process (see above)."""
    import importlib

    for module, name in INTERPRETER_QUESTIONS:
        setattr(importlib.import_module(module), name, lambda: True)


@contextlib.contextmanager
def jit_launches(on_launch=None):
    """Inside, Triton launches take Triton's own JIT launch path (JITFunction.run: argument binding, the
    specialisation of every argument, the cache key, the grid, the launch metadata) up to the launcher, which is a
    no-op counted per kernel: the host cost of each launch on a GPU less the C launcher's own. Needs kernels
    compiled by @triton.jit, so TRITON_INTERPRET must be unset for the whole process. A stand-in driver answers
    device 0, stream 0 and an sm_90 target; the first launch of each specialisation stores a stand-in compiled
    kernel where Triton's compile would store the real one, so nothing is compiled. `on_launch(kernel, arguments)`,
    when given, sees every launcher call. Yields the Counter; Triton's driver and compile step are put back on
    exit."""
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("jit_launches needs compiled @triton.jit kernels: run without TRITON_INTERPRET=1")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import CompiledKernel
    from triton.runtime import driver as drivers
    from triton.runtime.jit import JITFunction

    launches: Counter = Counter()

    class Driver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    class Compiled:
        """What JITFunction.run reads of a CompiledKernel: its own launch_metadata (what it does per launch differs
        between Triton releases: 3.7 builds a dict per launch for its always-present hook chain), loaded handles, and
        `run`, the launcher, here counting."""
        packed_metadata, src = ("packed",), None
        launch_metadata = CompiledKernel.launch_metadata

        def __init__(self, name: str):
            self.name, self.function = name, object()  # a loaded kernel's handle, one per compiled kernel

        def _init_handles(self):
            """Nothing to load: the handle above stands in for a loaded kernel's."""

        def run(self, *args):
            launches[self.name] += 1
            if on_launch is not None:
                on_launch(self, args)

    stored_keys = []

    def stored(self, key, signature, device, constexprs, options, attrs, warmup):
        kernel = Compiled(self.fn.__name__)
        self.device_caches[device][0][key] = kernel
        stored_keys.append((self.device_caches[device][0], key))
        return kernel

    active, compile_step = drivers._active, JITFunction._do_compile
    drivers.set_active(Driver())
    JITFunction._do_compile = stored
    try:
        yield launches
    finally:
        JITFunction._do_compile = compile_step
        drivers._active = active
        for cache, key in stored_keys:  # no stand-in outlives the context (a later one counts into its own Counter)
            cache.pop(key, None)


def run_measurement(measure, defaults: tuple[int, ...], argv=None) -> int:
    """The command line of a CPU measurement script: `python -m bench.<script> [N ...]` passes up to len(defaults)
    integers (the rest from `defaults`) to `measure`, on one intra-op thread, and prints its record as a JSON line."""
    import json

    import torch

    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) > len(defaults) or not all(arg.isdigit() for arg in argv):
        raise SystemExit(f"expected up to {len(defaults)} positive integers (defaults {' '.join(map(str, defaults))}),"
                         f" got {' '.join(argv)!r}")
    torch.set_num_threads(1)
    print(json.dumps(measure(*[int(arg) for arg in argv], *defaults[len(argv):])), flush=True)
    return 0
