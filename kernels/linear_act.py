"""Linear layer with a fused bias + activation epilogue (Triton GEMM).

Forward mode:   out = act(x @ W^T + b)
Gradient mode:  out = g * act'(x @ W^T + b)

The gradient mode is the backward of a frozen-weight MLP that saved only its input x: it
recomputes the pre-activation tile by tile and multiplies, in the epilogue, by the upstream
gradient of the hidden g and the activation's derivative, so neither the pre-activation nor
the 4x-wide hidden is ever stored.

x is [M, K], W is [N, K] (nn.Linear's layout), b is [N]; all three share a dtype (tl.dot needs
operands of one dtype: the GPU compiler rejects a mixed fp32/bf16 dot that the interpreter
accepts). Accumulation is fp32; the result is rounded to x's dtype. fp32 operands use full-fp32
products ("ieee", PyTorch's default matmul precision), not TF32: the fast path is bf16.

Activations: "none", "relu", "gelu" (exact erf), "gelu_tanh" (tanh approximation),
"quick_gelu" (x * sigmoid(1.702 x)). Activation and mode are constexprs. Compiled as runtime
branches instead (measured for bf16 on sm_90), the forward needed 166 registers per thread
against 110-128 specialised (one CTA per SM instead of two) and the gradient mode 254 against
134-186.

Tiles: 128x128x64, 8 warps, 3 stages for bf16/fp16 (wgmma on sm_90); 32x64x16, 4 warps, 2
stages for fp32. Programs are ordered in groups of 8 row tiles so that neighbouring programs
share W tiles in L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch
from ._host import cdiv, check_same_device

ACTIVATIONS = {"none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "quick_gelu": 4}
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Module-level constants a @triton.jit function may read must be tl.constexpr.
_SQRT_HALF = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_TANH_COEF = tl.constexpr(0.044715)
_QUICK_GELU_SCALE = tl.constexpr(1.702)


# Constants multiply tensors from the right: under the interpreter, constexpr * tensor gives a
# constexpr wrapping the tensor, which tl.exp then rejects. tanh has no core tl function
# across Triton 3.6-3.9, so 0.5 * x * (1 + tanh(u)) is written as x / (1 + exp(-2u)).
@triton.jit
def apply_activation(pre, ACTIVATION: tl.constexpr):
    """act(pre) for an fp32 tile; ACTIVATION is an ACTIVATIONS code."""
    if ACTIVATION == 1:
        out = tl.maximum(pre, 0.0)
    elif ACTIVATION == 2:
        out = 0.5 * pre * (1.0 + tl.erf(pre * _SQRT_HALF))
    elif ACTIVATION == 3:
        inner = (pre + pre * pre * pre * _TANH_COEF) * _SQRT_2_OVER_PI
        out = pre / (1.0 + tl.exp(-2.0 * inner))
    elif ACTIVATION == 4:
        out = pre / (1.0 + tl.exp(-pre * _QUICK_GELU_SCALE))
    else:
        out = pre
    return out


@triton.jit
def activation_derivative(pre, ACTIVATION: tl.constexpr):
    """act'(pre) for an fp32 tile; ACTIVATION is an ACTIVATIONS code."""
    if ACTIVATION == 1:
        out = tl.where(pre > 0.0, 1.0, 0.0)
    elif ACTIVATION == 2:
        cdf = 0.5 * (1.0 + tl.erf(pre * _SQRT_HALF))
        out = cdf + pre * tl.exp(-0.5 * pre * pre) * _INV_SQRT_2PI
    elif ACTIVATION == 3:
        inner = (pre + pre * pre * pre * _TANH_COEF) * _SQRT_2_OVER_PI
        t = 2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0
        d_inner = (1.0 + pre * pre * _TANH_COEF * 3.0) * _SQRT_2_OVER_PI
        out = 0.5 * (1.0 + t) + 0.5 * pre * (1.0 - t * t) * d_inner
    elif ACTIVATION == 4:
        s = 1.0 / (1.0 + tl.exp(-pre * _QUICK_GELU_SCALE))
        out = s + pre * s * (1.0 - s) * _QUICK_GELU_SCALE
    else:
        out = tl.full(pre.shape, 1.0, tl.float32)
    return out


@triton.jit
def linear_act_kernel(
    x_ptr,  # [M, K], row stride stride_xm, K contiguous
    w_ptr,  # [N, K], row stride stride_wn, K contiguous
    b_ptr,  # [N]
    g_ptr,  # [M, N] upstream gradient of the activation's output (read in gradient mode)
    out_ptr,  # [M, N], row stride stride_om, x's dtype
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_gm,
    stride_om,
    ACTIVATION: tl.constexpr,  # ACTIVATIONS code
    GRAD_MODE: tl.constexpr,  # False: out = act(pre); True: out = g * act'(pre)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * tiles_n
    first_m = (pid // tiles_per_group) * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_group) % group_rows
    pid_n = (pid % tiles_per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows/columns past the edge wrap around (they are computed but never stored), so the
    # operand loads need a mask along K only.
    load_m = tl.cast(offs_m % M, tl.int64)
    load_n = tl.cast(offs_n % N, tl.int64)
    x_ptrs = x_ptr + load_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + load_n[None, :] * stride_wn + offs_k[:, None]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_left = K - k0
        a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    mask_n = offs_n < N
    acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_mask = (offs_m < M)[:, None] & mask_n[None, :]
    rows64 = tl.cast(offs_m, tl.int64)[:, None]
    if GRAD_MODE:
        g = tl.load(g_ptr + rows64 * stride_gm + offs_n[None, :], mask=out_mask, other=0.0)
        result = g.to(tl.float32) * activation_derivative(acc, ACTIVATION)
    else:
        result = apply_activation(acc, ACTIVATION)
    tl.store(out_ptr + rows64 * stride_om + offs_n[None, :], result.to(out_ptr.dtype.element_ty), mask=out_mask)


def linear_act_config(dtype: torch.dtype) -> dict:
    """Tile configuration the launcher uses for operands of this dtype."""
    if dtype == torch.float32:
        # FMA products (no tensor cores): FMA dots keep a K-row of each operand per thread, so a
        # short K keeps registers (~80) and compile time down.
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=2)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def _uses_interpreter() -> bool:
    return not isinstance(linear_act_kernel, triton.runtime.JITFunction)


def require_kernel_device(op: str, device: torch.device) -> None:
    """The Triton kernels run on CUDA, and on CPU only under the interpreter."""
    if device.type == "cuda" or (device.type == "cpu" and _uses_interpreter()):
        return
    raise ValueError(
        f"{op}: the Triton kernel runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1), got device {device}"
    )


def check_linear_act_args(x, weight, bias, activation: str, grad=None) -> None:
    """Validate linear_act's arguments (also used by the ops' fake implementations)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"linear_act: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if x.dim() != 2 or weight.dim() != 2 or bias.dim() != 1:
        raise ValueError(
            f"linear_act: expected x [M, K], weight [N, K], bias [N]; got shapes "
            f"{list(x.shape)}, {list(weight.shape)}, {list(bias.shape)}"
        )
    (m, k), (n, k_w) = x.shape, weight.shape
    if k < 1:
        raise ValueError("linear_act: the reduction dimension K must be at least 1")
    if k_w != k or bias.shape[0] != n:
        raise ValueError(
            f"linear_act: shapes do not match: x {list(x.shape)}, weight {list(weight.shape)}, "
            f"bias {list(bias.shape)} (need x [M, K], weight [N, K], bias [N])"
        )
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"linear_act: x must be float32, float16 or bfloat16, got {x.dtype}")
    if weight.dtype != x.dtype or bias.dtype != x.dtype:
        raise ValueError(
            f"linear_act: x, weight and bias must share a dtype (one-dtype tensor-core dot), got "
            f"{x.dtype}, {weight.dtype}, {bias.dtype}"
        )
    for name, t in (("x", x), ("weight", weight)):
        if t.shape[1] > 1 and t.stride(1) != 1:
            raise ValueError(f"linear_act: the last dimension of {name} must be contiguous")
    if not bias.is_contiguous():
        raise ValueError("linear_act: bias must be contiguous")
    tensors = {"x": x, "weight": weight, "bias": bias}
    if grad is not None:
        if tuple(grad.shape) != (m, n) or grad.dtype != x.dtype:
            raise ValueError(
                f"linear_act: the upstream gradient must be {x.dtype} [{m}, {n}], got "
                f"{grad.dtype} {list(grad.shape)}"
            )
        if n > 1 and grad.stride(1) != 1:
            raise ValueError("linear_act: the last dimension of the upstream gradient must be contiguous")
        tensors["grad"] = grad
    check_same_device("linear_act", tensors)


def _launch(x, weight, bias, activation: str, grad):
    require_kernel_device("linear_act", x.device)
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return out
    cfg = linear_act_config(x.dtype)
    grid = (cdiv(m, cfg["BLOCK_M"]) * cdiv(n, cfg["BLOCK_N"]),)
    g = grad if grad is not None else out
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # ignored for 16-bit operands
    launch(linear_act_kernel, grid,
        x, weight, bias, g, out, m, n, k,
        x.stride(0), weight.stride(0), g.stride(0), out.stride(0),
        ACTIVATION=ACTIVATIONS[activation], GRAD_MODE=grad is not None,
        INPUT_PRECISION=precision, **cfg,
    )  # fmt: skip
    return out


def linear_act_forward(x, weight, bias, activation: str):
    """act(x @ weight^T + bias) as [M, N] in x's dtype."""
    check_linear_act_args(x, weight, bias, activation)
    return _launch(x, weight, bias, activation, None)


def linear_act_grad(x, weight, bias, grad, activation: str):
    """grad * act'(x @ weight^T + bias): the gradient of the pre-activation, in x's dtype."""
    check_linear_act_args(x, weight, bias, activation, grad)
    if activation == "none":  # act' = 1: nothing to recompute
        return grad.clone()
    return _launch(x, weight, bias, activation, grad)


def _aot_specs():
    from fastprompt.kernels.aot import TRITON_DTYPE, AotSpec

    specs = []
    for dtype in _SUPPORTED_DTYPES:
        t = TRITON_DTYPE[dtype]
        cfg = linear_act_config(dtype)
        tiles = {k: v for k, v in cfg.items() if k.isupper()}
        sig = {
            "x_ptr": f"*{t}", "w_ptr": f"*{t}", "b_ptr": f"*{t}", "g_ptr": f"*{t}", "out_ptr": f"*{t}",
            "M": "i32", "N": "i32", "K": "i32",
            "stride_xm": "i32", "stride_wn": "i32", "stride_gm": "i32", "stride_om": "i32",
        }  # fmt: skip
        aligned = tuple(a for a in sig if a not in ("M",))
        for activation, code in ACTIVATIONS.items():
            for grad_mode in (False, True):
                if grad_mode and activation == "none":
                    continue  # the pre-activation gradient of "none" is g itself: no kernel
                mode = "grad" if grad_mode else "fwd"
                specs.append(
                    AotSpec(
                        name=f"linear_act_{mode}[{t},{activation}]",
                        fn=linear_act_kernel, signature=sig,
                        constexprs={"ACTIVATION": code, "GRAD_MODE": grad_mode,
                                    "INPUT_PRECISION": "ieee" if dtype == torch.float32 else "tf32", **tiles},
                        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], divisible_by_16=aligned,
                        wgmma=dtype != torch.float32, hot=True,
                    )  # fmt: skip
                )
    return specs


# Every configuration the launchers can pick: dtype x activation x mode. fp32 runs "ieee"
# products (FMA, no tensor cores), so only the 16-bit configurations must use wgmma.
AOT_SPECS = _aot_specs()
