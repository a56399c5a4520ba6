"""What the CPU host proxies share (bench/host.py, bench/kernel_host.py, bench/kernel_path.py): the class names, the
step timer, the Python-call count and the counted no-op Triton launcher. Nothing here imports fastprompt, so bench/kernel_host.py can time another
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
