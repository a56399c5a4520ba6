"""A frozen pre-LN block's two halves around its attention, each one autograd node in eager mode.

On the Triton path a block is, op by op: the pending residual add fused into LN1 (with a prompt splice, maybe), the
qkv GEMM, attention, the output GEMM, the residual add fused into LN2, the frozen MLP. Run one by one that is about
ten autograd nodes per block (two LayerNorm Functions, two addmm, their views, the MLP Function), each with its
Python wrapper, its checks and the engine's bookkeeping in backward: host time a step without a CUDA graph pays
24 times. When none of the block's weights needs a gradient (prompt learning never trains CLIP), everything but the
attention is two Functions:

    pre_attention:  (x, pending[, new]) -> (s, qkv)     s = x + pending (new spliced in), qkv = LN1(s) W_in^T + b_in
                    (x, None)           -> (x, qkv)     a tower's first block: no branch pending, qkv = LN1(x) ...
    post_attention: (s, o)              -> (s2, branch)  s2 = s + o W_out^T + b_out, branch = MLP(LN2(s2))

They call the per-op path's own implementations (the LayerNorm and MLP kernels' launchers, F.linear for the
GEMMs, the same backward formulas) in the same order on the same operands, so outputs and gradients are
bit-identical to it, and they save what it saves (the LayerNorm sums and statistics, the MLP's input; the frozen
weights), so memory is unchanged. The attention between the halves is left to its backend, whichever it is.

Eager mode only: traced or compiled (fastprompt.ops._library.direct_call_ok is False) the caller keeps the per-op
path, whose registered ops are what torch.compile sees as single nodes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastprompt.ops._library import require_triton, viewed

require_triton()
from fastprompt.ops import layer_norm as _ln  # noqa: E402
from fastprompt.ops import mlp as _mlp  # noqa: E402


_rows = _ln._rows  # [..., d] as [rows, d]: t itself when already 2-D (the packed text stream; no view op)


# Both halves work on [rows, d] inside (the launchers' and GEMMs' layout) and view only at their boundary: a dense
# [B, L, D] stream (the vision tower) enters as rows once and leaves as [B, L, ...] once, instead of a view op around
# every LayerNorm, GEMM and MLP inside (~25 per vision block and step).
def _pre_forward(x, pending, new, weights, period, start):
    """(s, qkv, mean, rstd) of pre_attention, as [rows, ...]."""
    ln_w, ln_b, eps, in_w, in_b = weights[:5]
    if new is None:
        h, s, mean, rstd = _ln._layer_norm_residual_impl(_rows(pending), _rows(x), ln_w, ln_b, eps)
    else:
        h, s, mean, rstd = _ln._layer_norm_residual_splice_impl(_rows(pending), _rows(x), new, ln_w, ln_b, eps,
                                                                period, start)
    return s, F.linear(h, in_w, in_b), mean, rstd


def _first_forward(x, weights):
    """(qkv, mean, rstd) of pre_attention without a pending branch, as [rows, ...]."""
    ln_w, ln_b, eps, in_w, in_b = weights[:5]
    h, mean, rstd = _ln._layer_norm_impl(_rows(x), ln_w, ln_b, eps)
    return F.linear(h, in_w, in_b), mean, rstd


def _post_forward(s, o, weights):
    """(s2, branch, LN2's normalised input h, mean, rstd) of post_attention, as [rows, ...]."""
    out_w, out_b, ln_w, ln_b, eps, fc_w, fc_b, proj_w, proj_b, activation, gemm = weights[5:]
    attended = F.linear(o.reshape(-1, o.shape[-2] * o.shape[-1]), out_w, out_b)  # heads merged, as rows
    h, s2, mean, rstd = _ln._layer_norm_residual_impl(attended, _rows(s), ln_w, ln_b, eps)
    return s2, _mlp._frozen_mlp_impl(h, fc_w, fc_b, proj_w, proj_b, activation, gemm), h, mean, rstd


def _leading(t, leading):
    """Rows t [rows, n] as leading + [n] (t itself when leading is already rows)."""
    return t if len(leading) == 1 else t.view(*leading, t.shape[-1])


# The weights travel as one tuple argument, not as separate inputs: nothing differentiates them, and every
# argument of Function.apply costs host time (autograd inspects each one). They are parameters, alive as long as
# the model, so the Functions keep references to them on ctx; the activations go through save_for_backward (packed
# by saved-tensor hooks such as torch.utils.checkpoint's). What that gives up: autograd's version check on the
# weights, so an in-place change of a frozen weight between forward and backward (which prompt learning never makes)
# would not be reported here as it is on the op-by-op path.
class _PreAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pending, new, weights, period, start):
        s, qkv, mean, rstd = _pre_forward(x, pending, new, weights, period, start)
        ctx.splice = None if new is None else (new.shape[0], new.shape[1], period, start)
        ctx.weights, ctx.shape = weights, x.shape
        ctx.save_for_backward(s, mean, rstd)
        ctx.set_materialize_grads(False)  # an unused output costs no zero gradient
        leading = x.shape[:-1]
        return _leading(s, leading), _leading(qkv, leading)

    @staticmethod
    def backward(ctx, d_s, d_qkv):
        s, mean, rstd = ctx.saved_tensors  # rows
        ln_w, in_w = ctx.weights[0], ctx.weights[3]
        d_sum = None if d_s is None else _rows(d_s.contiguous())
        dh = torch.zeros_like(s) if d_qkv is None else _rows(d_qkv).mm(in_w)
        dnew = None
        if ctx.splice is not None:
            dx, dnew = _ln.splice_backward_rows(dh, s, ln_w, mean, rstd, d_sum, *ctx.splice)
        else:
            dx = _ln._layer_norm_backward_impl(dh, s, ln_w, mean, rstd, d_sum)
        # d s / d x = d s / d pending = identity off the splice; the spliced rows' gradient goes to `new`.
        dx = viewed(dx, ctx.shape)
        return dx, dx, dnew, None, None, None


class _FirstPreAttention(torch.autograd.Function):
    """pre_attention of a tower's first block: LN1 of the input itself, which stays the residual (the caller keeps
    x; returning it from here would make autograd wrap it in a view)."""

    @staticmethod
    def forward(ctx, x, weights):
        qkv, mean, rstd = _first_forward(x, weights)
        ctx.weights, ctx.shape = weights, x.shape
        ctx.save_for_backward(_rows(x), mean, rstd)
        ctx.set_materialize_grads(False)
        return _leading(qkv, x.shape[:-1])

    @staticmethod
    def backward(ctx, d_qkv):
        if d_qkv is None:
            return None, None
        x, mean, rstd = ctx.saved_tensors  # rows
        ln_w, in_w = ctx.weights[0], ctx.weights[3]
        dh = _rows(d_qkv).mm(in_w)
        return viewed(_ln._layer_norm_backward_impl(dh, x, ln_w, mean, rstd, None), ctx.shape), None


class _PostAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, o, weights):
        s2, branch, h, mean, rstd = _post_forward(s, o, weights)
        ctx.weights, ctx.s_shape, ctx.o_shape = weights, s.shape, o.shape
        ctx.save_for_backward(s2, mean, rstd, h)
        ctx.set_materialize_grads(False)
        leading = s.shape[:-1]
        return _leading(s2, leading), _leading(branch, leading)

    @staticmethod
    def backward(ctx, d_s2, d_branch):
        s2, mean, rstd, h = ctx.saved_tensors  # rows
        out_w, _, ln_w, _, _, fc_w, fc_b, proj_w, _, activation, gemm = ctx.weights[5:]
        d_sum = None if d_s2 is None else _rows(d_s2.contiguous())
        if d_branch is None:
            dh = torch.zeros_like(h)
        else:  # the frozen MLP's input gradient (fastprompt.ops.mlp._backward_frozen_mlp)
            d_pre = _mlp._pre_activation_grad(h, fc_w, fc_b, _rows(d_branch) @ proj_w, activation, gemm)
            dh = d_pre @ fc_w  # a fresh, contiguous result: the LayerNorm backward reads its rows as they are
        ds = _ln._layer_norm_backward_impl(dh, s2, ln_w, mean, rstd, d_sum)
        do = ds.mm(out_w)
        return viewed(ds, ctx.s_shape), viewed(do, ctx.o_shape), None


def _differentiated(a, b=None, c=None) -> bool:
    return torch.is_grad_enabled() and (a.requires_grad or (b is not None and b.requires_grad)
                                        or (c is not None and c.requires_grad))


def pre_attention(weights, x, pending, splice=None):
    """(s, qkv): s = x + pending (rows of `splice = (new, period, start)` replaced by new, see
    fastprompt.ops.layer_norm.layer_norm_spliced), qkv = LayerNorm_1(s) @ in_w^T + in_b. `weights` is
    fastprompt.fast.blocks.frozen_tensors(block); none of them gets a gradient (runs_frozen_halves says when this
    applies). One autograd node. pending None (a tower's first block): s is x itself, qkv = LayerNorm_1(x) ..."""
    if pending is None:  # a tower's first block
        if splice is not None:
            raise ValueError("pre_attention: a splice needs a pending branch (it replaces rows of x + pending)")
        if _differentiated(x):
            return x, _FirstPreAttention.apply(x, weights)
        return x, _leading(_first_forward(x, weights)[0], x.shape[:-1])
    new, period, start = (None, 0, 0) if splice is None else splice
    if _differentiated(x, pending, new):
        return _PreAttention.apply(x, pending, new, weights, int(period), int(start))
    s, qkv = _pre_forward(x, pending, new, weights, int(period), int(start))[:2]  # inference: no node at all
    leading = x.shape[:-1]
    return _leading(s, leading), _leading(qkv, leading)


def post_attention(weights, s, o):
    """(s2, branch): s2 = s + o @ out_w^T + out_b (o: [..., heads, head_dim], the attention's output for the rows
    of s, heads merged here), branch =
    proj(act(fc(LayerNorm_2(s2)))), the MLP branch not yet added. One autograd node; no weight gets a gradient."""
    if _differentiated(s, o):
        return _PostAttention.apply(s, o, weights)
    s2, branch = _post_forward(s, o, weights)[:2]
    leading = s.shape[:-1]
    return _leading(s2, leading), _leading(branch, leading)
