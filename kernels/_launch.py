"""Launching a @triton.jit kernel on the eager path at a fraction of Triton's per-launch host cost.

`kernel[grid](*args, **options)` goes through JITFunction.run on every call: it binds the arguments, specialises
each one (type, 16-byte alignment of pointers, integers equal to 1 or divisible by 16), builds the cache key, looks
the compiled kernel up, reads the launch metadata and calls the compiled kernel's launcher. Measured on a CPU with
Triton's own code up to a no-op launcher (`python -m bench.kernel_host ... --launch jit-triton`), that is 9-10 us
per launch over the launcher's own, 2.6-4.6 ms of a training step (MaPLe: 242 launches) when no CUDA graph replays
them; this path costs about 3.5 us (bench/results/host-kernel-path-cpu.json, `launch_path`).

`launch(kernel, grid, *args, **options)` does the same launch. The first call with a given key goes through
Triton's own path (which compiles or finds the kernel, and launches it) and remembers the compiled kernel Triton
returned; later calls with the same key call that kernel's launcher directly with the arguments JITFunction.run
would pass it: (grid, stream, function, packed metadata, launch metadata, the launch hooks, every argument of the
signature in order with the defaults filled in), the launch metadata built only when a launch hook will read it
(the launchers hand it to the hooks and to nothing else). The key is finer than Triton's specialisation, so a key
seen before means Triton would pick the same compiled kernel: the current device, every option and constexpr by
value, the knobs that enter Triton's options (debug, instrumentation mode), each tensor's dtype and address modulo
16, each other argument's type and exact value. Anything else (another argument type, a grid that is not a tuple, a
kernel with pre-run hooks, the interpreter, a Triton release whose launch call was not checked) takes Triton's
path. What this leaves out of JITFunction.run is its check that the module globals a kernel read have not changed
since it was compiled, a guard for code edited at run time.

Checked for Triton 3.6, 3.7 and 3.8, whose JITFunction.run calls the launcher in this form (tests/kernels/
test_launch.py compares, launch by launch over whole training steps, the launcher arguments of both paths with a
stand-in launcher; on a GPU the outputs of every kernel both ways).
"""

from __future__ import annotations

import torch
import triton

# Releases whose JITFunction.run was read and whose launch call this reproduces.
CHECKED_RELEASES = ("3.6", "3.7", "3.8")


def checked_release(version: str) -> bool:
    """Whether Triton `version` (e.g. '3.7.1') is a release this module's launch call was checked against."""
    return ".".join(version.split(".")[:2]) in CHECKED_RELEASES


try:  # the names this path reads from Triton (present in the checked releases)
    from triton.knobs import HookChain as _HookChain
    from triton.runtime.driver import driver as _driver
    from triton.runtime.jit import JITFunction as _JIT
except ImportError:  # another release: Triton's path only
    _HookChain = _driver = _JIT = None
ENABLED = checked_release(triton.__version__) and _JIT is not None  # else every launch takes Triton's path
_CACHE_LIMIT = 512  # keys per kernel; past it the kernel's entries are dropped (a run of ever-changing shapes)
_MISSING = object()
_entries: dict[int, dict] = {}  # id(kernel) -> {key: (compiled kernel, the signature after the positionals)}
_tails: dict[tuple, tuple] = {}  # (id(kernel), positional count, option names) -> the rest of the signature
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _key(device, args, options) -> tuple | None:
    """A key finer than Triton's specialisation (see the module docstring), or None for an argument of another
    type. Flat, and decodable in one way only: an option is a (name, value) pair, a tensor two tokens (its dtype,
    its address modulo 16), a number two (its type, its value), None one."""
    knobs = triton.knobs
    key = [device, knobs.runtime.debug, knobs.compilation.instrumentation_mode, *options.items()]
    append = key.append
    for arg in args:
        kind = type(arg)
        if kind is int or kind is float or kind is bool:
            append(kind)
            append(arg)
        elif kind in _PLAIN_TENSORS:
            append(arg.dtype)
            append(arg.data_ptr() & 15)
        elif arg is None:
            append(None)
        else:
            return None
    return tuple(key)


def _tail(kernel, positionals: int, options) -> tuple:
    """(name, default) of each signature parameter after the positional arguments, in order."""
    index = (id(kernel), positionals, tuple(options))
    tail = _tails.get(index)
    if tail is None:
        params = list(kernel.signature.parameters.values())[positionals:]
        tail = _tails[index] = tuple((p.name, _MISSING if p.default is p.empty else p.default) for p in params)
    return tail


def launch(kernel, grid: tuple, *args, **options) -> None:
    """kernel[grid](*args, **options), through the compiled kernel's launcher once Triton has chosen it for this key.
    `options` holds the constexpr arguments and the compile options (num_warps, num_stages)."""
    if not ENABLED or type(kernel) is not _JIT or type(grid) is not tuple or kernel.pre_run_hooks \
            or getattr(triton.knobs.runtime, "add_stages_inspection_hook", None) is not None:
        kernel[grid](*args, **options)
        return
    active = _driver.active
    device = active.get_current_device()
    key = _key(device, args, options)
    entries = _entries.get(id(kernel))
    try:
        entry = entries.get(key) if entries is not None and key is not None else None
    except TypeError:  # an option of an unhashable value: Triton's path, every time
        key = entry = None
    if entry is None:
        compiled = kernel[grid](*args, **options)  # Triton's own path: compiles or finds, and launches
        if key is not None and getattr(compiled, "function", None) is not None:
            if entries is None:
                entries = _entries[id(kernel)] = {}
            elif len(entries) >= _CACHE_LIMIT:
                entries.clear()
            entries[key] = (compiled, _tail(kernel, len(args), options))
        return
    compiled, tail = entry
    bound = args
    if tail:
        rest = []
        for name, default in tail:
            value = options.get(name, default)
            if value is _MISSING:  # a parameter without a value: Triton's binder raises the error
                kernel[grid](*args, **options)
                return
            rest.append(value)
        bound = args + tuple(rest)
    stream = active.get_current_stream(device)
    grid_1 = grid[1] if len(grid) > 1 else 1
    grid_2 = grid[2] if len(grid) > 2 else 1
    hooks = triton.knobs.runtime
    enter = hooks.launch_enter_hook
    # The launch metadata only goes to the launch hooks: Triton builds it for every launch while its hook chain
    # exists, even empty (no profiler attached), which the launcher then calls with it to no effect.
    metadata = None if enter is None or (type(enter) is _HookChain and not enter.calls) else \
        compiled.launch_metadata(grid, stream, *bound)
    compiled.run(grid[0], grid_1, grid_2, stream, compiled.function, compiled.packed_metadata, metadata,
                 enter, hooks.launch_exit_hook, *bound)


def clear() -> None:
    """Forget every remembered compiled kernel (the next launch of each key goes through Triton's path)."""
    _entries.clear()
