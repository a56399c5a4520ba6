"""Dense attention in Triton: flash-style forward (online softmax, saves log-sum-exp) and backward.

Layout [batch, seq, heads, head_dim] everywhere (open_clip's batch-first N, L, D viewed as
N, L, H, hd; xformers' BMHK). Any sequence length works: tails are masked, nothing is padded to
a block multiple, so 77 text tokens, 197..210 vision tokens, or C = 1000 class queries against
199 image keys (VAIPL cross-attention, Lq != Lk) all run as they are. The B x H x Lq x Lk
probabilities are never materialised.

Numerics: scores are accumulated in fp32 and kept in base 2 (exp2 is the hardware
instruction; ``qk_scale_log2 = scale * log2(e)`` folds the conversion into the softmax scale),
the softmax statistics (running max, running sum, log-sum-exp) are fp32, and the output is cast
once to the input dtype. The saved statistic is ``lse2 = log2(sum_j exp2(s_ij))`` in base 2,
[B, H, Lq] fp32; ``lse2 * ln(2)`` is the natural log-sum-exp.

Backward (no atomics, deterministic): one kernel per query block for dQ (loops over key blocks),
which also writes the softmax term ``delta = rowsum(dO * O)`` of its rows, then one kernel per key
block for dK/dV (loops over query blocks, recomputes P from lse2, reads delta): two launches.
Recomputing P twice costs one extra Q.K^T but keeps every gradient written by exactly one program.

dtypes: fp16 and bf16 on the GPU (tensor cores, fp32 accumulation); fp32 only under the
Triton interpreter, where the CPU tests run. fp32 on a GPU belongs to sdpa: IEEE fp32 dot
products spill registers at these tiles and compile ~5x slower, and nothing hot runs in fp32.

Causality is a runtime flag, not a constexpr: the masks cost a compare per score, and one
compiled variant per (dtype, head dim) keeps the ahead-of-time build small (``AOT_SPECS``).
Flags are excluded from the JIT's "argument == 1" specialisation, so the GPU runs exactly the
binaries the ahead-of-time build checked.

The helpers ``online_softmax_step`` and ``finish_softmax`` are shared with the packed prefix
kernels in ``attention_prefix.py``.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ._launch import launch
from ._host import cdiv, next_power_of_2

GPU_DTYPES = (torch.float16, torch.bfloat16)
INTERPRETER_DTYPES = (torch.float32,)  # the interpreter has no bf16; fp32 is what CPU tests use
SUPPORTED_DTYPES = GPU_DTYPES + INTERPRETER_DTYPES
# ViT-B/16 and its text tower use 64, ViT-H/14 uses 80, larger widths 128. Other head dims are
# left to the sdpa/xformers backends rather than compiled (every head dim is a separate set of
# compiled kernels, see AOT_SPECS).
SUPPORTED_HEAD_DIMS = (64, 80, 128)
LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# Shared jit helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def online_softmax_step(acc, m_i, l_i, s, v):
    """Fold one block of base-2 scores ``s`` [M, N] (masked entries -inf) and values ``v`` [N, D]
    into the running (acc [M, D], max m_i [M], sum l_i [M]).

    A row whose scores are all -inf so far keeps m = -inf; the reference point m_safe = 0 keeps
    exp2 away from (-inf) - (-inf) = NaN, and such a row simply accumulates nothing.
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def finish_softmax(acc, m_i, l_i):
    """Normalised output rows and their base-2 log-sum-exp (rows with no key give 0 and -inf)."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    return acc / l_safe[:, None], m_i + tl.math.log2(l_safe)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["causal"])
def _dense_fwd_kernel(
    Q, K, V, OUT, LSE2,  # q, out: [B, Lq, H, D]; k, v: [B, Lk, H, D]; lse2: [B, H, Lq] fp32
    stride_qb, stride_qm, stride_qh,  # the head_dim stride is 1 for every tensor (launcher)
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    H, LQ, LK, qk_scale_log2, causal,  # causal: 0 or 1 (Lq == Lk then)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < LQ

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # causal: keys past the block's last query contribute nothing
    hi = tl.where(causal != 0, tl.minimum(LK, (pid_m + 1) * BLOCK_M), LK)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < LK
        kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, kt) * qk_scale_log2
        keep = n_ok[None, :] & ((cols[None, :] <= offs_m[:, None]) | (causal == 0))
        s = tl.where(keep, s, float("-inf"))
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, s, v)

    out, lse2 = finish_softmax(acc, m_i, l_i)
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE2 + (b * H + h) * LQ + offs_m, lse2, mask=m_ok)


@triton.jit(do_not_specialize=["causal"])
def _dense_bwd_dkdv_kernel(
    Q, K, V, DO, LSE2, DELTA, DK, DV,  # dk, dv: [B, Lk, H, D] contiguous like k
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_dkb, stride_dkn, stride_dkh,
    H, LQ, LK, qk_scale_log2, scale, causal,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    n_ok = offs_n < LK
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    row_base = (b * H + h) * LQ

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = tl.where(causal != 0, pid_n * BLOCK_N, 0)  # causal: earlier queries never see these keys
    for start_m in range(lo, LQ, BLOCK_M):
        rows = start_m + offs_m
        m_ok = rows < LQ
        qt = tl.load(q_base + rows[None, :] * stride_qm + offs_d[:, None],
                     mask=m_ok[None, :] & d_ok[:, None], other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dom + offs_d[None, :],
                     mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        lse2 = tl.load(LSE2 + row_base + rows, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + row_base + rows, mask=m_ok, other=0.0)
        st = tl.dot(k, qt) * qk_scale_log2  # [N, M] = S^T
        keep = n_ok[:, None] & m_ok[None, :] & ((offs_n[:, None] <= rows[None, :]) | (causal == 0))
        pt = tl.where(keep, tl.math.exp2(st - lse2[None, :]), 0.0)
        dv += tl.dot(pt.to(do.dtype), do)
        dpt = tl.dot(v, tl.trans(do))
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(qt.dtype), tl.trans(qt))

    out_off = b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :]
    tl.store(DK + out_off, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit(do_not_specialize=["causal"])
def _dense_bwd_dq_kernel(
    Q, K, V, O, DO, LSE2, DELTA, DQ,  # dq: [B, Lq, H, D] contiguous; delta: [B, H, Lq] fp32, written here
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    stride_dob, stride_dom, stride_doh,
    stride_dqb, stride_dqm, stride_dqh,
    H, LQ, LK, qk_scale_log2, scale, causal,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ of BLOCK_M query rows of one (batch, head). It also writes those rows' softmax term delta =
    rowsum(dO * O) in fp32, which the dK/dV kernel launched after it reads (each row belongs to one program)."""
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < LQ
    row_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=row_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
                 mask=row_mask, other=0.0)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
                mask=row_mask, other=0.0)
    row_base = (b * H + h) * LQ
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + row_base + offs_m, delta, mask=m_ok)
    lse2 = tl.load(LSE2 + row_base + offs_m, mask=m_ok, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = tl.where(causal != 0, tl.minimum(LK, (pid_m + 1) * BLOCK_M), LK)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < LK
        kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        vt = tl.load(v_base + cols[None, :] * stride_vn + offs_d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, kt) * qk_scale_log2
        keep = m_ok[:, None] & n_ok[None, :] & ((cols[None, :] <= offs_m[:, None]) | (causal == 0))
        p = tl.where(keep, tl.math.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, vt)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt))

    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=row_mask)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)  # one or two head dims per model; a cache hit costs no Python call
def block_d(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and padded head dim. Sequence lengths
# here are short (77..1000), so blocks of 64 rows keep enough programs in flight
# (B=32, H=12, L=199: 1,536 forward programs) while wasting at most 63 masked rows.
# 64-row leading tiles let Hopper use wgmma (dkdv at head dim 128 stays at 32 key rows to
# keep its two fp32 accumulators in registers).
_DENSE_CONFIGS = {
    # kernel: {BLOCK_D: (BLOCK_M, BLOCK_N, num_warps, num_stages)}
    "fwd": {64: (64, 64, 4, 3), 128: (64, 32, 4, 3)},
    "dkdv": {64: (32, 64, 4, 2), 128: (32, 32, 4, 2)},
    "dq": {64: (64, 32, 4, 2), 128: (64, 32, 4, 2)},
}


def dense_config(kernel: str, head_dim: int) -> tuple[int, int, int, int]:
    return _DENSE_CONFIGS[kernel][block_d(head_dim)]


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------


def interpreted() -> bool:
    """True when triton runs kernels in its interpreter (TRITON_INTERPRET=1 before import)."""
    return not isinstance(_dense_fwd_kernel, triton.runtime.JITFunction)  # no import per call: a launcher asks


def check_head_dim_and_dtype(name: str, x: torch.Tensor) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: dtype {x.dtype} is not supported by the Triton attention kernels "
                        f"(supported: {', '.join(str(d) for d in SUPPORTED_DTYPES)})")
    if x.dtype in INTERPRETER_DTYPES and not interpreted():
        raise TypeError(f"{name}: the Triton attention kernels run {x.dtype} only under the "
                        f"interpreter (CPU tests); on a GPU use float16/bfloat16, or sdpa for {x.dtype}")
    if x.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{name}: head_dim {x.shape[-1]} is not supported by the Triton attention "
                         f"kernels (supported: {', '.join(map(str, SUPPORTED_HEAD_DIMS))})")


def check_same_dtype_device(**tensors: torch.Tensor) -> None:
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; "
                            "attention inputs must share one dtype")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; "
                             "attention inputs must be on one device")
    for name, t in items:
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last (head_dim) dimension, "
                             f"got strides {tuple(t.stride())}")


def _check_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [batch, seq, heads, head_dim], got shape {tuple(t.shape)}")
    check_same_dtype_device(q=q, k=k, v=v)
    check_head_dim_and_dtype("q", q)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if (q.shape[0], q.shape[2], q.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, heads "
                         "and head_dim ([batch, seq, heads, head_dim])")
    if k.shape[1] == 0:
        raise ValueError("k and v have no keys (seq length 0): attention over nothing is undefined")
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"causal attention needs as many queries as keys, got Lq={q.shape[1]} "
                         f"and Lk={k.shape[1]}")


def qk_scale_log2(scale: float) -> float:
    if not math.isfinite(scale):
        raise ValueError(f"softmax scale must be finite, got {scale}")
    return scale * LOG2E


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns out [B, Lq, H, D] (contiguous, q's dtype) and lse2 [B, H, Lq] fp32 (base 2)."""
    _check_dense(q, k, v, causal)
    B, LQ, H, D = q.shape
    LK = k.shape[1]
    out = torch.empty((B, LQ, H, D), dtype=q.dtype, device=q.device)
    lse2 = torch.empty((B, H, LQ), dtype=torch.float32, device=q.device)
    if LQ == 0 or B * H == 0:
        return out, lse2
    bm, bn, warps, stages = dense_config("fwd", D)
    launch(_dense_fwd_kernel, (B * H, cdiv(LQ, bm)),
        q, k, v, out, lse2,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        H, LQ, LK, qk_scale_log2(scale), int(causal),
        HEAD_DIM=D, BLOCK_D=block_d(D), BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
    )
    return out, lse2


def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse2: torch.Tensor, *, causal: bool,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dq, dk, dv (contiguous, in the inputs' dtype) for ``attention_forward``."""
    _check_dense(q, k, v, causal)
    check_same_dtype_device(q=q, grad_out=grad_out, out=out)
    if grad_out.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"grad_out {tuple(grad_out.shape)} and out {tuple(out.shape)} must have "
                         f"q's shape {tuple(q.shape)}")
    B, LQ, H, D = q.shape
    LK = k.shape[1]
    if lse2.shape != (B, H, LQ) or lse2.dtype != torch.float32 or not lse2.is_contiguous():
        raise ValueError(f"lse2 must be a contiguous fp32 [B, H, Lq] = {(B, H, LQ)} tensor, "
                         f"got {tuple(lse2.shape)} {lse2.dtype}")
    dq = torch.empty((B, LQ, H, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, LK, H, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, LK, H, D), dtype=v.dtype, device=v.device)
    if LQ == 0 or B * H == 0:
        return dq, dk.zero_(), dv.zero_()
    delta = torch.empty((B, H, LQ), dtype=torch.float32, device=q.device)
    meta = dict(HEAD_DIM=D, BLOCK_D=block_d(D))
    qkv_strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    args = (H, LQ, LK, qk_scale_log2(scale), scale, int(causal))

    # dQ first: its kernel writes delta, which the dK/dV kernel reads.
    bm, bn, warps, stages = dense_config("dq", D)
    launch(_dense_bwd_dq_kernel, (B * H, cdiv(LQ, bm)),
        q, k, v, out, grad_out, lse2, delta, dq, *qkv_strides, *out.stride()[:3], *grad_out.stride()[:3],
        *dq.stride()[:3], *args,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **meta,
    )
    bm, bn, warps, stages = dense_config("dkdv", D)
    launch(_dense_bwd_dkdv_kernel, (B * H, cdiv(LK, bn)),
        q, k, v, grad_out, lse2, delta, dk, dv, *qkv_strides, *grad_out.stride()[:3], *dk.stride()[:3], *args,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **meta,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (fastprompt.kernels.aot)
# ----------------------------------------------------------------------------------------------

_FP32_POINTERS = {"LSE2", "DELTA", "PART_DK", "PART_DV"}
_INT32_POINTERS = {"SEQ_IDS", "CU_SEQLENS", "PREFIX_INDEX", "TOKEN_ORDER", "CHUNK_START", "CHUNK_GROUP",
                   "CHUNK_OFFSETS"}
_FLOAT_SCALARS = {"qk_scale_log2", "scale"}
_INT_SCALARS = {"H", "T", "P", "L", "LQ", "LK"}  # sizes; every other upper-case argument is a pointer


def aot_signature(fn, dtype: torch.dtype, constexprs) -> tuple[dict[str, str], tuple[str, ...]]:
    """Runtime argument types of an attention kernel for ``dtype`` inputs, and the arguments the
    JIT sees as multiples of 16 (every pointer: fresh allocations; every stride: multiples of
    head_dim, itself a multiple of 16)."""
    from fastprompt.kernels.aot import TRITON_DTYPE

    signature, aligned = {}, []
    for name in fn.arg_names:
        if name in constexprs:
            continue
        if name.isupper() and name not in _INT_SCALARS:
            signature[name] = ("*fp32" if name in _FP32_POINTERS else "*i32" if name in _INT32_POINTERS
                               else f"*{TRITON_DTYPE[dtype]}")
            aligned.append(name)
        elif name in _FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride_"):
                aligned.append(name)
    return signature, tuple(aligned)


def _aot_specs():
    from fastprompt.kernels.aot import TRITON_DTYPE, AotSpec

    specs = []
    for dtype in GPU_DTYPES:
        for head_dim in SUPPORTED_HEAD_DIMS:
            base = {"HEAD_DIM": head_dim, "BLOCK_D": block_d(head_dim)}
            variants = []
            for kernel, fn in (("fwd", _dense_fwd_kernel), ("dkdv", _dense_bwd_dkdv_kernel),
                               ("dq", _dense_bwd_dq_kernel)):
                bm, bn, warps, stages = dense_config(kernel, head_dim)
                # Every tl.dot leads with BLOCK_M rows (fwd, dq) or BLOCK_N rows (dkdv); Hopper's
                # wgmma takes 64 rows per warp group.
                lead = bn if kernel == "dkdv" else bm
                variants.append((kernel, fn, {"BLOCK_M": bm, "BLOCK_N": bn}, warps, stages, lead >= 64))
            for label, fn, extra, warps, stages, wgmma in variants:
                constexprs = {**base, **extra}
                signature, aligned = aot_signature(fn, dtype, constexprs)
                specs.append(AotSpec(
                    name=f"attention_{label}[{TRITON_DTYPE[dtype]},D={head_dim}]", fn=fn,
                    signature=signature, constexprs=constexprs, num_warps=warps, num_stages=stages,
                    divisible_by_16=aligned, wgmma=wgmma, hot=True,
                ))
    return specs


# Every configuration the launchers can pick on a GPU: dtype x head dim x kernel.
AOT_SPECS = _aot_specs()
