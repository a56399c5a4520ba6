"""Grouped per-layer prompt maps (MaPLe/MPL couplings, MCPL-CLIP PMS) as torch ops.

``grouped_linear(x, W, b)``: y[g] = x[g] @ W[g]^T + b[g] for G groups in one launch per
direction. ``grouped_bottleneck_mlp(x, W1, b1, W2, b2)``: y[g] = relu(x[g] W1[g]^T + b1[g])
W2[g]^T + b2[g], likewise. Both train: the backward returns gradients for x and for every
weight and bias, each reduced in a fixed order (deterministic). The bottleneck's forward also
produces the hidden activation [G, n, h], which is saved for the backward (a few kB).

Registered ops: ``fastprompt::grouped_linear``, ``fastprompt::grouped_bottleneck_mlp`` (with
autograd) and their ``*_backward`` ops.
"""

from __future__ import annotations

import torch

from fastprompt.ops._library import define_op, direct_call_ok, eager_function, require_triton

require_triton()
from fastprompt.kernels import grouped_mlp as _kernel  # noqa: E402


def _grouped_linear_impl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return _kernel.grouped_linear_forward(x.contiguous(), weight.contiguous(), bias.contiguous())


_grouped_linear = define_op("grouped_linear")(_grouped_linear_impl)


@_grouped_linear.register_fake
def _(x, weight, bias):
    _kernel.check_grouped_linear_args(x.contiguous(), weight.contiguous(), bias.contiguous())
    return x.new_empty((x.shape[0], x.shape[1], weight.shape[1]))


def _grouped_linear_backward_impl(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernel.grouped_linear_backward(dy.contiguous(), x.contiguous(), weight.contiguous())


_grouped_linear_backward = define_op("grouped_linear_backward")(_grouped_linear_backward_impl)


@_grouped_linear_backward.register_fake
def _(dy, x, weight):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape[:2])


def _setup_grouped_linear(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight)


def _backward_grouped_linear(ctx, dy):
    x, weight = ctx.saved_tensors
    backward = _grouped_linear_backward_impl if direct_call_ok(dy) else torch.ops.fastprompt.grouped_linear_backward
    dx, dw, db = backward(dy, x, weight)
    return tuple(g if needed else None for g, needed in zip((dx, dw, db), ctx.needs_input_grad))


_grouped_linear.register_autograd(_backward_grouped_linear, setup_context=_setup_grouped_linear)


def _grouped_bottleneck_impl(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernel.grouped_bottleneck_forward(*(t.contiguous() for t in (x, w1, b1, w2, b2)))


_grouped_bottleneck = define_op("grouped_bottleneck_mlp")(_grouped_bottleneck_impl)


@_grouped_bottleneck.register_fake
def _(x, w1, b1, w2, b2):
    _kernel.check_grouped_bottleneck_args(*(t.contiguous() for t in (x, w1, b1, w2, b2)))
    groups, n, _ = x.shape
    return x.new_empty((groups, n, w2.shape[1])), x.new_empty((groups, n, w1.shape[1]))


def _grouped_bottleneck_backward_impl(
    dy: torch.Tensor, x: torch.Tensor, hidden: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernel.grouped_bottleneck_backward(*(t.contiguous() for t in (dy, x, hidden, w1, w2)))


_grouped_bottleneck_backward = define_op("grouped_bottleneck_mlp_backward")(_grouped_bottleneck_backward_impl)


@_grouped_bottleneck_backward.register_fake
def _(dy, x, hidden, w1, w2):
    return (
        x.new_empty(x.shape), w1.new_empty(w1.shape), w1.new_empty(w1.shape[:2]),
        w2.new_empty(w2.shape), w2.new_empty(w2.shape[:2]),
    )  # fmt: skip


def _setup_grouped_bottleneck(ctx, inputs, output):
    x, w1, _, w2, _ = inputs
    _, hidden = output
    ctx.mark_non_differentiable(hidden)
    ctx.set_materialize_grads(False)  # no zero gradient filled in for the saved hidden activation
    ctx.save_for_backward(x, hidden, w1, w2)


def _backward_grouped_bottleneck(ctx, dy, _dhidden):
    if dy is None:  # the output reached the loss by no path
        return (None,) * 5
    x, hidden, w1, w2 = ctx.saved_tensors
    direct = direct_call_ok(dy)  # eager backward: the implementation, not the dispatcher (see _library)
    grads = (_grouped_bottleneck_backward_impl if direct else torch.ops.fastprompt.grouped_bottleneck_mlp_backward)(
        dy, x, hidden, w1, w2)
    return tuple(g if needed else None for g, needed in zip(grads, ctx.needs_input_grad))


_grouped_bottleneck.register_autograd(_backward_grouped_bottleneck, setup_context=_setup_grouped_bottleneck)
_GroupedLinearEager = eager_function("grouped_linear", _grouped_linear_impl, _setup_grouped_linear,
                                     _backward_grouped_linear)
_GroupedBottleneckEager = eager_function("grouped_bottleneck_mlp", _grouped_bottleneck_impl,
                                         _setup_grouped_bottleneck, _backward_grouped_bottleneck)


def grouped_linear(x, weight, bias):
    """G independent Linear layers applied to G stacked inputs, in one launch.

    Equivalent PyTorch: ``torch.baddbmm(bias[:, None, :], x, weight.transpose(1, 2))``.

    Args:
        x: [G, n, din]; weight: [G, dout, din]; bias: [G, dout]; one dtype
            (float32/float16/bfloat16), on CUDA (or CPU under TRITON_INTERPRET=1).

    Returns [G, n, dout]. Gradients flow to x, weight and bias.

    Raises:
        ValueError: wrong shapes, mixed dtypes or devices.
    """
    if direct_call_ok(x):  # eager: skip the dispatcher; traced or compiled: the registered op (see _library)
        return _GroupedLinearEager.apply(x, weight, bias)
    return torch.ops.fastprompt.grouped_linear(x, weight, bias)


def grouped_bottleneck_mlp(x, w1, b1, w2, b2):
    """G independent Linear -> ReLU -> Linear networks on G stacked inputs, in one launch.

    Equivalent PyTorch::

        h = torch.relu(torch.baddbmm(b1[:, None, :], x, w1.transpose(1, 2)))
        torch.baddbmm(b2[:, None, :], h, w2.transpose(1, 2))

    Args:
        x: [G, n, din] with n <= 16 tokens; w1: [G, h, din]; b1: [G, h]; w2: [G, dout, h];
            b2: [G, dout]; one dtype (float32/float16/bfloat16), on CUDA (or CPU under
            TRITON_INTERPRET=1).

    Returns [G, n, dout]. Gradients flow to x and every weight and bias.

    Raises:
        ValueError: wrong shapes, more than 16 tokens, mixed dtypes or devices.
    """
    op = _GroupedBottleneckEager.apply if direct_call_ok(x) else torch.ops.fastprompt.grouped_bottleneck_mlp
    return op(x, w1, b1, w2, b2)[0]
