"""Fused linear + bias + activation, and the frozen-weight CLIP MLP, as torch ops.

``linear_act(x, W, b, activation)`` = act(x @ W^T + b) in one Triton GEMM whose epilogue adds
the bias and applies the activation ("gelu" exact erf, "gelu_tanh", "quick_gelu"
x * sigmoid(1.702 x), "relu", "none"). Its autograd saves x (not the output): the backward
recomputes the pre-activation inside a GEMM whose epilogue multiplies by the upstream
gradient and act'(pre), then dx = d_pre @ W, and dW = d_pre^T @ x, db = sum(d_pre) only when
asked for.

``frozen_mlp(x, fc_w, fc_b, proj_w, proj_b, activation)`` = proj(act(fc(x))), the block MLP
of a frozen CLIP. The forward saves only x, never the 4x-wide hidden. The backward computes
dh = dy @ proj_w (PyTorch), then d_pre = dh * act'(x @ fc_w^T + fc_b) in the recompute GEMM,
then dx = d_pre @ fc_w (PyTorch). No weight gradient is computed. If any weight or bias
requires grad, ``frozen_mlp`` falls back to the autograd composition
``F.linear(linear_act(x, fc_w, fc_b, activation), proj_w, proj_b)``, which computes them (and
keeps the hidden for proj_w's gradient, as any trained Linear must).

The frozen MLP's first GEMM runs on one of two plans (``gemm``): "triton", the GEMM above with the
bias and activation (or the gradient's product) in its epilogue; "cublas", ``torch.addmm`` (cuBLAS,
bias fused) followed by one in-place elementwise pass for the activation or the gradient's product
(fastprompt.kernels.activation). Both keep only x between forward and backward. They differ in
rounding the way eager PyTorch differs from a fused epilogue: "cublas" rounds the pre-activation to
x's dtype before the activation, as F.linear + activation does; "triton" applies it to the fp32
accumulator. Which plan is faster is a matter of the GPU and the shapes
(fastprompt.ops.gemm_plan keeps what was measured and chooses).

Registered ops: ``fastprompt::linear_act``, ``fastprompt::frozen_mlp`` (with autograd) and
``fastprompt::linear_act_grad`` (the recompute GEMM).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from fastprompt.ops import gemm_plan
from fastprompt.ops._library import define_op, direct_call_ok, eager_function, require_triton, viewed

require_triton()
from fastprompt.kernels import activation as _activation  # noqa: E402
from fastprompt.kernels import linear_act as _kernel  # noqa: E402

ACTIVATIONS = tuple(_kernel.ACTIVATIONS)
GEMMS = gemm_plan.PLANS  # the first layer's GEMM plan (see the module docstring)


def _check_gemm(gemm: str) -> None:
    if gemm not in GEMMS:
        raise ValueError(f"frozen_mlp: gemm must be one of {GEMMS}, got {gemm!r}")


def _in_own_dtype(x: torch.Tensor):
    """A context in which the ops' cuBLAS GEMMs run in x's dtype, as the Triton GEMM (which no autocast reaches)
    does and as the ops' fake implementations say: autocast off where it would cast them to another dtype. The
    blocks cast to the autocast dtype before calling, so on the model's path this is the null context."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) != x.dtype:
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()


def _fc_activation(x2d, weight, bias, activation: str, gemm: str):
    """act(x2d @ weight^T + bias) as [rows, N] on the chosen plan; x2d from _rows, weight and bias contiguous."""
    if gemm == "cublas":
        return _activation.activation_(torch.addmm(bias, x2d, weight.t()), activation)
    return _kernel.linear_act_forward(x2d, weight, bias, activation)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., k] -> [rows, k] with a contiguous last dimension (a view when possible)."""
    if t.dim() < 1:
        raise ValueError("linear_act: inputs must have at least one dimension")
    flat = t if t.dim() == 2 else t.reshape(-1, t.shape[-1])  # no view op for rows already
    return flat if flat.shape[1] <= 1 or flat.stride(1) == 1 else flat.contiguous()


@define_op("linear_act")
def _linear_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, activation: str) -> torch.Tensor:
    out = _kernel.linear_act_forward(_rows(x), weight.contiguous(), bias.contiguous(), activation)
    return out.view(*x.shape[:-1], weight.shape[0])


@_linear_act.register_fake
def _(x, weight, bias, activation):
    _kernel.check_linear_act_args(_rows(x), weight, bias, activation)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _linear_act_grad_impl(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, grad: torch.Tensor, activation: str,
    gemm: str = "triton",
) -> torch.Tensor:
    x2d, g2d, weight, bias = _rows(x), _rows(grad), weight.contiguous(), bias.contiguous()
    if gemm == "cublas":  # the recomputed pre-activation becomes the gradient, in place
        _kernel.check_linear_act_args(x2d, weight, bias, activation, g2d)
        with _in_own_dtype(x2d):
            pre = torch.addmm(bias, x2d, weight.t())
        out = _activation.activation_grad_(pre, g2d.contiguous(), activation)
    else:
        out = _kernel.linear_act_grad(x2d, weight, bias, g2d, activation)
    return viewed(out, grad.shape)


_linear_act_grad = define_op("linear_act_grad")(_linear_act_grad_impl)


@_linear_act_grad.register_fake
def _(x, weight, bias, grad, activation, gemm="triton"):
    _check_gemm(gemm)
    _kernel.check_linear_act_args(_rows(x), weight, bias, activation, _rows(grad))
    return grad.new_empty(grad.shape)


def _pre_activation_grad(x, weight, bias, grad, activation, gemm="triton"):
    if activation == "none":  # act' = 1: the upstream gradient is the answer, no GEMM needed
        return grad
    grad = grad.contiguous()
    if direct_call_ok(grad):  # eager backward: the implementation, not the dispatcher (see _library)
        return _linear_act_grad_impl(x, weight, bias, grad, activation, gemm)
    return torch.ops.fastprompt.linear_act_grad(x, weight, bias, grad, activation, gemm)


def _setup_linear_act(ctx, inputs, output):
    x, weight, bias, activation = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.activation = activation


def _backward_linear_act(ctx, dy):
    x, weight, bias = ctx.saved_tensors
    d_pre = _pre_activation_grad(x, weight, bias, dy, ctx.activation)
    dx = dw = db = None
    with _in_own_dtype(x):
        if ctx.needs_input_grad[0]:
            dx = d_pre @ weight
        if ctx.needs_input_grad[1]:
            dw = _rows(d_pre).t() @ _rows(x)
    if ctx.needs_input_grad[2]:
        db = _rows(d_pre).sum(0)
    return dx, dw, db, None


_linear_act.register_autograd(_backward_linear_act, setup_context=_setup_linear_act)


def _check_mlp(x, fc_w, fc_b, proj_w, proj_b, activation, gemm):
    _check_gemm(gemm)
    rows = _rows(x)
    _kernel.check_linear_act_args(rows, fc_w, fc_b, activation)
    hidden = fc_w.shape[0]
    if proj_w.dim() != 2 or proj_w.shape[1] != hidden or proj_b.shape != (proj_w.shape[0],):
        raise ValueError(
            f"frozen_mlp: proj_w must be [dout, {hidden}] and proj_b [dout], got "
            f"{list(proj_w.shape)} and {list(proj_b.shape)}"
        )
    if proj_w.dtype != x.dtype or proj_b.dtype != x.dtype:
        raise ValueError(f"frozen_mlp: all tensors must share x's dtype {x.dtype}, got {proj_w.dtype}, {proj_b.dtype}")
    _kernel.check_same_device("frozen_mlp", {"x": x, "proj_w": proj_w, "proj_b": proj_b})


def _frozen_mlp_impl(
    x: torch.Tensor, fc_w: torch.Tensor, fc_b: torch.Tensor, proj_w: torch.Tensor, proj_b: torch.Tensor,
    activation: str, gemm: str = "triton",
) -> torch.Tensor:
    _check_mlp(x, fc_w, fc_b, proj_w, proj_b, activation, gemm)
    with _in_own_dtype(x):
        hidden = _fc_activation(_rows(x), fc_w.contiguous(), fc_b.contiguous(), activation, gemm)
        out = torch.addmm(proj_b, hidden, proj_w.t())
    return out if x.dim() == 2 else out.view(*x.shape[:-1], proj_w.shape[0])


_frozen_mlp = define_op("frozen_mlp")(_frozen_mlp_impl)


@_frozen_mlp.register_fake
def _(x, fc_w, fc_b, proj_w, proj_b, activation, gemm="triton"):
    _check_mlp(x, fc_w, fc_b, proj_w, proj_b, activation, gemm)
    return x.new_empty((*x.shape[:-1], proj_w.shape[0]))


def _setup_frozen_mlp(ctx, inputs, output):
    x, fc_w, fc_b, proj_w, _, activation, gemm = inputs
    ctx.save_for_backward(x, fc_w, fc_b, proj_w)  # x only: no hidden, no pre-activation
    ctx.activation, ctx.gemm = activation, gemm


def _backward_frozen_mlp(ctx, dy):
    if any(ctx.needs_input_grad[1:5]):
        raise RuntimeError(
            "fastprompt::frozen_mlp computes no weight gradients, but a weight or bias requires "
            "grad: call fastprompt.ops.mlp.frozen_mlp, which falls back to a path that computes them"
        )
    x, fc_w, fc_b, proj_w = ctx.saved_tensors
    with _in_own_dtype(x):  # a backward called inside the caller's autocast: still x's dtype
        dh = dy @ proj_w
        d_pre = _pre_activation_grad(x, fc_w, fc_b, dh, ctx.activation, ctx.gemm)
        return d_pre @ fc_w, None, None, None, None, None, None


_frozen_mlp.register_autograd(_backward_frozen_mlp, setup_context=_setup_frozen_mlp)
_FrozenMlpEager = eager_function("frozen_mlp", _frozen_mlp_impl, _setup_frozen_mlp, _backward_frozen_mlp)


def linear_act(x, weight, bias, activation: str = "gelu"):
    """act(x @ weight^T + bias) with the bias and activation fused into the GEMM.

    Equivalent PyTorch: ``act(F.linear(x, weight, bias))``.

    Args:
        x: [..., K] float32/float16/bfloat16 on CUDA (or CPU under TRITON_INTERPRET=1).
        weight: [N, K], bias: [N], both of x's dtype.
        activation: one of "gelu", "gelu_tanh", "quick_gelu", "relu", "none".

    Returns [..., N] in x's dtype. Gradients flow to x, weight and bias; the backward
    recomputes the pre-activation from x instead of saving it.

    Raises:
        ValueError: wrong shapes, dtypes, devices or an unknown activation.
    """
    return torch.ops.fastprompt.linear_act(x, weight, bias, activation)


def frozen_mlp(x, fc_w, fc_b, proj_w, proj_b, activation: str = "gelu", gemm: str = "triton"):
    """proj(act(fc(x))) for a frozen MLP: saves only x, computes only input gradients.

    Equivalent PyTorch: ``F.linear(act(F.linear(x, fc_w, fc_b)), proj_w, proj_b)``.

    Args:
        x: [..., d] float32/float16/bfloat16 on CUDA (or CPU under TRITON_INTERPRET=1).
        fc_w: [h, d], fc_b: [h], proj_w: [dout, h], proj_b: [dout], all of x's dtype.
        activation: one of "gelu", "gelu_tanh", "quick_gelu", "relu", "none".
        gemm: the first layer's plan, "triton" (activation in the GEMM's epilogue) or "cublas"
            (torch.addmm, then the activation in place); see the module docstring.

    If any weight or bias requires grad (and grad mode is on), this computes the same result
    through ``linear_act`` + ``F.linear`` with ordinary autograd, so the weights get their
    gradients; the memory saving then applies to the first layer only.

    Raises:
        ValueError: wrong shapes, dtypes, devices or an unknown activation.
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (fc_w, fc_b, proj_w, proj_b)):
        _check_gemm(gemm)  # trained weights: linear_act's autograd computes their gradients, whichever the plan
        return F.linear(linear_act(x, fc_w, fc_b, activation), proj_w, proj_b)
    if direct_call_ok(x):  # eager: skip the dispatcher; traced or compiled: the registered op (see _library)
        return _FrozenMlpEager.apply(x, fc_w, fc_b, proj_w, proj_b, activation, gemm)
    return torch.ops.fastprompt.frozen_mlp(x, fc_w, fc_b, proj_w, proj_b, activation, gemm)
