"""Attention backend dispatch: what each backend supports, which one runs, and why.

Four backends implement both attention ops (``attention`` and ``prefix_varlen_attention``):

* ``triton``   fastprompt's kernels (``fastprompt.kernels.attention*``): CUDA (compute
               capability >= 8.0); on CPU only under the Triton interpreter, which is for tests.
* ``xformers`` ``xformers.ops.memory_efficient_attention`` with block-diagonal masks; CUDA only.
* ``sdpa``     ``torch.nn.functional.scaled_dot_product_attention`` (padding + a boolean mask
               for the packed op).
* ``eager``    plain torch matmul-softmax: the reference, runs anywhere.

Each backend declares what it supports, and ``not_supported_reasons(request)`` turns the
declarations plus the environment (is the package importable, does its operator actually run on
this device) into sentences, the xformers dispatch pattern. ``backend="auto"`` takes the first
backend in the device's order with no reasons, except that it never picks the Triton interpreter
(auto on CPU is sdpa). ``explain_backend`` returns the choice together with every backend's
reasons; an explicitly requested backend that cannot run raises ``BackendNotSupportedError``
with its reasons.

The CUDA order of each op comes from timings kept below (``MEASUREMENTS``: device, date, commit,
source file), not from a guess: the measured backends ranked by forward+backward time summed over
the op's measured shapes (a training step runs both directions; the forward-only ranking picks
the same winner at every measured shape), then the backends that were not measured (xformers did
not load on the measuring machine), then ``eager`` always last (it keeps the L x L probabilities,
so its memory grows with the square of the sequence; its speed is not what ranks it). On the
H200 this gives SDPA first for dense attention (vision and VAIPL shapes) and fastprompt's Triton
kernel first for the packed prefix-varlen text (``prefix_stream_attention``, the text tower's whole-stream form,
follows the prefix-varlen order: one fused Triton op when Triton is chosen, the prefixes' dense attention plus
the prefix-varlen op otherwise; it was measured as the two-op sequence). The measured shapes of each op agree on the
winner, so one order per op serves every shape (a test keeps that true when timings change).
On CPU the order is ``sdpa, eager`` (the Triton interpreter is for tests, never auto's choice).
``set_backend_order`` overrides an order (diagnosis runs); ``explain_backend`` quotes the
measurement behind auto's choice.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field

import torch

OPS = ("attention", "prefix_varlen_attention")
BACKENDS = ("triton", "xformers", "sdpa", "eager")


# ----------------------------------------------------------------------------------------------
# Measurements that set auto's order
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """One backend at one shape of one op: median microseconds (triton.testing.do_bench)."""

    op: str
    shape: str
    backend: str
    forward_us: float
    forward_backward_us: float


@dataclass(frozen=True)
class Measurement:
    """Timings of every backend that ran, taken on one device at one commit."""

    device: str
    device_type: str
    date: str
    commit: str
    source: str
    dtype: torch.dtype
    timings: tuple[Timing, ...]
    not_measured: tuple[tuple[str, str], ...] = ()  # (backend, why it has no timing)

    def label(self) -> str:
        return f"{self.device}, {self.date}, commit {self.commit}, {_dtype_name(self.dtype)} ({self.source})"


_VISION = "vision self-attention B=32 L=199 H=12 D=64"  # timing.log's labels
_VAIPL = "VAIPL cross-attention B=4 C=1000 N=199 H=8 D=64"
_TEXT = "packed text S=1000 T=4094 P=5 H=8 D=64"  # sequences, tokens, shared prefix length
# tests/kernels/test_attention_gpu.py -k timing on the H200 run of shared/gpu/2026-11-27 (timing.log).
H200_2026_11_27 = Measurement(
    device="NVIDIA H200", device_type="cuda", date="2026-11-27", commit="e536e88",
    source="shared/gpu/2026-11-27/timing.log", dtype=torch.bfloat16,
    timings=(
        Timing("attention", _VISION, "triton", 77.0, 834.0),
        Timing("attention", _VISION, "sdpa", 29.3, 440.6),
        Timing("attention", _VISION, "eager", 298.7, 1036.4),
        Timing("attention", _VAIPL, "triton", 281.6, 932.2),
        Timing("attention", _VAIPL, "sdpa", 84.2, 457.9),
        Timing("attention", _VAIPL, "eager", 112.4, 719.7),
        Timing("prefix_varlen_attention", _TEXT, "triton", 141.2, 1314.4),
        Timing("prefix_varlen_attention", _TEXT, "sdpa", 515.1, 1523.3),
        Timing("prefix_varlen_attention", _TEXT, "eager", 1100.3, 2070.9),
    ),
    not_measured=(("xformers", "xformers 0.0.35 did not load on torch 2.11.0+cu130 (the wheel reports a build "
                               "for torch 2.10.0 with CUDA 12.8)"),),
)
MEASUREMENTS = (H200_2026_11_27,)  # newest first per device type


def measurement_for(device_type: str) -> Measurement | None:
    """The measurement auto's order on ``device_type`` follows (None: no timings for it)."""
    return next((m for m in MEASUREMENTS if m.device_type == device_type), None)


def measured_order(op: str, measurement: Measurement) -> tuple[str, ...]:
    """``op``'s backends ranked by ``measurement``: measured ones by forward+backward time summed over the op's
    shapes, then the unmeasured ones in BACKENDS order, eager last."""
    totals: dict[str, float] = {}
    for t in measurement.timings:
        if t.op == op and t.backend != "eager":
            totals[t.backend] = totals.get(t.backend, 0.0) + t.forward_backward_us
    ranked = sorted(totals, key=totals.__getitem__)
    rest = [name for name in BACKENDS if name not in ranked and name != "eager"]
    return (*ranked, *rest, "eager")


def measurement_note(op: str, measurement: Measurement) -> str:
    """Why auto's order for ``op`` is what it is: every backend's timings, per measured shape."""
    shapes = dict.fromkeys(t.shape for t in measurement.timings if t.op == op)
    parts = []
    for shape in shapes:
        row = ", ".join(f"{t.backend} {t.forward_us:g}/{t.forward_backward_us:g}"
                        for t in measurement.timings if t.op == op and t.shape == shape)
        parts.append(f"{shape}: {row}")
    missing = "; ".join(f"{name} not measured: {why}" for name, why in measurement.not_measured)
    return (f"auto's order for {op} ({', '.join(measured_order(op, measurement))}) follows the timings on "
            f"{measurement.label()}, microseconds forward/forward+backward: " + "; ".join(parts)
            + (f"; {missing}" if missing else ""))


_CPU_ORDER = ("sdpa", "eager")  # Triton on CPU is the interpreter, which auto never picks
_FALLBACK_ORDER = ("sdpa", "eager")  # device types without an entry of their own


def _default_order(op: str, device_type: str) -> tuple[str, ...]:
    measurement = measurement_for(device_type)
    if measurement is not None:
        return measured_order(op, measurement)
    return _CPU_ORDER if device_type == "cpu" else _FALLBACK_ORDER


class BackendNotSupportedError(NotImplementedError):
    """The requested backend (or, for ``auto``, every backend) cannot run these inputs."""


@dataclass(frozen=True)
class AttentionRequest:
    """What a backend needs to know to say whether it can run a call."""

    op: str
    device: torch.device
    dtype: torch.dtype
    head_dim: int
    causal: bool = False

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"unknown attention op {self.op!r}; known: {', '.join(OPS)}")
        object.__setattr__(self, "device", torch.device(self.device))

    def describe(self) -> str:
        mask = ", causal" if self.causal else ""
        return f"{self.op} on {self.device} in {self.dtype} with head_dim {self.head_dim}{mask}"


@dataclass(frozen=True)
class BackendChoice:
    """The outcome of a selection: the chosen backend (None if none can run) and, for every
    backend considered, the reasons it cannot run (an empty list for the chosen one)."""

    request: AttentionRequest
    requested: str
    chosen: str | None
    considered: tuple[tuple[str, tuple[str, ...]], ...] = field(default=())
    why_order: str = ""  # for auto: where the order it followed comes from (a measurement, or a setting)

    def __str__(self) -> str:
        lines = [f"{self.request.describe()}: backend={self.requested!r} -> "
                 f"{self.chosen if self.chosen else 'no backend can run it'}"]
        for name, reasons in self.considered:
            if not reasons:
                lines.append(f"  {name}: can run")
            for reason in reasons:
                lines.append(f"  {name}: {reason}")
        if self.why_order:
            lines.append(f"  why this order: {self.why_order}")
        return "\n".join(lines)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------------------------
# Environment probes (cached: they import packages or run a tiny kernel once)
# ----------------------------------------------------------------------------------------------


@functools.cache
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


# fastprompt's Triton kernels are written, compiled (CI compiles them for sm_90) and measured for Ampere and
# later GPUs: native bf16 and the tensor-core paths they use. 'auto' gives older GPUs (V100, T4) PyTorch ops, and
# the precision defaults give them fp16 where they would give bf16 (computes_bf16).
TRITON_MIN_CAPABILITY = (8, 0)


def computes_bf16(device) -> bool:
    """A CUDA device that computes bf16 natively (compute capability >= 8.0); False for every other device."""
    device = torch.device(device)
    return device.type == "cuda" and _cuda_capability(_device_index(device)) >= TRITON_MIN_CAPABILITY


def block_kernels_problem(device) -> str | None:
    """Why backend='auto' runs LayerNorm, the MLP and the coupling maps as PyTorch ops on `device`, or None where
    it runs fastprompt's Triton kernels: a CUDA device of compute capability >= 8.0 on which they import. One
    rule for fastprompt.patch and `fastprompt info`."""
    device = torch.device(device)
    if device.type != "cuda":
        return "the Triton kernels are used on CUDA devices only"
    problem = triton_import_problem()
    if problem is not None:
        return f"Triton cannot run: {problem}"
    capability = _cuda_capability(_device_index(device))
    if capability < TRITON_MIN_CAPABILITY:
        need, has = (".".join(map(str, c)) for c in (TRITON_MIN_CAPABILITY, capability))
        return f"fastprompt's Triton kernels are built for compute capability >= {need}; {device} has {has}"
    return None


@functools.cache
def triton_import_problem() -> str | None:
    """None if fastprompt's Triton kernels import, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        from fastprompt.kernels import attention, attention_prefix  # noqa: F401
    except Exception as exc:  # an incompatible triton fails here, with its own message
        return f"importing the Triton kernels failed: {type(exc).__name__}: {exc}"
    return None


@functools.cache
def triton_interpreted() -> bool:
    """True when triton runs kernels in its interpreter (TRITON_INTERPRET=1 before import)."""
    if triton_import_problem() is not None:
        return False
    from fastprompt.kernels import attention

    return attention.interpreted()


@functools.cache
def xformers_import_problem() -> str | None:
    """None if xformers' memory_efficient_attention and its masks import, else why not."""
    if importlib.util.find_spec("xformers") is None:
        return "xformers is not installed"
    try:
        import xformers.ops as xops
    except Exception as exc:  # built for another torch/CUDA, missing shared libraries, ...
        return f"importing xformers.ops failed: {type(exc).__name__}: {exc}"
    if getattr(xops, "memory_efficient_attention", None) is None:
        return ("xformers.ops has no memory_efficient_attention (recent xformers moved it to the "
                "separate 'mslk' package; install it or an xformers that includes fmha)")
    try:
        from xformers.ops.fmha.attn_bias import (  # noqa: F401
            BlockDiagonalCausalFromBottomRightMask,
            LowerTriangularMask,
        )
    except Exception as exc:
        return f"xformers has no block-diagonal attention masks: {type(exc).__name__}: {exc}"
    return None


@functools.cache
def xformers_run_problem(device_type: str, index: int, dtype: torch.dtype = torch.bfloat16) -> str | None:
    """None if memory_efficient_attention runs a tiny masked call on this device and dtype, else
    why not.

    Detects what an import cannot: C++/CUDA extensions built for another torch or CUDA, or no
    operator for this GPU."""
    problem = xformers_import_problem()
    if problem is not None:
        return problem
    import xformers.ops as xops
    from xformers.ops.fmha.attn_bias import BlockDiagonalCausalFromBottomRightMask

    device = torch.device(device_type, index)
    try:
        q = torch.randn(1, 3, 1, 64, device=device, dtype=dtype)
        kv = torch.randn(1, 5, 1, 64, device=device, dtype=dtype)
        mask = BlockDiagonalCausalFromBottomRightMask.from_seqlens(q_seqlen=[1, 2], kv_seqlen=[2, 3])
        xops.memory_efficient_attention(q, kv, kv, attn_bias=mask)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return (f"memory_efficient_attention failed on {device} in {_dtype_name(dtype)}: "
                f"{type(exc).__name__}: {first_line}")
    return None


def clear_caches() -> None:
    """Forget probe results and cached selections (after installing a package, in tests)."""
    for probe in (_cuda_capability, triton_import_problem, triton_interpreted,
                  xformers_import_problem, xformers_run_problem):
        probe.cache_clear()
    _selection_cache.clear()


# ----------------------------------------------------------------------------------------------
# Declarations
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    name: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    device_dtypes: tuple[tuple[str, tuple[torch.dtype, ...]], ...] = ()  # narrower per device
    head_dims: tuple[int, ...] | None = None  # None: any up to max_head_dim
    max_head_dim: int | None = None
    min_cuda_capability: tuple[int, int] | None = None
    ops: tuple[str, ...] = OPS

    def declared_reasons(self, request: AttentionRequest) -> list[str]:
        """Reasons that follow from the declarations alone."""
        reasons = []
        if request.op not in self.ops:
            reasons.append(f"does not implement {request.op}")
        if request.device.type not in self.devices:
            reasons.append(f"runs on {'/'.join(self.devices)} only, not {request.device.type}")
        allowed = dict(self.device_dtypes).get(request.device.type, self.dtypes)
        if request.dtype not in allowed:
            names = ", ".join(_dtype_name(d) for d in allowed)
            where = f" on {request.device.type}" if self.device_dtypes else ""
            reasons.append(f"dtype {_dtype_name(request.dtype)} is not supported{where} (supported: {names})")
        if self.head_dims is not None and request.head_dim not in self.head_dims:
            reasons.append(f"head_dim {request.head_dim} is not supported "
                           f"(supported: {', '.join(map(str, self.head_dims))})")
        if self.max_head_dim is not None and request.head_dim > self.max_head_dim:
            reasons.append(f"head_dim {request.head_dim} is above the maximum {self.max_head_dim}")
        if (self.min_cuda_capability is not None and request.device.type == "cuda"
                and torch.cuda.is_available()):
            cap = _cuda_capability(_device_index(request.device))
            if cap < self.min_cuda_capability:
                need = ".".join(map(str, self.min_cuda_capability))
                reasons.append(f"needs compute capability >= {need}, {request.device} has "
                               f"{cap[0]}.{cap[1]}")
        return reasons

    def environment_reasons(self, request: AttentionRequest) -> list[str]:
        """Reasons that come from the installed packages and the device."""
        if request.device.type == "cuda" and not torch.cuda.is_available():
            return ["CUDA is not available in this torch build or on this machine"]
        return []

    def auto_reasons(self, request: AttentionRequest) -> list[str]:
        """Reasons ``auto`` skips a backend that could run if asked for explicitly."""
        return []

    def package_problem(self) -> str | None:
        """Why the backend's package cannot be used anywhere (for reports), or None."""
        return None

    def not_supported_reasons(self, request: AttentionRequest) -> list[str]:
        reasons = self.declared_reasons(request)
        if not reasons:  # probes can import packages or launch a kernel: only when they matter
            reasons = self.environment_reasons(request)
        return reasons


class TritonBackend(Backend):
    def package_problem(self):
        return triton_import_problem()

    def environment_reasons(self, request):
        reasons = super().environment_reasons(request)
        problem = triton_import_problem()
        if problem is not None:
            return reasons + [problem]
        if request.device.type == "cpu" and not triton_interpreted():
            reasons.append("Triton kernels run on CPU only in the interpreter (set TRITON_INTERPRET=1 "
                           "before triton is imported; it is slow and meant for tests)")
        return reasons

    def auto_reasons(self, request):
        if triton_interpreted():
            return ["auto does not pick the Triton interpreter (slow, meant for tests); pass "
                    "backend='triton' to use it"]
        return []


class XformersBackend(Backend):
    def package_problem(self):
        return xformers_import_problem()

    def environment_reasons(self, request):
        reasons = super().environment_reasons(request)
        if reasons:
            return reasons
        problem = xformers_run_problem(request.device.type, _device_index(request.device), request.dtype)
        return [problem] if problem is not None else []


class SdpaBackend(Backend):
    def environment_reasons(self, request):
        reasons = super().environment_reasons(request)
        if not hasattr(torch.nn.functional, "scaled_dot_product_attention"):
            reasons.append(f"torch {torch.__version__} has no scaled_dot_product_attention")
        return reasons


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_REGISTRY: dict[str, Backend] = {
    # fp16/bf16 compiled on GPUs; fp32 only in the interpreter (CPU tests): fp32 on a GPU is
    # sdpa's (see fastprompt.kernels.attention).
    "triton": TritonBackend("triton", devices=("cuda", "cpu"), dtypes=_FLOAT_DTYPES,
                            device_dtypes=(("cuda", (torch.float16, torch.bfloat16)), ("cpu", (torch.float32,))),
                            head_dims=(64, 80, 128), min_cuda_capability=TRITON_MIN_CAPABILITY),
    "xformers": XformersBackend("xformers", devices=("cuda",), dtypes=_FLOAT_DTYPES, max_head_dim=256),
    "sdpa": SdpaBackend("sdpa", devices=("cuda", "cpu"), dtypes=_FLOAT_DTYPES + (torch.float64,)),
    "eager": Backend("eager", devices=("cuda", "cpu", "mps", "xpu"),
                     dtypes=_FLOAT_DTYPES + (torch.float64,)),
}


def get_backend(name: str) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention backend {name!r}; choose 'auto' or one of "
                         f"{', '.join(BACKENDS)}")
    return _REGISTRY[name]


# ----------------------------------------------------------------------------------------------
# Order and selection
# ----------------------------------------------------------------------------------------------

_order: dict[tuple[str, str], tuple[str, ...]] = {}
_selection_cache: dict[tuple[AttentionRequest, str], BackendChoice] = {}


def get_backend_order(op: str, device_type: str) -> tuple[str, ...]:
    """The order ``auto`` tries backends in for ``op`` on ``device_type``."""
    if op not in OPS:
        raise ValueError(f"unknown attention op {op!r}; known: {', '.join(OPS)}")
    return _order.get((op, device_type)) or _default_order(op, device_type)


def order_reason(op: str, device_type: str) -> str:
    """Where auto's order for ``op`` on ``device_type`` comes from, in a sentence."""
    if (op, device_type) in _order:
        return "set by set_backend_order"
    measurement = measurement_for(device_type)
    if measurement is not None:
        return measurement_note(op, measurement)
    return ("no timings for this device type: sdpa, then eager (the Triton interpreter is for tests)"
            if device_type == "cpu" else "no timings for this device type: sdpa, then eager")


def set_backend_order(order, *, op: str | None = None, device_type: str = "cuda") -> None:
    """Set the order ``auto`` tries backends in (e.g. from benchmark measurements).

    ``op=None`` sets it for both ops; ``order=None`` restores the default. Graphs already
    compiled with torch.compile keep the choice made when they were traced."""
    ops = OPS if op is None else (op,)
    for name in ops:
        get_backend_order(name, device_type)  # validates op
    if order is not None:
        order = tuple(order)
        for name in order:
            get_backend(name)
        if len(set(order)) != len(order):
            raise ValueError(f"backend order {order} names a backend twice")
    for name in ops:
        if order is None:
            _order.pop((name, device_type), None)
        else:
            _order[(name, device_type)] = order
    _selection_cache.clear()


def _choose(request: AttentionRequest, backend: str) -> BackendChoice:
    if backend != "auto":
        reasons = tuple(get_backend(backend).not_supported_reasons(request))
        return BackendChoice(request, backend, None if reasons else backend, ((backend, reasons),))
    considered = []
    chosen = None
    for name in get_backend_order(request.op, request.device.type):
        impl = _REGISTRY[name]
        reasons = impl.not_supported_reasons(request) or impl.auto_reasons(request)
        considered.append((name, tuple(reasons)))
        if not reasons:
            chosen = name
            break
    return BackendChoice(request, "auto", chosen, tuple(considered),
                         order_reason(request.op, request.device.type))


def explain_backend(op: str, *, device, dtype: torch.dtype, head_dim: int, causal: bool = False,
                    backend: str = "auto") -> BackendChoice:
    """Which backend runs ``op`` for such inputs, and every considered backend's reasons.

    >>> print(explain_backend("attention", device="cpu", dtype=torch.float32, head_dim=64))
    attention on cpu in torch.float32 with head_dim 64: backend='auto' -> sdpa
      sdpa: can run
      why this order: no timings for this device type: sdpa, then eager (the Triton interpreter is for tests)
    """
    if backend != "auto":
        get_backend(backend)
    return _choose(AttentionRequest(op, torch.device(device), dtype, head_dim, causal), backend)


def select_backend(request: AttentionRequest, backend: str = "auto") -> str:
    """The name of the backend to run ``request``; raises if none (or not the requested) can."""
    key = (request, backend)
    choice = _selection_cache.get(key)
    if choice is None:
        if backend != "auto":
            get_backend(backend)
        choice = _choose(request, backend)
        _selection_cache[key] = choice
    if choice.chosen is None:
        if backend == "auto":
            detail = "; ".join(f"{name}: {', '.join(reasons)}" for name, reasons in choice.considered)
            raise BackendNotSupportedError(f"no attention backend can run {request.describe()} "
                                           f"({detail})")
        reasons = "; ".join(choice.considered[0][1])
        raise BackendNotSupportedError(f"attention backend {backend!r} cannot run "
                                       f"{request.describe()}: {reasons}")
    return choice.chosen


def backend_report(device, dtype: torch.dtype, head_dim: int = 64) -> list[dict]:
    """For ``fastprompt.info``: every op x backend on ``device`` with its status and reasons,
    and which backend ``auto`` picks."""
    rows = []
    for op in OPS:
        request = AttentionRequest(op, torch.device(device), dtype, head_dim, causal=op != "attention")
        auto = _choose(request, "auto").chosen
        for name in BACKENDS:
            impl = _REGISTRY[name]
            reasons = impl.not_supported_reasons(request)
            problem = impl.package_problem() if reasons else None
            if problem is not None and problem not in reasons:
                reasons.append(problem)  # e.g. "not installed" besides "runs on cuda only"
            rows.append({
                "op": op, "backend": name, "device": str(request.device),
                "dtype": str(dtype).replace("torch.", ""), "head_dim": head_dim,
                "available": not reasons, "reasons": list(reasons),
                "auto_skips": list(impl.auto_reasons(request)) if not reasons else [],
                "auto_choice": auto == name,
            })
    return rows
