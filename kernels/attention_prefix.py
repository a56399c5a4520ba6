"""Packed causal varlen attention with shared prefixes, in Triton (forward and backward).

The text tower's hot path. S sequences (the class-specific suffix tokens of every class prompt)
are packed back to back in q/k/v [T, H, D] with int32 ``cu_seqlens`` [S + 1]; G shared prefixes
(the class-independent prompt start, computed once; G = 1 normally, G = number of images for
image-conditioned prompts such as CoCoOp) are prefix_k/prefix_v [G, P, H, D], and int32
``prefix_index`` [S] says which prefix each sequence uses (None: all use prefix 0). Query i of
sequence s attends to all P keys of its prefix, then causally to the suffix keys j <= i of its
own sequence.

Work is split by *token blocks*, not by sequences: one program takes BLOCK_M consecutive packed
tokens, which may span several short sequences (the text tower has ~1000 sequences of 1..30
tokens). Its suffix keys run from the start of the first token's sequence to its last token,
masked to "same sequence and causal" (``seq_ids`` [T] maps a token to its sequence). Its prefix
keys are those of the prefixes its rows use: a loop over the prefix ids present in the block
(one id when G = 1 or when sequences that share a prefix are adjacent, as CoCoOp packs them).

Backward, deterministic (no atomics):
* dQ per query block and suffix dK/dV per key block, as in the dense kernels, except that the dQ kernel
  also computes the softmax term delta = rowsum(dO * O) of its rows (launched first, it hands delta to the
  key-gradient kernels: four launches per backward instead of five);
* prefix dK/dV in two stages: stage 1 gives per-chunk fp32 partials, where a chunk is a run of
  tokens that all use one prefix (tokens taken in prefix order, see ``prefix_grad_plan``);
  stage 2 sums each prefix's chunks in chunk order. Both orders are fixed by the inputs alone,
  so two runs are bit-identical.

Statistics, dtypes (fp16/bf16 compiled, fp32 in the interpreter) and runtime flags
(``has_prefix_index``, ``permuted``) follow ``attention.py``; lse2 here is [H, T]. The host
side derives ``seq_ids`` and the gradient plan from ``cu_seqlens``/``prefix_index`` with device
ops only (no synchronisation, CUDA-graph capturable) and reuses them while those tensors are
unchanged.
"""

from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

from ._launch import launch
from ._host import cdiv
from .attention import (
    block_d,
    check_head_dim_and_dtype,
    check_same_dtype_device,
    finish_softmax,
    online_softmax_step,
    qk_scale_log2,
)

# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _prefix_block_groups(SEQ_IDS, PREFIX_INDEX, offs_t, t_ok, has_prefix_index, prefix_seqs):
    """Sequence id, prefix id per row (0 without an index; -1 for the rows of the first
    ``prefix_seqs`` sequences, which are prefixes themselves and attend to none), and the range
    of prefix ids present in the block (empty when no row has a prefix)."""
    sid = tl.load(SEQ_IDS + offs_t, mask=t_ok, other=0)
    has = t_ok & (sid >= prefix_seqs)
    grp = tl.load(PREFIX_INDEX + (sid - prefix_seqs), mask=has & (has_prefix_index != 0), other=0)
    grp = tl.where(has, grp, -1)
    g_lo = tl.min(tl.where(has, grp, 2147483647), 0)
    g_hi = tl.max(tl.where(has, grp, -1), 0)
    return sid, grp, g_lo, g_hi


@triton.jit(do_not_specialize=["has_prefix_index", "prefix_seqs"])
def _prefix_fwd_kernel(
    Q, K, V, PK, PV, OUT, LSE2, SEQ_IDS, CU_SEQLENS, PREFIX_INDEX,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,  # q/k/v: [T, H, D]
    stride_pkg, stride_pkp, stride_pkh, stride_pvg, stride_pvp, stride_pvh,  # pk/pv: [G, P, H, D]
    stride_ot, stride_oh,  # o: [T, H, D]; lse2: [H, T] fp32
    T, P, qk_scale_log2, has_prefix_index, prefix_seqs,  # has_prefix_index: 0 (all use prefix 0) or 1
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    offs_t = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    t_ok = offs_t < T
    rows = offs_t.to(tl.int64)
    q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=t_ok[:, None] & d_ok[None, :], other=0.0)
    sid, grp, g_lo, g_hi = _prefix_block_groups(SEQ_IDS, PREFIX_INDEX, offs_t, t_ok, has_prefix_index,
                                                  prefix_seqs)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Shared prefix keys: every row attends to all P keys of its own prefix.
    for g in range(g_lo, g_hi + 1):
        in_g = t_ok & (grp == g)
        # g is a loop counter (int32); G * P * H * D < 2**31 is checked by the launcher.
        pk_base = PK + (h * stride_pkh + g * stride_pkg)
        pv_base = PV + (h * stride_pvh + g * stride_pvg)
        for p0 in range(0, P, BLOCK_P):
            cols = p0 + offs_p
            p_ok = cols < P
            kt = tl.load(pk_base + cols[None, :] * stride_pkp + offs_d[:, None],
                         mask=p_ok[None, :] & d_ok[:, None], other=0.0)
            s = tl.dot(q, kt) * qk_scale_log2
            s = tl.where(in_g[:, None] & p_ok[None, :], s, float("-inf"))
            v = tl.load(pv_base + cols[:, None] * stride_pvp + offs_d[None, :],
                        mask=p_ok[:, None] & d_ok[None, :], other=0.0)
            acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, s, v)
    # Own suffix keys, causal: from the start of the first row's sequence to the last row.
    first = pid_m * BLOCK_M
    k_lo = tl.load(CU_SEQLENS + tl.load(SEQ_IDS + first))
    k_hi = tl.minimum(first + BLOCK_M, T)
    for n0 in range(k_lo, k_hi, BLOCK_N):
        cols = n0 + offs_n
        n_ok = cols < k_hi
        sid_k = tl.load(SEQ_IDS + cols, mask=n_ok, other=-1)
        kt = tl.load(K + cols.to(tl.int64)[None, :] * stride_kt + h * stride_kh + offs_d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, kt) * qk_scale_log2
        keep = (sid[:, None] == sid_k[None, :]) & (cols[None, :] <= offs_t[:, None]) & n_ok[None, :]
        s = tl.where(keep, s, float("-inf"))
        v = tl.load(V + cols.to(tl.int64)[:, None] * stride_vt + h * stride_vh + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, s, v)

    out, lse2 = finish_softmax(acc, m_i, l_i)
    tl.store(OUT + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=t_ok[:, None] & d_ok[None, :])
    tl.store(LSE2 + h * T + rows, lse2, mask=t_ok)


@triton.jit(do_not_specialize=["has_prefix_index", "prefix_seqs"])
def _prefix_bwd_dq_kernel(
    Q, K, V, PK, PV, O, DO, LSE2, DELTA, DQ, SEQ_IDS, CU_SEQLENS, PREFIX_INDEX,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_pkg, stride_pkp, stride_pkh, stride_pvg, stride_pvp, stride_pvh,
    stride_ot, stride_oh, stride_dot, stride_doh, stride_dqt, stride_dqh,
    T, P, qk_scale_log2, scale, has_prefix_index, prefix_seqs,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """dQ of BLOCK_M query rows of one head. It also writes those rows' delta = rowsum(dO * O) (fp32) to DELTA
    [H, T], which the key-gradient kernels launched after it read: each (row, head) belongs to one program, so no
    separate row-dot launch is needed."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    offs_t = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    t_ok = offs_t < T
    rows = offs_t.to(tl.int64)
    row_mask = t_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=row_mask, other=0.0)
    do = tl.load(DO + rows[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=row_mask, other=0.0)
    o = tl.load(O + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :], mask=row_mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + h * T + rows, delta, mask=t_ok)
    lse2 = tl.load(LSE2 + h * T + rows, mask=t_ok, other=0.0)
    sid, grp, g_lo, g_hi = _prefix_block_groups(SEQ_IDS, PREFIX_INDEX, offs_t, t_ok, has_prefix_index,
                                                  prefix_seqs)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for g in range(g_lo, g_hi + 1):
        in_g = t_ok & (grp == g)
        # g is a loop counter (int32); G * P * H * D < 2**31 is checked by the launcher.
        pk_base = PK + (h * stride_pkh + g * stride_pkg)
        pv_base = PV + (h * stride_pvh + g * stride_pvg)
        for p0 in range(0, P, BLOCK_P):
            cols = p0 + offs_p
            p_ok = cols < P
            kt = tl.load(pk_base + cols[None, :] * stride_pkp + offs_d[:, None],
                         mask=p_ok[None, :] & d_ok[:, None], other=0.0)
            vt = tl.load(pv_base + cols[None, :] * stride_pvp + offs_d[:, None],
                         mask=p_ok[None, :] & d_ok[:, None], other=0.0)
            s = tl.dot(q, kt) * qk_scale_log2
            p = tl.where(in_g[:, None] & p_ok[None, :], tl.math.exp2(s - lse2[:, None]), 0.0)
            ds = p * (tl.dot(do, vt) - delta[:, None])
            dq += tl.dot(ds.to(kt.dtype), tl.trans(kt))
    first = pid_m * BLOCK_M
    k_lo = tl.load(CU_SEQLENS + tl.load(SEQ_IDS + first))
    k_hi = tl.minimum(first + BLOCK_M, T)
    for n0 in range(k_lo, k_hi, BLOCK_N):
        cols = n0 + offs_n
        n_ok = cols < k_hi
        sid_k = tl.load(SEQ_IDS + cols, mask=n_ok, other=-1)
        kt = tl.load(K + cols.to(tl.int64)[None, :] * stride_kt + h * stride_kh + offs_d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        vt = tl.load(V + cols.to(tl.int64)[None, :] * stride_vt + h * stride_vh + offs_d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, kt) * qk_scale_log2
        keep = (sid[:, None] == sid_k[None, :]) & (cols[None, :] <= offs_t[:, None]) & n_ok[None, :] & t_ok[:, None]
        p = tl.where(keep, tl.math.exp2(s - lse2[:, None]), 0.0)
        ds = p * (tl.dot(do, vt) - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt))
    tl.store(DQ + rows[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=row_mask)


@triton.jit
def _prefix_bwd_dkdv_suffix_kernel(
    Q, K, V, DO, LSE2, DELTA, DK, DV, SEQ_IDS, CU_SEQLENS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dkt, stride_dkh,  # dk and dv share one contiguous layout
    T, qk_scale_log2, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    offs_k = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    k_ok = offs_k < T
    keys = offs_k.to(tl.int64)
    kv_mask = k_ok[:, None] & d_ok[None, :]
    k = tl.load(K + keys[:, None] * stride_kt + h * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + keys[:, None] * stride_vt + h * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
    sid_k = tl.load(SEQ_IDS + offs_k, mask=k_ok, other=-1)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # Queries that see these keys: from the first key to the end of the last key's sequence.
    first = pid_n * BLOCK_N
    last = tl.minimum(first + BLOCK_N, T) - 1
    q_hi = tl.load(CU_SEQLENS + tl.load(SEQ_IDS + last) + 1)
    for m0 in range(first, q_hi, BLOCK_M):
        cols = m0 + offs_m
        m_ok = cols < q_hi
        qrows = cols.to(tl.int64)
        sid_q = tl.load(SEQ_IDS + cols, mask=m_ok, other=-2)
        qt = tl.load(Q + qrows[None, :] * stride_qt + h * stride_qh + offs_d[:, None],
                     mask=m_ok[None, :] & d_ok[:, None], other=0.0)
        do = tl.load(DO + qrows[:, None] * stride_dot + h * stride_doh + offs_d[None, :],
                     mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        lse2 = tl.load(LSE2 + h * T + qrows, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + h * T + qrows, mask=m_ok, other=0.0)
        st = tl.dot(k, qt) * qk_scale_log2
        keep = (sid_k[:, None] == sid_q[None, :]) & (offs_k[:, None] <= cols[None, :]) & k_ok[:, None] & m_ok[None, :]
        pt = tl.where(keep, tl.math.exp2(st - lse2[None, :]), 0.0)
        dv += tl.dot(pt.to(do.dtype), do)
        dst = pt * (tl.dot(v, tl.trans(do)) - delta[None, :])
        dk += tl.dot(dst.to(qt.dtype), tl.trans(qt))
    out_off = keys[:, None] * stride_dkt + h * stride_dkh + offs_d[None, :]
    tl.store(DK + out_off, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit(do_not_specialize=["permuted", "row0", "lse_row"])
def _prefix_bwd_partial_kernel(
    Q, PK, PV, DO, LSE2, DELTA, PART_DK, PART_DV, TOKEN_ORDER, CHUNK_START, CHUNK_GROUP,
    stride_qt, stride_qh, stride_pkg, stride_pkp, stride_pkh, stride_pvg, stride_pvp, stride_pvh,
    stride_dot, stride_doh,  # partials: [n_chunks, H, P, D] fp32 contiguous
    H, P, qk_scale_log2, permuted,  # permuted: 1 if TOKEN_ORDER maps positions to tokens
    row0, lse_row,  # query token t is row row0 + t of q, do and of lse2/delta [H, lse_row]
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Stage 1 of prefix dK/dV: the contribution of one chunk of queries (positions
    CHUNK_START[c]..CHUNK_START[c+1] in prefix order, all using prefix CHUNK_GROUP[c])."""
    c = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    pid_p = tl.program_id(2)
    start = tl.load(CHUNK_START + c)
    end = tl.load(CHUNK_START + c + 1)
    g = tl.load(CHUNK_GROUP + c).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    p_ok = offs_p < P
    pmask = p_ok[:, None] & d_ok[None, :]
    pk = tl.load(PK + g * stride_pkg + h * stride_pkh + offs_p[:, None] * stride_pkp + offs_d[None, :],
                 mask=pmask, other=0.0)
    pv = tl.load(PV + g * stride_pvg + h * stride_pvh + offs_p[:, None] * stride_pvp + offs_d[None, :],
                 mask=pmask, other=0.0)
    dk = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
    for m0 in range(start, end, BLOCK_M):
        pos = m0 + offs_m
        m_ok = pos < end
        tok = tl.load(TOKEN_ORDER + pos, mask=m_ok & (permuted != 0), other=0)
        tok = tl.where(permuted != 0, tok, pos).to(tl.int64) + row0
        qt = tl.load(Q + tok[None, :] * stride_qt + h * stride_qh + offs_d[:, None],
                     mask=m_ok[None, :] & d_ok[:, None], other=0.0)
        do = tl.load(DO + tok[:, None] * stride_dot + h * stride_doh + offs_d[None, :],
                     mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        lse2 = tl.load(LSE2 + h * lse_row + tok, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + h * lse_row + tok, mask=m_ok, other=0.0)
        st = tl.dot(pk, qt) * qk_scale_log2  # [P, M]
        pt = tl.where(p_ok[:, None] & m_ok[None, :], tl.math.exp2(st - lse2[None, :]), 0.0)
        dv += tl.dot(pt.to(do.dtype), do)
        dst = pt * (tl.dot(pv, tl.trans(do)) - delta[None, :])
        dk += tl.dot(dst.to(qt.dtype), tl.trans(qt))
    out_off = ((c.to(tl.int64) * H + h) * P + offs_p[:, None]) * HEAD_DIM + offs_d[None, :]
    tl.store(PART_DK + out_off, dk, mask=pmask)
    tl.store(PART_DV + out_off, dv, mask=pmask)


@triton.jit(do_not_specialize=["accumulate"])
def _prefix_bwd_reduce_kernel(
    PART_DK, PART_DV, CHUNK_OFFSETS, DPK, DPV,  # dpk, dpv: [G, P, H, D], one layout, head_dim stride 1
    stride_dpg, stride_dpp, stride_dph,
    H, P, scale, accumulate,  # accumulate: 1 adds to what dpk/dpv hold (the prefix rows' own gradient)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, CHUNK_TILE: tl.constexpr,
):
    """Stage 2: prefix g's gradient = its chunks' partials, summed CHUNK_TILE chunks at a time
    (independent loads in flight) in chunk order: the same inputs give the same bits. With
    ``accumulate`` the sum is added in fp32 to the gradient already there and rounded once."""
    g = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    pid_p = tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    pmask = (offs_p < P)[:, None] & (offs_d < HEAD_DIM)[None, :]
    c_lo = tl.load(CHUNK_OFFSETS + g)
    c_hi = tl.load(CHUNK_OFFSETS + g + 1)
    dk = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
    offs_c = tl.arange(0, CHUNK_TILE)
    for c0 in range(c_lo, c_hi, CHUNK_TILE):
        c = c0 + offs_c
        off = (((c[:, None, None] * H + h) * P + offs_p[None, :, None]) * HEAD_DIM + offs_d[None, None, :])
        mask = (c < c_hi)[:, None, None] & pmask[None, :, :]
        dk += tl.sum(tl.load(PART_DK + off, mask=mask, other=0.0), 0)
        dv += tl.sum(tl.load(PART_DV + off, mask=mask, other=0.0), 0)
    out_off = g * stride_dpg + offs_p[:, None].to(tl.int64) * stride_dpp + h * stride_dph + offs_d[None, :]
    dk = dk * scale
    if accumulate != 0:
        dk += tl.load(DPK + out_off, mask=pmask, other=0.0).to(tl.float32)
        dv += tl.load(DPV + out_off, mask=pmask, other=0.0).to(tl.float32)
    tl.store(DPK + out_off, dk.to(DPK.dtype.element_ty), mask=pmask)
    tl.store(DPV + out_off, dv.to(DPV.dtype.element_ty), mask=pmask)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and padded head dim. Suffixes are short
# (mean ~4 tokens), so a 32-token block covers several sequences and its suffix key range is
# about two blocks of 32.
# The forward at BLOCK_D = 128 runs 16 x 16 tiles: at 32 x 32 some Triton release left 8 bytes of stack spill at
# head dim 80 whatever the warps and stages (3.6 on sm_90 with two stages, 3.8 on sm_80 with one; at 128-168
# registers, so not register pressure). 16 x 16 compiles clean on 3.6.0, 3.7.1 and 3.8.0 for sm_90 and sm_80.
# Head dims 80 and 128 are not ViT-B/16's (64); the tile's speed there is not measured.
_PREFIX_CONFIGS = {
    "fwd": {64: (32, 32, 4, 2), 128: (16, 16, 4, 2)},
    "dq": {64: (32, 32, 4, 2), 128: (32, 32, 4, 2)},
    "dkdv": {64: (32, 32, 4, 2), 128: (32, 32, 4, 2)},
    "partial": {64: (64, 0, 4, 2), 128: (32, 0, 4, 2)},
}
# Stage 2 (reduce): (CHUNK_TILE, num_warps) per padded head dim. Each step loads CHUNK_TILE x BLOCK_P x BLOCK_D fp32
# partials of dK and of dV; at BLOCK_D = 128 four warps held 128 registers a thread for those loads alone and Triton
# 3.6 spilled (255 registers, 40-48 bytes; 3.7 did not), so eight warps share the same bytes in flight.
_REDUCE_CONFIGS = {64: (4, 4), 128: (4, 8)}


def reduce_config(head_dim: int) -> tuple[int, int]:
    return _REDUCE_CONFIGS[block_d(head_dim)]


# Stage-1 chunks hold a multiple of BLOCK_M tokens; fewer, longer chunks mean fewer partials
# to store and reduce (stage 2 runs only G x H programs), more chunks mean more parallel
# stage-1 programs. Aim for about TARGET_PARTIAL_PROGRAMS stage-1 programs (~4 waves on a
# 132-SM GPU): the ImageNet text tower (T ~ 4,200, 8 heads) gets ~33 chunks of 128 tokens.
TARGET_PARTIAL_PROGRAMS = 512


def prefix_config(kernel: str, head_dim: int) -> tuple[int, int, int, int]:
    return _PREFIX_CONFIGS[kernel][block_d(head_dim)]


# Prefix keys are processed in blocks of BLOCK_P (tl.dot needs every block dimension >= 16):
# one block for MaPLe's 5 shared tokens, two for CoOp's 17; longer prefixes loop (forward, dQ)
# or spread over programs (prefix gradient). One size keeps the compiled variants few.
BLOCK_P = 16


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------


# Packing metadata derived from cu_seqlens/prefix_index (token -> sequence map, gradient plan),
# reused while those tensors are unchanged: a run's packing is fixed, so each layer and step
# would otherwise rebuild it with a dozen small launches. Keyed by identity and version counter,
# held by weak reference; never filled during CUDA graph capture (a captured allocation belongs
# to the graph's pool).
_METADATA_CACHE: dict[tuple, tuple] = {}
_METADATA_CACHE_SIZE = 64


def _memo(kind: str, tensors, extra: tuple, compute):
    # Plain loops, no comprehensions: this runs for every attention call (~5 per block and step).
    key, cuda = [kind, extra], False
    for t in tensors:
        if t is None:
            key.append(None)
            continue
        if t.is_inference():
            return compute()  # inference tensors carry no version counter
        key.append((id(t), t._version))
        cuda = cuda or t.is_cuda
    if torch.compiler.is_compiling():
        return compute()
    key = tuple(key)
    hit = _METADATA_CACHE.get(key)
    if hit is not None:
        alive = True
        for ref, t in zip(hit[0], tensors):
            if t is not None and ref() is not t:
                alive = False
                break
        if alive:
            return hit[1]
    value = compute()
    capturing = cuda and torch.cuda.is_current_stream_capturing()
    if not capturing:
        if len(_METADATA_CACHE) >= _METADATA_CACHE_SIZE:
            _METADATA_CACHE.pop(next(iter(_METADATA_CACHE)))
        _METADATA_CACHE[key] = ([weakref.ref(t) if t is not None else None for t in tensors], value)
    return value


def sequence_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """int32 [T]: the sequence each packed token belongs to (no host synchronisation)."""
    def compute():
        tokens = torch.arange(total, device=cu_seqlens.device, dtype=torch.int32)
        return torch.searchsorted(cu_seqlens[1:], tokens, right=True).to(torch.int32)

    return _memo("sequence_ids", (cu_seqlens,), (total,), compute)


def _check_prefix(q, k, v, cu_seqlens, prefix_k, prefix_v, prefix_index) -> None:
    for name, t, dims in (("q", q, 3), ("k", k, 3), ("v", v, 3), ("prefix_k", prefix_k, 4),
                          ("prefix_v", prefix_v, 4)):
        if t.dim() != dims:
            layout = "[tokens, heads, head_dim]" if dims == 3 else "[prefixes, prefix_len, heads, head_dim]"
            raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")
    check_same_dtype_device(q=q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v)
    check_head_dim_and_dtype("q", q)
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k and v must have one shape [T, H, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if prefix_k.shape != prefix_v.shape:
        raise ValueError(f"prefix_k {tuple(prefix_k.shape)} and prefix_v {tuple(prefix_v.shape)} "
                         "must have one shape")
    if prefix_k.shape[2:] != q.shape[1:]:
        raise ValueError(f"prefix_k {tuple(prefix_k.shape)} must match q {tuple(q.shape)} in heads "
                         "and head_dim")
    if prefix_k.shape[0] == 0:
        raise ValueError("prefix_k holds no prefix (G = 0); pass G >= 1 prefixes, with prefix_len 0 "
                         "for no prefix")
    if prefix_k.numel() >= 2**31:
        raise ValueError(f"prefix_k has {prefix_k.numel()} elements; the kernels index prefixes "
                         "with 32-bit offsets (fewer than 2**31 elements supported)")
    for name, t in (("cu_seqlens", cu_seqlens), ("prefix_index", prefix_index)):
        if t is None:
            continue
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
        if t.dim() != 1 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous 1-D tensor, got shape {tuple(t.shape)}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must hold S + 1 >= 2 offsets, got {cu_seqlens.numel()}")
    if prefix_index is not None and prefix_index.numel() != cu_seqlens.numel() - 1:
        raise ValueError(f"prefix_index has {prefix_index.numel()} entries but cu_seqlens describes "
                         f"{cu_seqlens.numel() - 1} sequences")


def _launch_forward(q, k, v, prefix_k, prefix_v, out, lse2, seq_ids, cu_seqlens, prefix_index, prefix_seqs, scale):
    T, H, D = q.shape
    bm, bn, warps, stages = prefix_config("fwd", D)
    launch(_prefix_fwd_kernel, (cdiv(T, bm), H),
        q, k, v, prefix_k, prefix_v, out, lse2, seq_ids, cu_seqlens,
        prefix_index if prefix_index is not None else seq_ids,  # not read without an index
        *q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *prefix_k.stride()[:3], *prefix_v.stride()[:3],
        *out.stride()[:2], T, prefix_k.shape[1], qk_scale_log2(scale), int(prefix_index is not None), prefix_seqs,
        HEAD_DIM=D, BLOCK_D=block_d(D), BLOCK_M=bm, BLOCK_N=bn, BLOCK_P=BLOCK_P,
        num_warps=warps, num_stages=stages,
    )


def prefix_attention_forward(q, k, v, cu_seqlens, prefix_k, prefix_v, prefix_index, *, scale):
    """Returns out [T, H, D] (contiguous, q's dtype) and lse2 [H, T] fp32 (base 2).

    ``cu_seqlens`` values (0 first, T last, strictly increasing) and ``prefix_index`` values
    (in [0, G)) are the caller's contract; ``fastprompt.ops`` validates them.
    """
    _check_prefix(q, k, v, cu_seqlens, prefix_k, prefix_v, prefix_index)
    T, H, D = q.shape
    out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    lse2 = torch.empty((H, T), dtype=torch.float32, device=q.device)
    if T == 0 or H == 0:
        return out, lse2
    _launch_forward(q, k, v, prefix_k, prefix_v, out, lse2, sequence_ids(cu_seqlens, T), cu_seqlens, prefix_index,
                    0, scale)
    return out, lse2


def prefix_grad_plan(cu_seqlens: torch.Tensor, prefix_index: torch.Tensor | None, num_prefixes: int,
                     total: int, chunk_len: int):
    """Chunks for the deterministic prefix-gradient reduction, built with device ops only.

    Tokens are taken in *prefix order* (sequences stably sorted by prefix id, tokens within a
    sequence in order), so each prefix owns one contiguous run of positions. Chunk boundaries
    are every multiple of ``chunk_len`` plus every run start, so no chunk spans two prefixes.
    Returns (token_order or None, chunk_start [n+1], chunk_group [n], chunk_offsets [G+1]), all
    int32; chunk_offsets[g]..chunk_offsets[g+1] are prefix g's chunks (possibly empty ones).
    """
    dev = cu_seqlens.device
    i64 = torch.int64
    if prefix_index is None:
        token_order = None
        run_start = torch.zeros(1, dtype=i64, device=dev)
    else:
        order = torch.argsort(prefix_index.to(i64), stable=True)
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(i64)
        sorted_cu = torch.zeros(order.numel() + 1, dtype=i64, device=dev)
        sorted_cu[1:] = torch.cumsum(lengths[order], 0)
        pos = torch.arange(total, device=dev, dtype=i64)
        slot = torch.searchsorted(sorted_cu[1:], pos, right=True)  # sorted sequence of each position
        token_order = (cu_seqlens.to(i64)[order[slot]] + pos - sorted_cu[slot]).to(torch.int32)
        first_seq = torch.searchsorted(prefix_index.to(i64)[order].contiguous(),
                                       torch.arange(num_prefixes, device=dev, dtype=i64))
        run_start = sorted_cu[first_seq]
    grid_starts = torch.arange(0, total, chunk_len, device=dev, dtype=i64)
    starts = torch.sort(torch.cat([grid_starts, run_start])).values
    chunk_start = torch.cat([starts, torch.full((1,), total, dtype=i64, device=dev)])
    if prefix_index is None:
        chunk_group = torch.zeros(starts.numel(), dtype=i64, device=dev)
    else:
        # Right-bisect: an empty prefix shares its start with the next one; the chunk belongs to
        # the last prefix starting there, the only one that can own tokens.
        chunk_group = (torch.searchsorted(run_start, starts, right=True) - 1).clamp_(min=0)
    chunk_offsets = torch.searchsorted(chunk_group, torch.arange(num_prefixes + 1, device=dev, dtype=i64))
    chunk_start, chunk_group, chunk_offsets = (t.to(torch.int32).contiguous()
                                               for t in (chunk_start, chunk_group, chunk_offsets))
    return token_order, chunk_start, chunk_group, chunk_offsets


def _check_backward_args(grad_out, q, out, lse2, rows: int) -> None:
    check_same_dtype_device(q=q, grad_out=grad_out, out=out)
    if grad_out.shape != out.shape or out.shape != (rows, *q.shape[1:]):
        raise ValueError(f"grad_out {tuple(grad_out.shape)} and out {tuple(out.shape)} must both be "
                         f"[{rows}, {q.shape[1]}, {q.shape[2]}]")
    H = q.shape[1]
    if lse2.shape != (H, rows) or lse2.dtype != torch.float32 or not lse2.is_contiguous():
        raise ValueError(f"lse2 must be a contiguous fp32 [H, T] = {(H, rows)} tensor, got "
                         f"{tuple(lse2.shape)} {lse2.dtype}")


def _launch_dq_dkdv(grad_out, q, k, v, prefix_k, prefix_v, out, lse2, dq, dk, dv, seq_ids, cu_seqlens,
                    prefix_index, prefix_seqs, scale):
    """dQ (prefix and own keys) and the own-sequence dK/dV of every token: the rows of a prefix sequence
    (prefix_seqs > 0) get here the gradient of their own causal attention, not yet what later sequences add.
    Returns delta = rowsum(dO * O) [H, T] fp32, written by the dQ kernel, for the prefix-gradient kernels."""
    T, H, D = q.shape
    P = prefix_k.shape[1]
    delta = torch.empty((H, T), dtype=torch.float32, device=q.device)
    meta = dict(HEAD_DIM=D, BLOCK_D=block_d(D))
    scale2 = qk_scale_log2(scale)
    suffix_strides = (*q.stride()[:2], *k.stride()[:2], *v.stride()[:2])
    bm, bn, warps, stages = prefix_config("dq", D)
    launch(_prefix_bwd_dq_kernel, (cdiv(T, bm), H),
        q, k, v, prefix_k, prefix_v, out, grad_out, lse2, delta, dq, seq_ids, cu_seqlens,
        prefix_index if prefix_index is not None else seq_ids,  # not read without an index
        *suffix_strides, *prefix_k.stride()[:3], *prefix_v.stride()[:3], *out.stride()[:2], *grad_out.stride()[:2],
        *dq.stride()[:2],
        T, P, scale2, scale, int(prefix_index is not None), prefix_seqs,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_P=BLOCK_P, num_warps=warps, num_stages=stages, **meta,
    )
    bm, bn, warps, stages = prefix_config("dkdv", D)
    launch(_prefix_bwd_dkdv_suffix_kernel, (cdiv(T, bn), H),
        q, k, v, grad_out, lse2, delta, dk, dv, seq_ids, cu_seqlens,
        *suffix_strides, *grad_out.stride()[:2], *dk.stride()[:2], T, scale2, scale,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **meta,
    )
    return delta


def _launch_prefix_gradient(grad_out, q, prefix_k, prefix_v, lse2, delta, dpk, dpv, cu_seqlens, prefix_index,
                            *, row0: int, tokens: int, accumulate: bool, scale):
    """What the `tokens` queries at rows row0.. (their sequences described by cu_seqlens/prefix_index) give the
    prefix keys and values, written to dpk/dpv [G, P, H, D] (added to what they hold with `accumulate`)."""
    H, D = q.shape[1:]
    G, P = prefix_k.shape[:2]
    meta = dict(HEAD_DIM=D, BLOCK_D=block_d(D))
    bm, _, warps, stages = prefix_config("partial", D)
    p_blocks = cdiv(P, BLOCK_P)
    chunk_blocks = max(1, cdiv(cdiv(tokens, bm) * H * p_blocks, TARGET_PARTIAL_PROGRAMS))
    token_order, chunk_start, chunk_group, chunk_offsets = _memo(
        "prefix_grad_plan", (cu_seqlens, prefix_index), (G, tokens, chunk_blocks * bm),
        lambda: prefix_grad_plan(cu_seqlens, prefix_index, G, tokens, chunk_blocks * bm))
    n_chunks = chunk_group.numel()
    part_dk = torch.empty((n_chunks, H, P, D), dtype=torch.float32, device=q.device)
    part_dv = torch.empty_like(part_dk)
    launch(_prefix_bwd_partial_kernel, (n_chunks, H, p_blocks),
        q, prefix_k, prefix_v, grad_out, lse2, delta, part_dk, part_dv,
        token_order if token_order is not None else chunk_start,  # not read when not permuted
        chunk_start, chunk_group,
        *q.stride()[:2], *prefix_k.stride()[:3], *prefix_v.stride()[:3], *grad_out.stride()[:2],
        H, P, qk_scale_log2(scale), int(token_order is not None), row0, lse2.shape[1],
        BLOCK_M=bm, BLOCK_P=BLOCK_P, num_warps=warps, num_stages=stages, **meta,
    )
    if dpk.stride() != dpv.stride():
        raise ValueError("the prefix gradients dpk and dpv must share one layout")
    chunk_tile, reduce_warps = reduce_config(D)
    launch(_prefix_bwd_reduce_kernel, (G, H, p_blocks),
        part_dk, part_dv, chunk_offsets, dpk, dpv, *dpk.stride()[:3], H, P, scale, int(accumulate),
        BLOCK_P=BLOCK_P, CHUNK_TILE=chunk_tile, num_warps=reduce_warps, **meta,
    )


def prefix_attention_backward(grad_out, q, k, v, out, lse2, cu_seqlens, prefix_k, prefix_v,
                              prefix_index, *, scale):
    """Returns dq, dk, dv [T, H, D] and d_prefix_k, d_prefix_v [G, P, H, D] (inputs' dtype)."""
    _check_prefix(q, k, v, cu_seqlens, prefix_k, prefix_v, prefix_index)
    T, H, D = q.shape
    _check_backward_args(grad_out, q, out, lse2, T)
    G, P = prefix_k.shape[:2]
    dq = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    dv = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    dpk = torch.empty((G, P, H, D), dtype=q.dtype, device=q.device)
    dpv = torch.empty((G, P, H, D), dtype=q.dtype, device=q.device)
    if T == 0 or H == 0:
        return dq, dk, dv, dpk.zero_(), dpv.zero_()
    delta = _launch_dq_dkdv(grad_out, q, k, v, prefix_k, prefix_v, out, lse2, dq, dk, dv,
                            sequence_ids(cu_seqlens, T), cu_seqlens, prefix_index, 0, scale)
    if P > 0:
        _launch_prefix_gradient(grad_out, q, prefix_k, prefix_v, lse2, delta, dpk, dpv, cu_seqlens, prefix_index,
                                row0=0, tokens=T, accumulate=False, scale=scale)
    return dq, dk, dv, dpk, dpv


# ----------------------------------------------------------------------------------------------
# The text tower's whole stream: the prefixes' own attention and the suffixes' in one problem
# ----------------------------------------------------------------------------------------------
# The packed text stream is [G * P + T] rows: G prefixes of P rows each, then the T suffix tokens. A prefix row
# attends causally within its prefix; a suffix token attends to its prefix and causally within its sequence.
# Both are one varlen problem over the stream: the G prefixes are its first G sequences (with no prefix of their
# own, `prefix_seqs`), the suffix sequences follow, and the prefix keys are rows of the stream's own k and v.
# q, k, v come as one [N, 3, H, D] tensor (the in-projection's output, no copy) and the backward writes one
# [N, 3, H, D] gradient: no split of the stream, no separate prefix attention, no sum of the prefix keys' two
# gradients and no stack of dq, dk, dv. The prefix rows' key gradient from the later tokens is reduced
# deterministically as in the standalone op, then added to their own in fp32 (one rounding).


def _check_stream(qkv, cu_seqlens, prefix_index, groups: int, prefix_len: int) -> int:
    if qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"qkv must be [rows, 3, heads, head_dim], got shape {tuple(qkv.shape)}")
    if qkv.stride(-1) != 1:
        raise ValueError("qkv must have unit stride in head_dim")
    check_head_dim_and_dtype("qkv", qkv)
    if groups < 1 or prefix_len < 0:
        raise ValueError(f"need groups >= 1 and prefix_len >= 0, got {groups} and {prefix_len}")
    tokens = qkv.shape[0] - groups * prefix_len
    if tokens < 0:
        raise ValueError(f"qkv has {qkv.shape[0]} rows, fewer than the {groups} x {prefix_len} prefix rows")
    if groups * prefix_len * qkv.stride(0) >= 2**31:
        raise ValueError(f"{groups} prefixes of {prefix_len} rows span {groups * prefix_len * qkv.stride(0)} "
                         "elements; the kernels index prefixes with 32-bit offsets (fewer than 2**31 supported)")
    for name, t in (("cu_seqlens", cu_seqlens), ("prefix_index", prefix_index)):
        if t is None:
            continue
        if t.dtype != torch.int32 or t.dim() != 1 or not t.is_contiguous() or t.device != qkv.device:
            raise ValueError(f"{name} must be a contiguous 1-D int32 tensor on {qkv.device}, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must hold S + 1 >= 2 offsets, got {cu_seqlens.numel()}")
    if prefix_index is not None and prefix_index.numel() != cu_seqlens.numel() - 1:
        raise ValueError(f"prefix_index has {prefix_index.numel()} entries but cu_seqlens describes "
                         f"{cu_seqlens.numel() - 1} sequences")
    return tokens


def stream_cu_seqlens(cu_seqlens: torch.Tensor, groups: int, prefix_len: int) -> torch.Tensor:
    """int32 [G + S + 1]: the stream's sequence offsets, the G prefixes first (device ops, no synchronisation)."""
    def compute():
        prefix = torch.arange(0, groups * prefix_len, prefix_len, dtype=torch.int32, device=cu_seqlens.device)
        return torch.cat([prefix, cu_seqlens + groups * prefix_len])

    if prefix_len == 0:
        return cu_seqlens
    return _memo("stream_cu_seqlens", (cu_seqlens,), (groups, prefix_len), compute)


def _stream_views(qkv, groups: int, prefix_len: int):
    """q, k, v [N, H, D] and the prefix keys and values [G, P, H, D] (the stream's first G * P rows), all views of
    qkv [N, 3, H, D]. The prefix views are one as_strided each, not a slice and a view: each is a dispatched op,
    and a step makes this call three times per text block."""
    q, k, v = qkv.unbind(1)
    row, head, dim = k.stride()
    shape, strides = (groups, prefix_len) + tuple(k.shape[1:]), (prefix_len * row, row, head, dim)
    return q, k, v, k.as_strided(shape, strides), v.as_strided(shape, strides)


def stream_attention_forward(qkv, cu_seqlens, prefix_index, groups: int, prefix_len: int, *, scale):
    """out [N, H, D] and lse2 [H, N] fp32 of the stream qkv [N = G * P + T, 3, H, D]; cu_seqlens [S + 1] and
    prefix_index [S] (or None: every sequence uses prefix 0) describe the T suffix tokens."""
    _check_stream(qkv, cu_seqlens, prefix_index, groups, prefix_len)
    N, _, H, D = qkv.shape
    out = torch.empty((N, H, D), dtype=qkv.dtype, device=qkv.device)
    lse2 = torch.empty((H, N), dtype=torch.float32, device=qkv.device)
    if N == 0 or H == 0:
        return out, lse2
    cu = stream_cu_seqlens(cu_seqlens, groups, prefix_len)
    q, k, v, pk, pv = _stream_views(qkv, groups, prefix_len)
    _launch_forward(q, k, v, pk, pv, out, lse2, sequence_ids(cu, N), cu, prefix_index,
                    groups if prefix_len else 0, scale)
    return out, lse2


def stream_attention_backward(grad_out, qkv, out, lse2, cu_seqlens, prefix_index, groups: int, prefix_len: int,
                              *, scale):
    """d(qkv) [N, 3, H, D] for ``stream_attention_forward``."""
    tokens = _check_stream(qkv, cu_seqlens, prefix_index, groups, prefix_len)
    N, _, H, D = qkv.shape
    q, k, v, pk, pv = _stream_views(qkv, groups, prefix_len)
    _check_backward_args(grad_out, q, out, lse2, N)
    dqkv = torch.empty((N, 3, H, D), dtype=qkv.dtype, device=qkv.device)
    if N == 0 or H == 0:
        return dqkv.zero_()
    dq, dk, dv, dpk, dpv = _stream_views(dqkv, groups, prefix_len)
    cu = stream_cu_seqlens(cu_seqlens, groups, prefix_len)
    delta = _launch_dq_dkdv(grad_out, q, k, v, pk, pv, out, lse2, dq, dk, dv, sequence_ids(cu, N), cu, prefix_index,
                            groups if prefix_len else 0, scale)
    if prefix_len > 0 and tokens > 0:
        _launch_prefix_gradient(grad_out, q, pk, pv, lse2, delta, dpk, dpv, cu_seqlens, prefix_index,
                                row0=groups * prefix_len, tokens=tokens, accumulate=True, scale=scale)
    return dqkv


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (fastprompt.kernels.aot)
# ----------------------------------------------------------------------------------------------


def _aot_specs():
    from fastprompt.kernels.aot import TRITON_DTYPE, AotSpec

    from .attention import GPU_DTYPES, SUPPORTED_HEAD_DIMS, aot_signature

    specs = []
    for dtype in GPU_DTYPES:
        for head_dim in SUPPORTED_HEAD_DIMS:
            base = {"HEAD_DIM": head_dim, "BLOCK_D": block_d(head_dim), "BLOCK_P": BLOCK_P}
            chunk_tile, reduce_warps = reduce_config(head_dim)
            variants = [("reduce", _prefix_bwd_reduce_kernel, {"CHUNK_TILE": chunk_tile}, reduce_warps, 1)]
            for kernel, fn in (("fwd", _prefix_fwd_kernel), ("dq", _prefix_bwd_dq_kernel),
                               ("dkdv", _prefix_bwd_dkdv_suffix_kernel), ("partial", _prefix_bwd_partial_kernel)):
                bm, bn, warps, stages = prefix_config(kernel, head_dim)
                variants.append((kernel, fn, {"BLOCK_M": bm, "BLOCK_N": bn}, warps, stages))
            for label, fn, extra, warps, stages in variants:
                constexprs = {k: v for k, v in {**base, **extra}.items() if k in fn.arg_names}
                signature, aligned = aot_signature(fn, dtype, constexprs)
                # 32-token blocks (sequences are a few tokens long) are below wgmma's 64 rows.
                specs.append(AotSpec(
                    name=f"prefix_attention_{label}[{TRITON_DTYPE[dtype]},D={head_dim}]", fn=fn,
                    signature=signature, constexprs=constexprs, num_warps=warps, num_stages=stages,
                    divisible_by_16=aligned, hot=True,
                ))
    return specs


# Every configuration the launchers can pick on a GPU: dtype x head dim x kernel.
AOT_SPECS = _aot_specs()
