"""Elementwise activation and its gradient, in place (Triton): the epilogue of a cuBLAS GEMM done as one pass.

Forward mode:   out = act(pre)
Gradient mode:  out = g * act'(pre)

This is the other half of the frozen MLP's first layer when its GEMM runs on cuBLAS (``torch.addmm``, bias fused in
cuBLASLt's epilogue) instead of fastprompt's Triton GEMM with the activation in its epilogue (linear_act.py):
cuBLASLt has GELU epilogues but no QuickGELU (x * sigmoid(1.702 x), OpenAI CLIP's activation), so the activation is a
second pass over the hidden, one read and one write, in place on the GEMM's fresh output. The gradient mode is the
backward's: cuBLAS recomputes the pre-activation, and this multiplies it into g * act'(pre) in the same buffer, so the
pre-activation is never kept between forward and backward (the memory the frozen MLP saves).

The activations and their derivatives are linear_act's (apply_activation, activation_derivative), evaluated in fp32
on values read in their stored dtype, so both plans compute act of the same rounded pre-activation that eager
PyTorch's F.linear + activation computes. Tensors are flat and contiguous; offsets are 64-bit (a CoCoOp batch's
text hidden can pass 2^31 elements).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch
from ._host import cdiv, check_same_device
from .linear_act import ACTIVATIONS, activation_derivative, apply_activation, require_kernel_device

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# 4,096 elements over 8 warps: 16 per thread, two 16-byte vectors of bf16. A bandwidth-bound pass; each program's
# tile is large enough that launch and tail effects are a few percent of a 20M-element hidden.
_BLOCK, _NUM_WARPS = 4096, 8


@triton.jit
def activation_kernel(
    pre_ptr,  # [n] pre-activation
    g_ptr,  # [n] upstream gradient of act(pre) (read in gradient mode)
    out_ptr,  # [n] result; may be pre_ptr itself (each element is read before it is written, by one thread)
    n,
    ACTIVATION: tl.constexpr,  # ACTIVATIONS code
    GRAD_MODE: tl.constexpr,  # False: out = act(pre); True: out = g * act'(pre)
    BLOCK: tl.constexpr,
):
    offs = tl.cast(tl.program_id(0), tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    pre = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if GRAD_MODE:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        result = g * activation_derivative(pre, ACTIVATION)
    else:
        result = apply_activation(pre, ACTIVATION)
    tl.store(out_ptr + offs, result.to(out_ptr.dtype.element_ty), mask=mask)


def check_activation_args(pre, activation: str, grad=None) -> None:
    """Validate the arguments of activation_ / activation_grad_ (also used by the ops' fake implementations)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if pre.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"activation: the pre-activation must be float32, float16 or bfloat16, got {pre.dtype}")
    if not pre.is_contiguous():
        raise ValueError("activation: the pre-activation must be contiguous (it is written in place)")
    if grad is not None:
        if grad.shape != pre.shape or grad.dtype != pre.dtype or not grad.is_contiguous():
            raise ValueError(
                f"activation: the upstream gradient must be a contiguous {pre.dtype} {list(pre.shape)}, got a "
                f"{'' if grad.is_contiguous() else 'non-contiguous '}{grad.dtype} {list(grad.shape)}"
            )
        check_same_device("activation", {"pre": pre, "grad": grad})
    require_kernel_device("activation", pre.device)


def _launch(pre, grad, activation: str):
    n = pre.numel()
    if n:
        launch(activation_kernel, (cdiv(n, _BLOCK),),
            pre, pre if grad is None else grad, pre, n,
            ACTIVATION=ACTIVATIONS[activation], GRAD_MODE=grad is not None,
            BLOCK=_BLOCK, num_warps=_NUM_WARPS,
        )  # fmt: skip
    return pre


def activation_(pre, activation: str):
    """pre <- act(pre), in place; returns pre."""
    check_activation_args(pre, activation)
    if activation == "none":
        return pre
    return _launch(pre, None, activation)


def activation_grad_(pre, grad, activation: str):
    """pre <- grad * act'(pre), in place (the gradient of the pre-activation); returns pre."""
    check_activation_args(pre, activation, grad)
    if activation == "none":  # act' = 1
        return pre.copy_(grad)
    return _launch(pre, grad, activation)


def _aot_specs():
    from fastprompt.kernels.aot import TRITON_DTYPE, AotSpec

    specs = []
    for dtype in _SUPPORTED_DTYPES:
        t = TRITON_DTYPE[dtype]
        sig = {"pre_ptr": f"*{t}", "g_ptr": f"*{t}", "out_ptr": f"*{t}", "n": "i32"}
        for activation, code in ACTIVATIONS.items():
            if activation == "none":
                continue  # no kernel: act is the identity, act' = 1
            for grad_mode in (False, True):
                specs.append(
                    AotSpec(
                        name=f"activation_{'grad' if grad_mode else 'fwd'}[{t},{activation}]",
                        fn=activation_kernel, signature=sig,
                        constexprs={"ACTIVATION": code, "GRAD_MODE": grad_mode, "BLOCK": _BLOCK},
                        num_warps=_NUM_WARPS, num_stages=1, divisible_by_16=tuple(sig), hot=True,
                    )  # fmt: skip
                )
    return specs


# Every configuration the launcher can pick: dtype x activation x mode.
AOT_SPECS = _aot_specs()
