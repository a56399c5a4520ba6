"""LayerNorm with fp32 statistics (open_clip ``LayerNormFp32`` semantics) as torch ops.

``layer_norm(x, weight, bias, eps)`` normalises the last dimension of x (any leading shape):
statistics in fp32, output in x's dtype, weight/bias in fp32 or x's dtype.
``layer_norm(x, weight, bias, eps, residual=r)`` returns ``(LayerNorm(x + r), x + r)``: the
pre-LN block's ``x + attn`` followed by LN2 in one pass.

Backward: dx always; dW/dB only when weight/bias require grad (a frozen CLIP never asks for
them, and then the parameter-gradient kernel does not run). The forward saves x (or x + r,
which is returned anyway) plus fp32 mean and rstd per row.

``layer_norm_spliced(x, r, new, weight, bias, eps, period, start)`` also replaces the rows of a prompt
splice in x + r by ``new`` before normalising (MaPLe-style deep prompts entering a block).

Registered ops: ``fastprompt::layer_norm``, ``fastprompt::layer_norm_residual``,
``fastprompt::layer_norm_residual_splice`` (forward, with autograd) and ``fastprompt::layer_norm_backward``,
``fastprompt::layer_norm_backward_params``, ``fastprompt::layer_norm_splice_backward`` (used by the autograd
formulas).
"""

from __future__ import annotations

from typing import Optional

import torch

from fastprompt.ops._library import define_op, direct_call_ok, eager_function, require_triton, viewed

require_triton()
from fastprompt.kernels import layer_norm as _kernel  # noqa: E402


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [rows, d] with a contiguous last dimension (a view when possible)."""
    flat = t if t.dim() == 2 else t.reshape(-1, t.shape[-1])  # no view op for rows already
    return flat if flat.shape[1] <= 1 or flat.stride(1) == 1 else flat.contiguous()


def as_flat(stats: torch.Tensor) -> torch.Tensor:
    """Per-row statistics as [rows] (itself when already 1-D: no view op)."""
    return stats if stats.dim() == 1 else stats.reshape(-1)


def _check_nd(x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> None:
    if x.dim() < 1:
        raise ValueError("layer_norm: x must have at least one dimension (the normalised one)")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"layer_norm: residual must have x's shape {list(x.shape)}, got {list(residual.shape)}")


def _layer_norm_impl(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_nd(x)
    y, _, mean, rstd = _kernel.layer_norm_forward(_rows(x), weight, bias, eps)
    if x.dim() == 2:  # rows already: the results have their shapes
        return y, mean, rstd
    return y.view(x.shape), mean.view(x.shape[:-1]), rstd.view(x.shape[:-1])


_layer_norm = define_op("layer_norm")(_layer_norm_impl)


@_layer_norm.register_fake
def _(x, weight, bias, eps):
    _check_nd(x)
    _kernel.check_forward_args(_rows(x), weight, bias)
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return x.new_empty(x.shape), stats, torch.empty_like(stats)


def _layer_norm_residual_impl(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_nd(x, residual)
    y, s, mean, rstd = _kernel.layer_norm_forward(_rows(x), weight, bias, eps, residual=_rows(residual))
    if x.dim() == 2:  # rows already: the results have their shapes
        return y, s, mean, rstd
    return y.view(x.shape), s.view(x.shape), mean.view(x.shape[:-1]), rstd.view(x.shape[:-1])


_layer_norm_residual = define_op("layer_norm_residual")(_layer_norm_residual_impl)


@_layer_norm_residual.register_fake
def _(x, residual, weight, bias, eps):
    _check_nd(x, residual)
    _kernel.check_forward_args(_rows(x), weight, bias, _rows(residual))
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return x.new_empty(x.shape), x.new_empty(x.shape), stats, torch.empty_like(stats)


def _layer_norm_residual_splice_impl(
    x: torch.Tensor, residual: torch.Tensor, new: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
    period: int, start: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    _check_nd(x, residual)
    y, s, mean, rstd = _kernel.layer_norm_forward(_rows(x), weight, bias, eps, residual=_rows(residual),
                                                  splice=(new, period, start))
    if x.dim() == 2:  # rows already: the results have their shapes
        return y, s, mean, rstd
    return y.view(x.shape), s.view(x.shape), mean.view(x.shape[:-1]), rstd.view(x.shape[:-1])


_layer_norm_residual_splice = define_op("layer_norm_residual_splice")(_layer_norm_residual_splice_impl)


@_layer_norm_residual_splice.register_fake
def _(x, residual, new, weight, bias, eps, period, start):
    _check_nd(x, residual)
    _kernel.check_forward_args(_rows(x), weight, bias, _rows(residual))
    _kernel.check_splice(_rows(x), new, period, start)
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return x.new_empty(x.shape), x.new_empty(x.shape), stats, torch.empty_like(stats)


def _layer_norm_splice_backward_impl(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    d_sum: Optional[torch.Tensor], groups: int, length: int, period: int, start: int, param_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dx, dnew, dweight, dbias); dweight and dbias are empty unless param_grads."""
    dsum = None if d_sum is None else _rows(d_sum)
    dx, dw, db, dnew = _kernel.layer_norm_backward(_rows(dy), _rows(x), weight, as_flat(mean), as_flat(rstd),
                                                   dsum, param_grads=param_grads, splice=(groups, length, period, start))
    if not param_grads:
        return viewed(dx, x.shape), dnew, weight.new_empty(0), weight.new_empty(0)
    return viewed(dx, x.shape), dnew, dw.to(weight.dtype), db.to(weight.dtype)


def splice_backward_rows(dy, x, weight, mean, rstd, d_sum, groups: int, length: int, period: int, start: int):
    """(dx, dnew) of a spliced LayerNorm over rows [rows, d] without weight gradients: what the frozen block halves
    (fastprompt.ops.frozen_block) call in eager mode. The registered op's two empty weight-gradient outputs, which a
    torch op's schema needs, would be two dispatched allocations per call for nothing."""
    dx, _, _, dnew = _kernel.layer_norm_backward(dy, x, weight, mean, rstd, d_sum, param_grads=False,
                                                 splice=(groups, length, period, start))
    return dx, dnew


_layer_norm_splice_backward = define_op("layer_norm_splice_backward")(_layer_norm_splice_backward_impl)


@_layer_norm_splice_backward.register_fake
def _(dy, x, weight, mean, rstd, d_sum, groups, length, period, start, param_grads):
    params = weight.shape if param_grads else (0,)
    return x.new_empty(x.shape), x.new_empty((groups, length, x.shape[-1])), weight.new_empty(params), \
        weight.new_empty(params)


def _layer_norm_backward_impl(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    d_sum: Optional[torch.Tensor],
) -> torch.Tensor:  # fmt: skip
    dsum = None if d_sum is None else _rows(d_sum)
    dx, _, _ = _kernel.layer_norm_backward(_rows(dy), _rows(x), weight, as_flat(mean), as_flat(rstd), dsum)
    return viewed(dx, x.shape)


_layer_norm_backward = define_op("layer_norm_backward")(_layer_norm_backward_impl)


@_layer_norm_backward.register_fake
def _(dy, x, weight, mean, rstd, d_sum):
    return x.new_empty(x.shape)


def _layer_norm_backward_params_impl(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    d_sum: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    dsum = None if d_sum is None else _rows(d_sum)
    dx, dw, db = _kernel.layer_norm_backward(
        _rows(dy), _rows(x), weight, as_flat(mean), as_flat(rstd), dsum, param_grads=True
    )
    return viewed(dx, x.shape), dw.to(weight.dtype), db.to(weight.dtype)


_layer_norm_backward_params = define_op("layer_norm_backward_params")(_layer_norm_backward_params_impl)


@_layer_norm_backward_params.register_fake
def _(dy, x, weight, mean, rstd, d_sum):
    return x.new_empty(x.shape), torch.empty_like(weight), torch.empty_like(weight)


def _input_gradients(ctx, dy, d_sum):
    """(dx, dweight or None, dbias or None) for the saved forward. ctx.saved_tensors is read once: under
    torch.utils.checkpoint (open_clip's grad_checkpointing) a second read is an error."""
    normalised, weight, mean, rstd = ctx.saved_tensors
    want_weight, want_bias = ctx.needs_input_grad[ctx.weight_index], ctx.needs_input_grad[ctx.weight_index + 1]
    direct = direct_call_ok(dy)  # eager backward: the implementations, not the dispatcher (see _library)
    if want_weight or want_bias:
        params = _layer_norm_backward_params_impl if direct else torch.ops.fastprompt.layer_norm_backward_params
        dx, dw, db = params(dy, normalised, weight, mean, rstd, d_sum)
        return dx, (dw if want_weight else None), (db if want_bias else None)
    backward = _layer_norm_backward_impl if direct else torch.ops.fastprompt.layer_norm_backward
    return backward(dy, normalised, weight, mean, rstd, d_sum), None, None


def _setup_layer_norm(ctx, inputs, output):
    x, weight, _, _ = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    # No zero gradients filled in for the statistics (or an unused output): two launches saved per call.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.weight_index = 1


def _backward_layer_norm(ctx, dy, _dmean, _drstd):
    if dy is None:  # the output reached the loss by no path
        return None, None, None, None
    dx, dw, db = _input_gradients(ctx, dy.contiguous(), None)
    return (dx if ctx.needs_input_grad[0] else None), dw, db, None


def _setup_layer_norm_residual(ctx, inputs, output):
    _, _, weight, _, _ = inputs
    _, summed, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # see _setup_layer_norm
    # x + residual is an output (the residual stream carries it on), so saving it costs nothing.
    ctx.save_for_backward(summed, weight, mean, rstd)
    ctx.weight_index = 2


def _backward_layer_norm_residual(ctx, dy, d_sum, _dmean, _drstd):
    if dy is None:  # only x + residual reached the loss: the sum's gradient passes to both inputs
        dx = d_sum
        return (dx if ctx.needs_input_grad[0] else None), (dx if ctx.needs_input_grad[1] else None), None, None, None
    d_sum = None if d_sum is None else d_sum.contiguous()
    dx, dw, db = _input_gradients(ctx, dy.contiguous(), d_sum)
    # d(x + r)/dx = d(x + r)/dr = identity: both inputs receive the same gradient.
    return (dx if ctx.needs_input_grad[0] else None), (dx if ctx.needs_input_grad[1] else None), dw, db, None


def _setup_layer_norm_residual_splice(ctx, inputs, output):
    _, _, new, weight, _, _, period, start = inputs
    _, summed, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # see _setup_layer_norm
    ctx.save_for_backward(summed, weight, mean, rstd)
    ctx.splice = (new.shape[0], new.shape[1], period, start)


def _backward_layer_norm_residual_splice(ctx, dy, d_sum, _dmean, _drstd):
    want_weight, want_bias = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
    summed, weight, mean, rstd = ctx.saved_tensors
    if dy is None and d_sum is None:
        return (None,) * 8
    if dy is None:
        dy = torch.zeros_like(summed)
    d_sum = None if d_sum is None else d_sum.contiguous()
    backward = (_layer_norm_splice_backward_impl if direct_call_ok(dy)
                else torch.ops.fastprompt.layer_norm_splice_backward)
    dx, dnew, dw, db = backward(dy.contiguous(), summed, weight, mean, rstd, d_sum, *ctx.splice,
                                want_weight or want_bias)
    # Rows off the splice: d(x + r)/dx = d(x + r)/dr = identity; spliced rows pass their gradient to `new`.
    return ((dx if ctx.needs_input_grad[0] else None), (dx if ctx.needs_input_grad[1] else None),
            (dnew if ctx.needs_input_grad[2] else None), (dw if want_weight else None), (db if want_bias else None),
            None, None, None)


_layer_norm.register_autograd(_backward_layer_norm, setup_context=_setup_layer_norm)
_layer_norm_residual.register_autograd(_backward_layer_norm_residual, setup_context=_setup_layer_norm_residual)
_LayerNormEager = eager_function("layer_norm", _layer_norm_impl, _setup_layer_norm, _backward_layer_norm)
_LayerNormResidualEager = eager_function(
    "layer_norm_residual", _layer_norm_residual_impl, _setup_layer_norm_residual, _backward_layer_norm_residual
)
_layer_norm_residual_splice.register_autograd(_backward_layer_norm_residual_splice,
                                             setup_context=_setup_layer_norm_residual_splice)
_LayerNormResidualSpliceEager = eager_function(
    "layer_norm_residual_splice", _layer_norm_residual_splice_impl, _setup_layer_norm_residual_splice,
    _backward_layer_norm_residual_splice,
)


def layer_norm(x, weight, bias, eps: float = 1e-5, residual=None):
    """LayerNorm over the last dimension with fp32 statistics, output in x's dtype.

    Equivalent PyTorch (open_clip's LayerNormFp32)::

        F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps).to(x.dtype)

    Args:
        x: [..., d] float32/float16/bfloat16, on CUDA (or CPU under TRITON_INTERPRET=1);
            d <= 2048.
        weight, bias: [d], float32 or x's dtype, one dtype for both.
        eps: added to the variance.
        residual: optional tensor of x's shape and dtype; then the result is
            ``(layer_norm(x + residual), x + residual)`` with x + residual rounded to x's dtype.

    Raises:
        ValueError: wrong shapes, dtypes, devices, or a width above 2048.
    """
    direct = direct_call_ok(x)  # eager: skip the dispatcher; traced or compiled: the registered op
    if residual is None:
        if direct:
            return _LayerNormEager.apply(x, weight, bias, float(eps))[0]
        return torch.ops.fastprompt.layer_norm(x, weight, bias, float(eps))[0]
    op = _LayerNormResidualEager.apply if direct else torch.ops.fastprompt.layer_norm_residual
    y, summed, _, _ = op(x, residual, weight, bias, float(eps))
    return y, summed


def layer_norm_spliced(x, residual, new, weight, bias, eps: float, period: int, start: int):
    """``(LayerNorm(s), s)`` where s is x + residual with a prompt splice fused in: rows [start, start + n) of each
    of the first G groups of ``period`` rows (x viewed as [rows, d]) are ``new`` [G, n, d] instead of x + residual.
    One pass instead of an add, a cat and the LayerNorm; its backward is one pass too (the spliced rows' gradient
    goes to ``new``, none to x and residual). ``new`` may be an expanded view (one set shared by all groups).
    Weight and bias get their gradients when they require them (the frozen towers' never do)."""
    direct = direct_call_ok(x)
    op = _LayerNormResidualSpliceEager.apply if direct else torch.ops.fastprompt.layer_norm_residual_splice
    y, summed, _, _ = op(x, residual, new, weight, bias, float(eps), int(period), int(start))
    return y, summed
