"""Compile every Triton kernel configuration for real GPUs ahead of time, without a GPU.

    python -m fastprompt.kernels.aot [--arch 90 80] [--jobs N] [--json PATH] [--match TEXT]

For every configuration listed in the ``AOT_SPECS`` of the modules of ``fastprompt.kernels``,
``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch,
32))`` produces PTX and a cubin on a CPU-only machine; ``cuobjdump --dump-resource-usage`` (it
ships inside triton's package) reads registers, stack and local memory from the cubin. It
fails (exit status 1) when a configuration does not compile, when a matrix kernel's sm_90 PTX
has no ``wgmma`` instruction, or when a hot kernel spills (stack or local bytes > 0). This
catches what the interpreter lets through: mixed-dtype ``tl.dot``, non-constexpr globals,
register blow-ups. It cannot run under ``TRITON_INTERPRET=1`` (``@triton.jit`` then returns an
interpreter object with nothing to compile): run it in a process without that variable.

Cost: a cold run is one full Triton compile per configuration and architecture (0.3 s for a
LayerNorm, about 1 s for a 128x128 GEMM on one core), spread over ``--jobs`` processes.
Compiled kernels land in Triton's cache (``TRITON_CACHE_DIR``, default ``~/.triton/cache``),
so a rerun with unchanged kernels takes seconds; ``--match`` compiles a subset.

Spec format (the contract for kernel modules)
---------------------------------------------
A kernel module exposes ``AOT_SPECS``: a list of ``AotSpec``, one per configuration its
launcher can choose (each tile/num_warps/num_stages choice x each dtype the launcher accepts
x each constexpr variant)::

    AotSpec(
        name="layer_norm_fwd[x=bf16,w=fp32,BLOCK_D=1024]",  # unique, readable
        fn=layer_norm_fwd_kernel,                           # the @triton.jit function
        signature={"x_ptr": "*bf16", "d": "i32", "eps": "fp32", ...},  # every runtime argument
        constexprs={"BLOCK_D": 1024},                       # every tl.constexpr argument
        num_warps=4, num_stages=1,
        divisible_by_16=("x_ptr", "d", ...),  # arguments the JIT sees as multiples of 16 at the
                                              # model's shapes (it specialises on this, so the
                                              # AOT build matches the kernel the GPU runs)
        wgmma=False,   # a matrix kernel whose sm_90 PTX must use wgmma
        hot=True,      # must not spill registers
    )

Types are Triton's: ``*fp32``/``*fp16``/``*bf16`` pointers, ``i32``/``i64`` integers, ``fp32``
floats; ``TRITON_DTYPE`` maps torch dtypes to these names. Arguments the runtime would pass as
the integer 1 are specialised by the JIT into constants: list them in ``constexprs`` with the
value 1 (or keep such strides out of the kernel, as these kernels do).

Triton versions: the spec is version-neutral and ``_ast_source`` builds what the installed
triton takes. For 3.6 through 3.9 that is one form, checked against 3.6.0, 3.7.1 and 3.9.0:
``ASTSource(fn, signature, constexprs, attrs)`` with the signature keyed by argument name and
listing every argument, constexpr ones typed ``"constexpr"`` (the form triton/tools/compile.py
uses), constexpr values keyed by name, and ``attrs`` mapping ``(argument index,)`` to
``[["tt.divisibility", 16]]``. Releases that take another form (before 3.2) are refused with
a clear error rather than guessed at.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib
import inspect
import json
import multiprocessing
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any, Mapping

import torch

TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
DEFAULT_ARCHS = (90, 80)
_RESOURCE_LINE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


@dataclasses.dataclass(frozen=True)
class AotSpec:
    """One compile configuration of one kernel (see the module docstring)."""

    name: str
    fn: Any
    signature: Mapping[str, str]
    constexprs: Mapping[str, Any]
    num_warps: int
    num_stages: int
    divisible_by_16: tuple[str, ...] = ()
    wgmma: bool = False
    hot: bool = False


@dataclasses.dataclass
class AotResult:
    """What compiling one spec for one architecture gave."""

    spec: str
    arch: int
    compiled: bool
    error: str = ""
    registers: int = -1
    spill_bytes: int = -1  # stack + local memory per thread
    shared_bytes: int = -1  # Triton's dynamic shared memory + the cubin's static shared memory
    uses_wgmma: bool = False
    wgmma_required: bool = False
    hot: bool = False
    seconds: float = 0.0

    @property
    def problems(self) -> list[str]:
        if not self.compiled:
            return [f"does not compile: {self.error}"]
        found = []
        if self.wgmma_required and self.arch >= 90 and not self.uses_wgmma:
            found.append("matrix kernel without wgmma on sm_90")
        if self.hot and self.spill_bytes > 0:
            found.append(f"hot kernel spills {self.spill_bytes} bytes")
        return found


def discover_specs() -> dict[str, list[AotSpec]]:
    """AOT_SPECS of every module in fastprompt.kernels, keyed by module name."""
    package = importlib.import_module("fastprompt.kernels")
    found: dict[str, list[AotSpec]] = {}
    for info in pkgutil.iter_modules(package.__path__):
        if info.name == "aot":
            continue
        module = importlib.import_module(f"fastprompt.kernels.{info.name}")
        specs = getattr(module, "AOT_SPECS", None)
        if specs is not None:
            found[module.__name__] = list(specs)
    names = [s.name for specs in found.values() for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"AOT spec names must be unique; repeated: {duplicates}")
    return found


def _full_signature(spec: AotSpec) -> dict[str, str]:
    """Every argument of the kernel, in order: its type, or "constexpr"."""
    arg_names = list(spec.fn.arg_names)
    unknown = sorted((set(spec.signature) | set(spec.constexprs) | set(spec.divisible_by_16)) - set(arg_names))
    if unknown:
        raise ValueError(f"{spec.name}: not arguments of {spec.fn.__name__}: {unknown}")
    both = sorted(set(spec.signature) & set(spec.constexprs))
    if both:
        raise ValueError(f"{spec.name}: arguments both typed and constexpr: {both}")
    missing = [a for a in arg_names if a not in spec.signature and a not in spec.constexprs]
    if missing:
        raise ValueError(f"{spec.name}: arguments with neither a type nor a constexpr value: {missing}")
    return {a: ("constexpr" if a in spec.constexprs else spec.signature[a]) for a in arg_names}


def _ast_source(spec: AotSpec):
    import triton

    full = _full_signature(spec)
    arg_names = list(full)
    attrs = {(arg_names.index(a),): [["tt.divisibility", 16]] for a in spec.divisible_by_16}
    params = inspect.signature(triton.compiler.ASTSource.__init__).parameters
    if "constexprs" not in params or "attrs" not in params:
        raise RuntimeError(
            f"triton {triton.__version__}: ASTSource takes {list(params)[1:]}, not the "
            "(fn, signature, constexprs, attrs) of triton 3.6-3.9 that fastprompt supports"
        )
    return triton.compiler.ASTSource(spec.fn, full, dict(spec.constexprs), attrs)


def cuobjdump_path() -> str:
    """cuobjdump from triton's package (or TRITON_CUOBJDUMP_PATH), else from PATH."""
    candidates = []
    try:
        import triton.knobs

        candidates.append(triton.knobs.nvidia.cuobjdump.path)
    except (ImportError, AttributeError, RuntimeError):
        pass
    import triton

    candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    candidates.append(shutil.which("cuobjdump") or "")
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError(
        "cuobjdump not found: looked in triton's package (backends/nvidia/bin), "
        "TRITON_CUOBJDUMP_PATH and PATH"
    )


def resource_usage(cubin: bytes, kernel_name: str) -> dict[str, int]:
    """Registers, stack, static shared and local bytes of one kernel in a cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run(
            [cuobjdump_path(), "--dump-resource-usage", path], capture_output=True, text=True, check=True
        ).stdout
    current = None
    for line in out.splitlines():
        if line.strip().startswith("Function "):
            current = line.strip()[len("Function ") :].rstrip(":")
        match = _RESOURCE_LINE.search(line)
        if match and current == kernel_name:
            reg, stack, shared, local = map(int, match.groups())
            return {"registers": reg, "stack": stack, "shared": shared, "local": local}
    raise RuntimeError(f"cuobjdump reported no resource usage for {kernel_name}:\n{out}")


def _describe(exc: BaseException) -> str:
    """One line naming the error: Triton's CompilationError puts the source excerpt first and
    the message (or a bare caret, with the message in __cause__) last."""
    parts = []
    while exc is not None and len(parts) < 3:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip().strip("^")]
        parts.append(f"{type(exc).__name__}: {lines[-1] if lines else ''}")
        exc = exc.__cause__
    return " <- ".join(parts)


def compile_spec(spec: AotSpec, arch: int) -> AotResult:
    """Compile one spec for sm_<arch> and measure it."""
    import triton
    from triton.backends.compiler import GPUTarget

    result = AotResult(spec=spec.name, arch=arch, compiled=False, wgmma_required=spec.wgmma, hot=spec.hot)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
            kernel = triton.compile(
                _ast_source(spec),
                target=GPUTarget("cuda", arch, 32),
                options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
            )
        usage = resource_usage(kernel.asm["cubin"], kernel.metadata.name)
    except Exception as exc:  # reported per spec; the run fails at the end
        result.error = _describe(exc)
        result.seconds = time.perf_counter() - start
        return result
    result.compiled = True
    result.registers = usage["registers"]
    result.spill_bytes = usage["stack"] + usage["local"]
    result.shared_bytes = int(kernel.metadata.shared) + usage["shared"]
    result.uses_wgmma = "wgmma.mma_async" in kernel.asm["ptx"]
    result.seconds = time.perf_counter() - start
    return result


def _compile_by_index(task: tuple[str, int, int]) -> AotResult:
    module_name, index, arch = task
    spec = importlib.import_module(module_name).AOT_SPECS[index]
    return compile_spec(spec, arch)


def _require_compiler(specs: dict[str, list[AotSpec]]) -> None:
    import triton

    jit = triton.runtime.JITFunction
    interpreted = [s.name for group in specs.values() for s in group if not isinstance(s.fn, jit)]
    if interpreted or os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError(
            "ahead-of-time compilation needs real @triton.jit kernels, but TRITON_INTERPRET=1 "
            "replaced them with interpreter objects: run `python -m fastprompt.kernels.aot` "
            "without TRITON_INTERPRET in the environment"
        )


def run(archs=DEFAULT_ARCHS, jobs: int | None = None, match: str = "") -> list[AotResult]:
    """Compile every discovered spec (whose name contains match) for every arch, in parallel."""
    specs = discover_specs()
    _require_compiler(specs)
    tasks = [
        (module, i, arch)
        for module, group in specs.items()
        for i, spec in enumerate(group)
        if match in spec.name
        for arch in archs
    ]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(tasks)))
    if jobs == 1:
        return [_compile_by_index(t) for t in tasks]
    # fork: the workers inherit the imported kernels instead of importing torch again.
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        return list(pool.map(_compile_by_index, tasks, chunksize=1))


def format_table(results: list[AotResult]) -> str:
    header = f"{'kernel configuration':64} {'sm':>3} {'regs':>5} {'spill':>6} {'smem':>7} {'wgmma':>5} {'s':>5}  status"
    lines = [header, "-" * len(header)]
    for r in results:
        status = "; ".join(r.problems) or "ok"
        wgmma = ("yes" if r.uses_wgmma else "no") if r.compiled else "-"
        lines.append(
            f"{r.spec:64} {r.arch:>3} {r.registers:>5} {r.spill_bytes:>6} {r.shared_bytes:>7} {wgmma:>5} "
            f"{r.seconds:>5.1f}  {status}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastprompt.kernels.aot", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS), help="compute capabilities (90: H100, 80: A100)"
    )
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: CPU count)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--match", default="", help="only the specs whose name contains this text")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = run(args.arch, args.jobs, args.match)
    print(format_table(results))
    failed = [r for r in results if r.problems]
    configurations = len(results) // max(1, len(args.arch))
    print(
        f"\n{len(results)} compiles ({configurations} configurations x {len(args.arch)} archs) in "
        f"{time.perf_counter() - start:.1f} s; {len(failed)} with problems"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) | {"problems": r.problems} for r in results], f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
