"""Attention ops: dense attention and packed causal varlen attention with shared prefixes.

Layout [batch, seq, heads, head_dim] (dense) and [tokens, heads, head_dim] (packed). Softmax
scale defaults to 1/sqrt(head_dim). Two public functions, each dispatched to a backend
(``fastprompt.ops.backends``: triton, xformers, sdpa, eager; ``backend="auto"`` picks in the order measured
per op and device there):

* ``attention(q, k, v, causal=False, scale=None, backend="auto")``
* ``prefix_varlen_attention(q, k, v, cu_seqlens, max_seqlen, prefix_k, prefix_v,
  prefix_index=None, scale=None, backend="auto")``
* ``prefix_stream_attention(qkv, cu_seqlens, max_seqlen, groups, prefix_len, prefix_index=None,
  scale=None, backend="auto")``: the packed text stream's whole attention (the prefixes' own causal
  attention and the suffixes') from one [rows, 3, heads, head_dim] qkv, one op on the triton path

The Triton path is registered with torch.library (``fastprompt::attention_fwd`` / ``_bwd`` and
``fastprompt::prefix_varlen_attention_fwd`` / ``_bwd``, ``fastprompt::prefix_stream_attention_fwd`` /
``_bwd``, see ``_library``) with fake
implementations and an autograd formula, so it works under torch.compile and passes
``torch.library.opcheck``. Unlike the other op modules this one imports the kernels lazily: the
sdpa/eager/xformers backends must keep working where triton is absent (the triton backend then
reports "triton is not installed").

Determinism: the Triton backward uses no atomics (two runs are bit-identical), including the
prefix gradient summed over all sequences sharing a prefix. The eager and sdpa paths reduce the
prefix gradient with a sum over an expanded dimension (one prefix) or a one-hot matmul (several),
never with scatter-add atomics; their attention kernels follow torch's own determinism rules.
"""

from __future__ import annotations

import math
import numbers
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends
from ._library import define_op, direct_call_ok, eager_function

# ----------------------------------------------------------------------------------------------
# Triton: torch.library ops
# ----------------------------------------------------------------------------------------------


def _attention_fwd_impl(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    from fastprompt.kernels.attention import attention_forward

    return attention_forward(q, k, v, causal=causal, scale=scale)


_attention_fwd = define_op("attention_fwd")(_attention_fwd_impl)


@_attention_fwd.register_fake
def _(q, k, v, causal, scale):
    from fastprompt.kernels.attention import _check_dense

    _check_dense(q, k, v, causal)  # shape errors surface while tracing, not at run time
    B, LQ, H, D = q.shape
    return q.new_empty((B, LQ, H, D)), q.new_empty((B, H, LQ), dtype=torch.float32)


def _attention_bwd_impl(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse2: Tensor,
                        causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    from fastprompt.kernels.attention import attention_backward

    return attention_backward(grad_out, q, k, v, out, lse2, causal=causal, scale=scale)


_attention_bwd = define_op("attention_bwd")(_attention_bwd_impl)


@_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse2, causal, scale):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _attention_setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    out, lse2 = output
    ctx.save_for_backward(q, k, v, out, lse2)
    ctx.causal, ctx.scale = causal, scale
    _no_zero_gradients(ctx, lse2)


def _no_zero_gradients(ctx, *statistics) -> None:
    """The softmax statistics are outputs nobody differentiates; without this autograd would fill a zero gradient
    for them on every backward call (one allocation and one launch each, ~36 per ViT-B/16 training step)."""
    ctx.mark_non_differentiable(*statistics)
    ctx.set_materialize_grads(False)


def _attention_backward(ctx, grad_out, _grad_lse2):
    if grad_out is None:  # the output reached the loss by no path
        return None, None, None, None, None
    q, k, v, out, lse2 = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    backward = _attention_bwd_impl if direct_call_ok(grad_out) else _attention_bwd  # see _library
    dq, dk, dv = backward(grad_out, q, k, v, out, lse2, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


_attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup_context)


def _prefix_fwd_impl(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                     prefix_index: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    from fastprompt.kernels.attention_prefix import prefix_attention_forward

    return prefix_attention_forward(q, k, v, cu_seqlens, prefix_k, prefix_v, prefix_index, scale=scale)


_prefix_fwd = define_op("prefix_varlen_attention_fwd")(_prefix_fwd_impl)


@_prefix_fwd.register_fake
def _(q, k, v, cu_seqlens, prefix_k, prefix_v, prefix_index, scale):
    from fastprompt.kernels.attention_prefix import _check_prefix

    _check_prefix(q, k, v, cu_seqlens, prefix_k, prefix_v, prefix_index)
    T, H, D = q.shape
    return q.new_empty((T, H, D)), q.new_empty((H, T), dtype=torch.float32)


def _prefix_bwd_impl(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse2: Tensor,
                     cu_seqlens: Tensor, prefix_k: Tensor, prefix_v: Tensor, prefix_index: Tensor | None,
                     scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from fastprompt.kernels.attention_prefix import prefix_attention_backward

    return prefix_attention_backward(grad_out, q, k, v, out, lse2, cu_seqlens, prefix_k, prefix_v,
                                     prefix_index, scale=scale)


_prefix_bwd = define_op("prefix_varlen_attention_bwd")(_prefix_bwd_impl)


@_prefix_bwd.register_fake
def _(grad_out, q, k, v, out, lse2, cu_seqlens, prefix_k, prefix_v, prefix_index, scale):
    return (q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape),
            q.new_empty(prefix_k.shape), q.new_empty(prefix_k.shape))


def _prefix_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, prefix_k, prefix_v, prefix_index, scale = inputs
    out, lse2 = output
    ctx.save_for_backward(q, k, v, out, lse2, cu_seqlens, prefix_k, prefix_v, prefix_index)
    ctx.scale = scale
    _no_zero_gradients(ctx, lse2)


def _prefix_backward(ctx, grad_out, _grad_lse2):
    if grad_out is None:
        return (None,) * 8
    q, k, v, out, lse2, cu_seqlens, prefix_k, prefix_v, prefix_index = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    backward = _prefix_bwd_impl if direct_call_ok(grad_out) else _prefix_bwd  # see _library
    dq, dk, dv, dpk, dpv = backward(grad_out, q, k, v, out, lse2, cu_seqlens, prefix_k, prefix_v, prefix_index,
                                    ctx.scale)
    return dq, dk, dv, None, dpk, dpv, None, None


_prefix_fwd.register_autograd(_prefix_backward, setup_context=_prefix_setup_context)


def _stream_fwd_impl(qkv: Tensor, cu_seqlens: Tensor, prefix_index: Tensor | None, groups: int, prefix_len: int,
                     scale: float) -> tuple[Tensor, Tensor]:
    from fastprompt.kernels.attention_prefix import stream_attention_forward

    return stream_attention_forward(qkv, cu_seqlens, prefix_index, groups, prefix_len, scale=scale)


_stream_fwd = define_op("prefix_stream_attention_fwd")(_stream_fwd_impl)


@_stream_fwd.register_fake
def _(qkv, cu_seqlens, prefix_index, groups, prefix_len, scale):
    from fastprompt.kernels.attention_prefix import _check_stream

    _check_stream(qkv, cu_seqlens, prefix_index, groups, prefix_len)
    N, _, H, D = qkv.shape
    return qkv.new_empty((N, H, D)), qkv.new_empty((H, N), dtype=torch.float32)


def _stream_bwd_impl(grad_out: Tensor, qkv: Tensor, out: Tensor, lse2: Tensor, cu_seqlens: Tensor,
                     prefix_index: Tensor | None, groups: int, prefix_len: int, scale: float) -> Tensor:
    from fastprompt.kernels.attention_prefix import stream_attention_backward

    return stream_attention_backward(grad_out, qkv, out, lse2, cu_seqlens, prefix_index, groups, prefix_len,
                                     scale=scale)


_stream_bwd = define_op("prefix_stream_attention_bwd")(_stream_bwd_impl)


@_stream_bwd.register_fake
def _(grad_out, qkv, out, lse2, cu_seqlens, prefix_index, groups, prefix_len, scale):
    return qkv.new_empty(qkv.shape)


def _stream_setup_context(ctx, inputs, output):
    qkv, cu_seqlens, prefix_index, groups, prefix_len, scale = inputs
    out, lse2 = output
    ctx.save_for_backward(qkv, out, lse2, cu_seqlens, prefix_index)
    ctx.groups, ctx.prefix_len, ctx.scale = groups, prefix_len, scale
    _no_zero_gradients(ctx, lse2)


def _stream_backward(ctx, grad_out, _grad_lse2):
    if grad_out is None:
        return (None,) * 6
    qkv, out, lse2, cu_seqlens, prefix_index = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    backward = _stream_bwd_impl if direct_call_ok(grad_out) else _stream_bwd  # see _library
    dqkv = backward(grad_out, qkv, out, lse2, cu_seqlens, prefix_index, ctx.groups, ctx.prefix_len, ctx.scale)
    return dqkv, None, None, None, None, None


_stream_fwd.register_autograd(_stream_backward, setup_context=_stream_setup_context)
_AttentionEager = eager_function("attention_fwd", _attention_fwd_impl, _attention_setup_context, _attention_backward)
_PrefixEager = eager_function("prefix_varlen_attention_fwd", _prefix_fwd_impl, _prefix_setup_context,
                              _prefix_backward)
_StreamEager = eager_function("prefix_stream_attention_fwd", _stream_fwd_impl, _stream_setup_context,
                              _stream_backward)


def _triton_attention(q, k, v, causal, scale):
    # Eager: the implementation through a plain autograd.Function; traced or compiled: the registered op.
    op = _AttentionEager.apply if direct_call_ok(q) else _attention_fwd
    return op(q, k, v, causal, scale)[0]


def _triton_prefix(q, k, v, cu_seqlens, max_seqlen, prefix_k, prefix_v, prefix_index, scale):
    op = _PrefixEager.apply if direct_call_ok(q) else _prefix_fwd
    return op(q, k, v, cu_seqlens, prefix_k, prefix_v, prefix_index, scale)[0]


def _triton_stream(qkv, cu_seqlens, groups, prefix_len, prefix_index, scale):
    op = _StreamEager.apply if direct_call_ok(qkv) else _stream_fwd
    return op(qkv, cu_seqlens, prefix_index, groups, prefix_len, scale)[0]


# ----------------------------------------------------------------------------------------------
# eager / sdpa / xformers
# ----------------------------------------------------------------------------------------------


def _eager_attention(q, k, v, causal, scale):
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    if causal:
        L = q.shape[1]
        future = torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    probs = scores.softmax(-1, dtype=torch.float32 if q.dtype != torch.float64 else None).to(v.dtype)
    return torch.matmul(probs, vh).transpose(1, 2)


def _sdpa_attention(q, k, v, causal, scale):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=causal, scale=scale)
    return out.transpose(1, 2)


def _xformers_attention(q, k, v, causal, scale):
    import xformers.ops as xops
    from xformers.ops.fmha.attn_bias import LowerTriangularMask

    return xops.memory_efficient_attention(q, k, v, attn_bias=LowerTriangularMask() if causal else None,
                                           scale=scale)


class _GatherPrefix(torch.autograd.Function):
    """prefix[prefix_index] for several prefixes, with a deterministic backward: the gradient
    of each prefix is a one-hot matmul over sequences (index_add would use atomics on CUDA)."""

    @staticmethod
    def forward(ctx, prefix, prefix_index):
        ctx.save_for_backward(prefix_index)
        ctx.num_prefixes = prefix.shape[0]
        return prefix.index_select(0, prefix_index)

    @staticmethod
    def backward(ctx, grad):
        (prefix_index,) = ctx.saved_tensors
        groups = torch.arange(ctx.num_prefixes, device=grad.device, dtype=prefix_index.dtype)
        acc_dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
        onehot = (prefix_index[None, :] == groups[:, None]).to(acc_dtype)  # [G, S]
        summed = onehot @ grad.reshape(grad.shape[0], -1).to(acc_dtype)
        return summed.reshape(ctx.num_prefixes, *grad.shape[1:]).to(grad.dtype), None


def _prefix_per_sequence(prefix, prefix_index, num_seqs):
    """[S, P, H, D]: each sequence's prefix keys or values."""
    if prefix_index is None:
        return prefix[0:1].expand(num_seqs, *prefix.shape[1:])
    return _GatherPrefix.apply(prefix, prefix_index.long())


def _token_positions(cu_seqlens, total):
    """(sequence id, position in sequence) of every packed token, int64, no host sync."""
    tokens = torch.arange(total, device=cu_seqlens.device, dtype=torch.int64)
    starts = cu_seqlens.long()
    seq = torch.searchsorted(starts[1:], tokens, right=True)
    return seq, tokens - starts[seq]


def _padded_prefix_problem(q, k, v, cu_seqlens, max_seqlen, prefix_k, prefix_v, prefix_index):
    """The packed problem as S padded sequences: q [S, H, L, D], keys/values [S, H, P + L, D]
    (prefix first), a boolean mask [S, 1, L, P + L], and the flat index of every token."""
    T, H, D = q.shape
    S = cu_seqlens.numel() - 1
    L = max_seqlen
    P = prefix_k.shape[1]
    seq, pos = _token_positions(cu_seqlens, T)
    flat = seq * L + pos

    def pad(x):  # index_copy's backward is a gather: deterministic
        return x.new_zeros((S * L, H, D)).index_copy(0, flat, x).view(S, L, H, D)

    keys = torch.cat([_prefix_per_sequence(prefix_k, prefix_index, S), pad(k)], 1)
    values = torch.cat([_prefix_per_sequence(prefix_v, prefix_index, S), pad(v)], 1)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    i = torch.arange(L, device=q.device)
    causal_ok = (i[None, :] <= i[:, None])[None] & (i[None, None, :] < lengths[:, None, None])
    mask = torch.cat([torch.ones((S, L, P), dtype=torch.bool, device=q.device), causal_ok], 2)
    # Padded query rows (i >= length) still see key 0, so no row is fully masked (no NaN).
    return (pad(q).transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), mask[:, None], flat)


def _unpad(out_bhld, flat):
    S, H, L, D = out_bhld.shape
    return out_bhld.transpose(1, 2).reshape(S * L, H, D).index_select(0, flat)


def _eager_prefix(q, k, v, cu_seqlens, max_seqlen, prefix_k, prefix_v, prefix_index, scale):
    qp, keys, values, mask, flat = _padded_prefix_problem(q, k, v, cu_seqlens, max_seqlen,
                                                          prefix_k, prefix_v, prefix_index)
    scores = torch.matmul(qp, keys.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(-1, dtype=torch.float32 if q.dtype != torch.float64 else None).to(v.dtype)
    return _unpad(torch.matmul(probs, values), flat)


def _sdpa_prefix(q, k, v, cu_seqlens, max_seqlen, prefix_k, prefix_v, prefix_index, scale):
    qp, keys, values, mask, flat = _padded_prefix_problem(q, k, v, cu_seqlens, max_seqlen,
                                                          prefix_k, prefix_v, prefix_index)
    return _unpad(F.scaled_dot_product_attention(qp, keys, values, attn_mask=mask, scale=scale), flat)


def _xformers_prefix(q, k, v, cu_seqlens, max_seqlen, prefix_k, prefix_v, prefix_index, scale):
    """One batch-1 call: keys/values are [prefix of s; suffix of s] for every s, back to back, and
    BlockDiagonalCausalFromBottomRightMask (q_seqlen = len_s, kv_seqlen = P + len_s) lets query
    i see all P prefix keys and suffix keys j <= i."""
    import xformers.ops as xops
    from xformers.ops.fmha.attn_bias import BlockDiagonalCausalFromBottomRightMask

    T, H, D = q.shape
    S = cu_seqlens.numel() - 1
    P = prefix_k.shape[1]
    lengths = _packing_info(cu_seqlens).lengths
    mask = BlockDiagonalCausalFromBottomRightMask.from_seqlens(
        q_seqlen=lengths, kv_seqlen=[n + P for n in lengths])
    # Interleave with one gather from [all per-sequence prefixes; all suffix tokens]; every
    # source row is used once, so the backward is a plain (deterministic) scatter.
    starts = cu_seqlens.long()
    kv_starts = starts + P * torch.arange(S + 1, device=q.device)
    r = torch.arange(T + S * P, device=q.device)
    seq = torch.searchsorted(kv_starts[1:], r, right=True)
    off = r - kv_starts[seq]
    index = torch.where(off < P, seq * P + off, S * P + starts[seq] + off - P)

    def packed(prefix, suffix):
        per_seq = _prefix_per_sequence(prefix, prefix_index, S).reshape(S * P, H, D)
        return torch.cat([per_seq, suffix], 0).index_select(0, index)[None]

    out = xops.memory_efficient_attention(q[None], packed(prefix_k, k), packed(prefix_v, v),
                                          attn_bias=mask, scale=scale)
    return out[0]


_DENSE_IMPLS = {"triton": _triton_attention, "xformers": _xformers_attention, "sdpa": _sdpa_attention,
                "eager": _eager_attention}
_PREFIX_IMPLS = {"triton": _triton_prefix, "xformers": _xformers_prefix, "sdpa": _sdpa_prefix,
                 "eager": _eager_prefix}


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------


def _check_common(named: dict[str, Tensor]) -> None:
    items = list(named.items())
    first_name, first = items[0]
    for name, t in items:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; "
                            "attention inputs must share one dtype")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; "
                             "attention inputs must be on one device")


def _last_dim_contiguous(t: Tensor) -> Tensor:
    # Kernels index head_dim with unit stride; any other layout (a slice of a fused qkv
    # projection, a transposed view) is used as is.
    return t if t.stride(-1) == 1 else t.contiguous()


def _default_scale(scale, head_dim):
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale}")
    return scale


def _check_dense(q, k, v, causal):
    _check_common({"q": q, "k": k, "v": v})
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [batch, seq, heads, head_dim], got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if (q.shape[0], q.shape[2], q.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, heads and "
                         "head_dim ([batch, seq, heads, head_dim])")
    if k.shape[1] == 0:
        raise ValueError("k and v hold no keys (seq length 0)")
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"causal attention needs as many queries as keys, got Lq={q.shape[1]}, "
                         f"Lk={k.shape[1]}")


def _check_max_seqlen(max_seqlen) -> None:
    if isinstance(max_seqlen, (bool, Tensor)) or not isinstance(max_seqlen, numbers.Integral) or max_seqlen < 1:
        raise ValueError(f"max_seqlen must be a positive int (an upper bound on sequence length), "
                         f"got {max_seqlen!r}")


def _check_prefix_shapes(q, k, v, cu_seqlens, max_seqlen, prefix_k, prefix_v, prefix_index):
    _check_common({"q": q, "k": k, "v": v, "prefix_k": prefix_k, "prefix_v": prefix_v})
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k and v must be [tokens, heads, head_dim] of one shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if prefix_k.dim() != 4 or prefix_v.shape != prefix_k.shape or prefix_k.shape[2:] != q.shape[1:]:
        raise ValueError(f"prefix_k and prefix_v must be [prefixes, prefix_len, heads, head_dim] "
                         f"matching q {tuple(q.shape)} in heads and head_dim, got "
                         f"{tuple(prefix_k.shape)} and {tuple(prefix_v.shape)}")
    if prefix_k.shape[0] == 0:
        raise ValueError("prefix_k holds no prefix; pass one prefix of length 0 for no prefix")
    for name, t in (("cu_seqlens", cu_seqlens), ("prefix_index", prefix_index)):
        if t is None:
            continue
        if not isinstance(t, Tensor) or t.dtype != torch.int32:
            raise TypeError(f"{name} must be an int32 tensor, got "
                            f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must hold S + 1 >= 2 offsets, got {cu_seqlens.numel()}")
    if prefix_index is not None and prefix_index.numel() != cu_seqlens.numel() - 1:
        raise ValueError(f"prefix_index has {prefix_index.numel()} entries for "
                         f"{cu_seqlens.numel() - 1} sequences")
    _check_max_seqlen(max_seqlen)


class _PackingInfo:
    __slots__ = ("lengths", "refs", "key")

    def __init__(self, lengths, refs, key):
        self.lengths, self.refs, self.key = lengths, refs, key


# Validated packings, keyed by tensor identity and version counter: the packing of a run is
# fixed, so its values are read back to the host (one synchronisation) once, not every call.
_packing_cache: dict[tuple, _PackingInfo] = {}
_PACKING_CACHE_SIZE = 64


def _version(t):
    return None if t is None or t.is_inference() else t._version


def _cache_key(cu_seqlens, prefix_index, total, max_seqlen, num_prefixes):
    return (id(cu_seqlens), _version(cu_seqlens), id(prefix_index), _version(prefix_index),
            total, max_seqlen, num_prefixes)


def _lookup_packing(key, cu_seqlens, prefix_index):
    info = _packing_cache.get(key)
    if info is None or key[1] is None:
        return None
    if info.refs[0]() is not cu_seqlens or (prefix_index is not None and info.refs[1]() is not prefix_index):
        return None
    return info


def _validate_packing(cu_seqlens, prefix_index, total, max_seqlen, num_prefixes, check_shapes=None) -> _PackingInfo:
    """The packing's values checked once per (tensors, versions); `check_shapes()`, when given, runs first on a miss
    (shapes and dtypes before any value is read), so a cache hit pays for neither."""
    key = _cache_key(cu_seqlens, prefix_index, total, max_seqlen, num_prefixes)
    info = _lookup_packing(key, cu_seqlens, prefix_index)
    if info is not None:
        return info
    if check_shapes is not None:
        check_shapes()
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != total:
        raise ValueError(f"cu_seqlens must start at 0 and end at the token count {total}, got "
                         f"{offsets[0]} .. {offsets[-1]}")
    lengths = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
    for s, n in enumerate(lengths):
        if n <= 0:
            raise ValueError(f"cu_seqlens must be strictly increasing (every sequence holds a token): "
                             f"cu_seqlens[{s + 1}]={offsets[s + 1]} <= cu_seqlens[{s}]={offsets[s]}")
    if max(lengths) > max_seqlen:
        raise ValueError(f"max_seqlen={max_seqlen} but sequence {lengths.index(max(lengths))} holds "
                         f"{max(lengths)} tokens")
    if prefix_index is not None:
        lo, hi = torch.stack([prefix_index.min(), prefix_index.max()]).tolist()  # one transfer
        if lo < 0 or hi >= num_prefixes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"prefix_index holds {bad}, outside [0, {num_prefixes}) for "
                             f"{num_prefixes} prefixes")
    refs = (weakref.ref(cu_seqlens), weakref.ref(prefix_index) if prefix_index is not None else None)
    info = _PackingInfo(lengths, refs, key)
    if key[1] is not None and (prefix_index is None or key[3] is not None):
        if len(_packing_cache) >= _PACKING_CACHE_SIZE:
            _packing_cache.pop(next(iter(_packing_cache)))
        _packing_cache[key] = info
    return info


def _packing_info(cu_seqlens) -> _PackingInfo:
    """Host-side sequence lengths (xformers' masks need a Python list)."""
    for info in _packing_cache.values():
        if info.refs[0]() is cu_seqlens and info.key[1] == _version(cu_seqlens):
            return info
    offsets = cu_seqlens.tolist()
    return _PackingInfo([b - a for a, b in zip(offsets[:-1], offsets[1:])], (None, None), None)


def _values_checkable(t: Tensor) -> bool:
    # Reading values back needs a synchronisation: impossible during CUDA graph capture and a
    # graph break under torch.compile; under fake tensors (tracing, shape propagation) there are no values. There
    # the packing is the caller's contract.
    if torch.compiler.is_compiling() or type(t) is not Tensor:
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


@torch.compiler.assume_constant_result
def _select(op, device, dtype, head_dim, causal, backend) -> str:
    # A pure function of its arguments for the life of a compiled graph: torch.compile bakes
    # the choice in rather than tracing the probes and caches behind it.
    request = backends.AttentionRequest(op, device, dtype, head_dim, causal)
    try:
        return backends.select_backend(request, backend)
    except backends.BackendNotSupportedError as exc:
        if backend != "xformers":
            raise
        # One line (xformers' own errors run to several; the full text stays in __cause__), with the
        # reason an import alone hides: a wheel built for another torch/CUDA imports, then has no operators.
        line = str(exc).strip().splitlines()[0]
        build = _xformers_build_problem()
        raise backends.BackendNotSupportedError(line if build is None else f"{line}; {build}") from exc


def _xformers_build_problem() -> str | None:
    """What the installed xformers' C++/CUDA extension was built for, when it failed to load; else None."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("xformers") is None:
        return None
    try:
        from xformers import _cpp_lib  # records the load failure (xformers only logs a warning)
    except Exception:
        return None  # nothing recorded to read; the backend's own reason stands
    failure = getattr(_cpp_lib, "_cpp_library_load_exception", None)
    if failure is None:
        return None
    try:
        name = f"xformers {importlib.metadata.version('xformers')}"
    except importlib.metadata.PackageNotFoundError:
        name = "xformers"
    here = f"torch {torch.__version__}" + (f" with CUDA {torch.version.cuda}" if torch.version.cuda else "")
    info = getattr(failure, "build_info", None)
    if info is None:
        built = "another torch, CUDA or Python"
    else:
        cuda = info.cuda_version  # e.g. 1208 for 12.8
        built = f"torch {info.torch_version}" + (f" with CUDA {cuda // 100}.{cuda % 100}" if cuda else "")
    return (f"{name} could not load its C++/CUDA extension: it was built for {built}, this is {here}; "
            "install the xformers build for this torch and CUDA (README, 'xformers')")


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: float | None = None,
              backend: str = "auto") -> Tensor:
    """Softmax attention, out = softmax(q k^T * scale [+ causal mask]) v.

    Args:
        q: [batch, Lq, heads, head_dim]. Lq may differ from Lk (non-causal), e.g. C class
            queries against an image's keys.
        k, v: [batch, Lk, heads, head_dim].
        causal: query i attends to keys j <= i (needs Lq == Lk).
        scale: softmax scale, default 1/sqrt(head_dim).
        backend: "auto", "triton", "xformers", "sdpa" or "eager" (see ``backends``).

    Returns:
        out [batch, Lq, heads, head_dim] in q's dtype.

    Raises:
        TypeError / ValueError for malformed inputs; ``BackendNotSupportedError`` when the
        requested backend (or, for auto, every backend) cannot run them, with the reasons.
    """
    _check_dense(q, k, v, causal)
    scale = _default_scale(scale, q.shape[-1])
    name = _select("attention", q.device, q.dtype, q.shape[-1], bool(causal), backend)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    return _DENSE_IMPLS[name](q, k, v, bool(causal), scale)


def prefix_varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                            prefix_k: Tensor, prefix_v: Tensor, prefix_index: Tensor | None = None,
                            scale: float | None = None, backend: str = "auto") -> Tensor:
    """Packed causal attention over S sequences, each also attending to a shared prefix.

    Query i of sequence s attends to all P keys of prefix ``prefix_index[s]``, then causally to
    the suffix keys j <= i of sequence s::

        keys(s)   = [prefix_k[g]; k[cu[s]:cu[s+1]]],  g = prefix_index[s] (0 if None)
        out[t]    = softmax(q[t] keys(s)^T * scale, masked to prefix + suffix j <= i) values(s)

    Args:
        q, k, v: [T, heads, head_dim], the suffix tokens of all sequences back to back.
        cu_seqlens: int32 [S + 1], 0 first, T last, strictly increasing.
        max_seqlen: an upper bound on the sequence lengths (a Python int: no host sync).
        prefix_k, prefix_v: [G, P, heads, head_dim], the G shared prefixes (P may be 0).
        prefix_index: int32 [S] in [0, G), the prefix of each sequence; None: all use prefix 0.
            Sequences sharing a prefix are fastest when adjacent.
        scale: softmax scale, default 1/sqrt(head_dim).
        backend: "auto", "triton", "xformers", "sdpa" or "eager".

    Returns:
        out [T, heads, head_dim]. Gradients flow to q, k, v and to prefix_k/prefix_v (summed over
        the sequences sharing each prefix, deterministically on the triton path).

    The values of ``cu_seqlens``/``prefix_index`` are checked once per tensor (cached while the
    tensor is unchanged), except under torch.compile or CUDA graph capture, where they are the
    caller's contract.
    """
    _check_prefix_shapes(q, k, v, cu_seqlens, max_seqlen, prefix_k, prefix_v, prefix_index)
    scale = _default_scale(scale, q.shape[-1])
    if _values_checkable(cu_seqlens):
        _validate_packing(cu_seqlens, prefix_index, q.shape[0], max_seqlen, prefix_k.shape[0])
    name = _select("prefix_varlen_attention", q.device, q.dtype, q.shape[-1], True, backend)
    q, k, v, prefix_k, prefix_v = (_last_dim_contiguous(t) for t in (q, k, v, prefix_k, prefix_v))
    return _PREFIX_IMPLS[name](q, k, v, cu_seqlens.contiguous(), int(max_seqlen), prefix_k, prefix_v,
                               None if prefix_index is None else prefix_index.contiguous(), scale)


def prefix_stream_attention(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, groups: int, prefix_len: int,
                            prefix_index: Tensor | None = None, scale: float | None = None,
                            backend: str = "auto") -> Tensor:
    """The attention of a whole packed text stream: G prefixes of P rows, then the packed suffixes, in one call.

    The stream's rows are ``[prefix 0 | ... | prefix G-1 | suffix tokens]`` (N = G * P + T rows). A prefix row
    attends causally within its prefix; suffix token i of sequence s attends to every row of prefix
    ``prefix_index[s]`` and causally to its own sequence, exactly as
    ``prefix_varlen_attention(q_suffix, k_suffix, v_suffix, ..., prefix_k, prefix_v, prefix_index)`` with the
    prefixes' keys and values taken from the stream.

    Args:
        qkv: [N, 3, heads, head_dim], q, k and v of every row (the in-projection's output viewed, no copy).
        cu_seqlens: int32 [S + 1] over the T suffix tokens (0 first, T last, strictly increasing).
        max_seqlen: an upper bound on the suffix lengths (a Python int: no host sync).
        groups, prefix_len: G >= 1 prefixes of P >= 0 rows at the top of the stream.
        prefix_index: int32 [S] in [0, G), each sequence's prefix; None: all use prefix 0.
        scale: softmax scale, default 1/sqrt(head_dim).
        backend: "auto", "triton", "xformers", "sdpa" or "eager" (chosen as for prefix_varlen_attention).

    Returns:
        out [N, heads, head_dim]. On the triton backend one op forward and one backward whose gradient is one
        [N, 3, heads, head_dim] tensor (no split, stack or sum of partial gradients); the other backends run the
        prefixes' causal attention and ``prefix_varlen_attention`` and join the outputs.
    """
    if not isinstance(qkv, Tensor) or not qkv.is_floating_point():
        raise TypeError(f"qkv must be a floating-point torch.Tensor, got {getattr(qkv, 'dtype', type(qkv).__name__)}")
    if qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"qkv must be [rows, 3, heads, head_dim], got shape {tuple(qkv.shape)}")
    for name, value in (("groups", groups), ("prefix_len", prefix_len)):
        if isinstance(value, (bool, Tensor)) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if groups < 1 or prefix_len < 0:
        raise ValueError(f"need groups >= 1 and prefix_len >= 0, got groups={groups}, prefix_len={prefix_len}")
    rows = groups * prefix_len
    if qkv.shape[0] < rows:
        raise ValueError(f"qkv has {qkv.shape[0]} rows, fewer than the {groups} x {prefix_len} prefix rows")
    name = _select("prefix_varlen_attention", qkv.device, qkv.dtype, qkv.shape[-1], True, backend)
    scale = _default_scale(scale, qkv.shape[-1])
    if name == "triton":
        # The launcher checks the stream's shapes, dtypes and devices (kernels.attention_prefix._check_stream); no
        # views of q, k, v and the prefixes are made here (host time, once per text block and step).
        _check_max_seqlen(max_seqlen)
        for what, t in (("cu_seqlens", cu_seqlens), ("prefix_index", prefix_index)):
            if t is not None and not isinstance(t, Tensor):
                raise TypeError(f"{what} must be an int32 tensor, got {type(t).__name__}")
        index = None if prefix_index is None else prefix_index.contiguous()
        cu_seqlens = cu_seqlens.contiguous()
        if _values_checkable(cu_seqlens):
            from fastprompt.kernels.attention_prefix import _check_stream

            _validate_packing(cu_seqlens, index, qkv.shape[0] - rows, max_seqlen, groups,
                              check_shapes=lambda: _check_stream(qkv, cu_seqlens, index, groups, prefix_len))
        return _triton_stream(_last_dim_contiguous(qkv), cu_seqlens, int(groups), int(prefix_len), index, scale)
    prefix, suffix = qkv.split([rows, qkv.shape[0] - rows])
    q, k, v = suffix.unbind(1)
    prefix_k, prefix_v = (t.unflatten(0, (groups, prefix_len)) for t in prefix.unbind(1)[1:])
    _check_prefix_shapes(q, k, v, cu_seqlens, max_seqlen, prefix_k, prefix_v, prefix_index)
    if _values_checkable(cu_seqlens):
        _validate_packing(cu_seqlens, prefix_index, q.shape[0], max_seqlen, groups)
    out_suffix = prefix_varlen_attention(q, k, v, cu_seqlens, max_seqlen, prefix_k, prefix_v, prefix_index,
                                         scale=scale, backend=name)
    if rows == 0:
        return out_suffix
    qp, kp, vp = (t.unflatten(0, (groups, prefix_len)) for t in prefix.unbind(1))
    out_prefix = attention(qp, kp, vp, causal=True, scale=scale, backend=backend)
    return torch.cat([out_prefix.flatten(0, 1), out_suffix])
