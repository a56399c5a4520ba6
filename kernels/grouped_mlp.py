"""Grouped small MLPs: every prompted layer's coupling Linear or PMS bottleneck in one launch.

Prompt methods map each prompted layer's few prompt tokens through that layer's own small
network (MaPLe/MPL couplings: Linear(512 -> 768); MCPL-CLIP's PMS: Linear -> ReLU -> Linear
with hidden 128/256). Launched one by one these are 2-4 tiny GEMMs per layer and direction;
here the G layers' networks are stacked and each direction is one launch.

grouped_linear:       y[g] = x[g] @ W[g]^T + b[g]                x [G, n, din], W [G, dout, din]
grouped_bottleneck:   y[g] = relu(x[g] @ W1[g]^T + b1[g]) @ W2[g]^T + b2[g]
                      W1 [G, h, din], b1 [G, h], W2 [G, dout, h], b2 [G, dout]

The backward computes the input gradient and the weight and bias gradients (these networks
train). Every output element is reduced by exactly one program in a fixed order, so results
are deterministic without atomics or partial buffers:

* grouped_linear backward: program (g, column block j of din) computes dx[g][:, j] (loop over
  dout) and dW[g][:, j] (loop over dout blocks, each reducing over the rows); the programs
  with j == 0 also write db[g].
* bottleneck: one program per group runs the small GEMMs in sequence, chunk by chunk. The
  forward writes the hidden activation h (an output, saved for the backward: G x n x h values)
  and, after a CTA barrier, reads it back for the second layer; the backward writes the
  pre-activation gradient to a scratch buffer the same way before reducing dx over it. Holding
  a whole [16, hidden] tile in registers instead spills in fp32, whose FMA dots keep a full K
  row of each operand per thread.

Rows are tiled by 16 (tl.dot's minimum): grouped_linear loops over row tiles, the bottleneck
takes n <= 16 tokens (PMS uses 2). Dots with 16-row tiles are below wgmma's 64-row minimum and
compile to mma.sync on sm_90 (the [64, 16] x [16, 64] weight-gradient dots may use wgmma), so
the AOT specs do not require wgmma. fp32 operands use full-fp32 products ("ieee").

All tensors must be contiguous and share one dtype (tl.dot takes operands of one dtype); the
gradients are returned in that dtype, accumulated in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch
from ._host import cdiv, check_same_device

from fastprompt.kernels.linear_act import require_kernel_device

BLOCK_ROWS = 16
MAX_BOTTLENECK_TOKENS = 16
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _load_tile(base, rows, cols, row_stride, row_mask, col_mask):
    """The [rows, cols] tile of a row-major matrix at base; masked elements read as 0."""
    mask = row_mask[:, None] & col_mask[None, :]
    return tl.load(base + rows[:, None] * row_stride + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_tile(base, rows, cols, row_stride, row_mask, col_mask, value):
    """Store an fp32 tile into the [rows, cols] tile of a row-major matrix, in its dtype."""
    mask = row_mask[:, None] & col_mask[None, :]
    tl.store(base + rows[:, None] * row_stride + cols[None, :], value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def grouped_linear_fwd_kernel(
    x_ptr,  # [G, n, din]
    w_ptr,  # [G, dout, din]
    b_ptr,  # [G, dout]
    y_ptr,  # [G, n, dout]
    n,
    din,
    dout,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    g = tl.cast(tl.program_id(0), tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n
    mask_n = offs_n < dout
    x_base = x_ptr + g * n * din
    w_base = w_ptr + g * dout * din
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, din, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask_k = ks < din
        x = _load_tile(x_base, offs_m, ks, din, mask_m, mask_k)
        w = _load_tile(w_base, offs_n, ks, din, mask_n, mask_k)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=INPUT_PRECISION)
    acc += tl.load(b_ptr + g * dout + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    _store_tile(y_ptr + g * n * dout, offs_m, offs_n, dout, mask_m, mask_n, acc)


@triton.jit
def grouped_linear_bwd_kernel(
    dy_ptr,  # [G, n, dout]
    x_ptr,  # [G, n, din]
    w_ptr,  # [G, dout, din]
    dx_ptr,  # [G, n, din]
    dw_ptr,  # [G, dout, din]
    db_ptr,  # [G, dout]
    n,
    din,
    dout,
    BLOCK_M: tl.constexpr,
    BLOCK_OUT: tl.constexpr,
    BLOCK_IN: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    g = tl.cast(tl.program_id(0), tl.int64)
    pid_in = tl.program_id(1)
    offs_in = pid_in * BLOCK_IN + tl.arange(0, BLOCK_IN)
    mask_in = offs_in < din
    dy_base = dy_ptr + g * n * dout
    x_base = x_ptr + g * n * din
    w_base = w_ptr + g * dout * din

    # dx[:, in-block] = dy @ W[:, in-block], one row block at a time.
    for m0 in range(0, n, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < n
        acc = tl.zeros((BLOCK_M, BLOCK_IN), dtype=tl.float32)
        for o0 in range(0, dout, BLOCK_OUT):
            offs_o = o0 + tl.arange(0, BLOCK_OUT)
            mask_o = offs_o < dout
            dy = _load_tile(dy_base, offs_m, offs_o, dout, mask_m, mask_o)
            w = _load_tile(w_base, offs_o, offs_in, din, mask_o, mask_in)
            acc = tl.dot(dy, w, acc, input_precision=INPUT_PRECISION)
        _store_tile(dx_ptr + g * n * din, offs_m, offs_in, din, mask_m, mask_in, acc)

    # dW[out-block, in-block] = dy[:, out-block]^T @ x[:, in-block]; db from the first column block.
    for o0 in range(0, dout, BLOCK_OUT):
        offs_o = o0 + tl.arange(0, BLOCK_OUT)
        mask_o = offs_o < dout
        dw = tl.zeros((BLOCK_OUT, BLOCK_IN), dtype=tl.float32)
        db = tl.zeros((BLOCK_OUT,), dtype=tl.float32)
        for m0 in range(0, n, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < n
            dy = _load_tile(dy_base, offs_m, offs_o, dout, mask_m, mask_o)
            x = _load_tile(x_base, offs_m, offs_in, din, mask_m, mask_in)
            dw = tl.dot(tl.trans(dy), x, dw, input_precision=INPUT_PRECISION)
            db += tl.sum(dy.to(tl.float32), axis=0)
        _store_tile(dw_ptr + g * dout * din, offs_o, offs_in, din, mask_o, mask_in, dw)
        if pid_in == 0:
            tl.store(db_ptr + g * dout + offs_o, db.to(db_ptr.dtype.element_ty), mask=mask_o)


@triton.jit
def grouped_bottleneck_fwd_kernel(
    x_ptr,  # [G, n, din]
    w1_ptr,  # [G, h, din]
    b1_ptr,  # [G, h]
    w2_ptr,  # [G, dout, h]
    b2_ptr,  # [G, dout]
    h_ptr,  # [G, n, h] output: the hidden activation, saved for the backward
    y_ptr,  # [G, n, dout]
    n,
    din,
    hidden,
    dout,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    g = tl.cast(tl.program_id(0), tl.int64)
    rows = tl.arange(0, BLOCK_M)
    mask_m = rows < n
    x_base = x_ptr + g * n * din
    w1_base = w1_ptr + g * hidden * din
    w2_base = w2_ptr + g * dout * hidden
    h_base = h_ptr + g * n * hidden

    # Phase 1: h = relu(x W1^T + b1), one hidden chunk at a time, rounded to the I/O dtype as
    # PyTorch's first Linear + ReLU hands it on.
    for h0 in range(0, hidden, BLOCK_C):
        hs = h0 + tl.arange(0, BLOCK_C)
        mask_h = hs < hidden
        pre = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        for k0 in range(0, din, BLOCK_C):
            ks = k0 + tl.arange(0, BLOCK_C)
            mask_k = ks < din
            x = _load_tile(x_base, rows, ks, din, mask_m, mask_k)
            w1 = _load_tile(w1_base, hs, ks, din, mask_h, mask_k)
            pre = tl.dot(x, tl.trans(w1), pre, input_precision=INPUT_PRECISION)
        pre += tl.load(b1_ptr + g * hidden + hs, mask=mask_h, other=0.0).to(tl.float32)[None, :]
        _store_tile(h_base, rows, hs, hidden, mask_m, mask_h, tl.maximum(pre, 0.0))
    # Phase 2 reads h written by other threads of this program.
    tl.debug_barrier()

    # Phase 2: y = h W2^T + b2, one output chunk at a time.
    for o0 in range(0, dout, BLOCK_C):
        outs = o0 + tl.arange(0, BLOCK_C)
        mask_o = outs < dout
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        for h0 in range(0, hidden, BLOCK_C):
            hs = h0 + tl.arange(0, BLOCK_C)
            mask_h = hs < hidden
            h = _load_tile(h_base, rows, hs, hidden, mask_m, mask_h)
            w2 = _load_tile(w2_base, outs, hs, hidden, mask_o, mask_h)
            acc = tl.dot(h, tl.trans(w2), acc, input_precision=INPUT_PRECISION)
        acc += tl.load(b2_ptr + g * dout + outs, mask=mask_o, other=0.0).to(tl.float32)[None, :]
        _store_tile(y_ptr + g * n * dout, rows, outs, dout, mask_m, mask_o, acc)


@triton.jit
def grouped_bottleneck_bwd_kernel(
    dy_ptr,  # [G, n, dout]
    x_ptr,  # [G, n, din]
    h_ptr,  # [G, n, h] the forward's hidden activation
    w1_ptr,  # [G, h, din]
    w2_ptr,  # [G, dout, h]
    dpre_ptr,  # [G, n, h] scratch: gradient of the pre-activation, I/O dtype
    dx_ptr,  # [G, n, din]
    dw1_ptr,  # [G, h, din]
    db1_ptr,  # [G, h]
    dw2_ptr,  # [G, dout, h]
    db2_ptr,  # [G, dout]
    n,
    din,
    hidden,
    dout,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    g = tl.cast(tl.program_id(0), tl.int64)
    rows = tl.arange(0, BLOCK_M)
    mask_m = rows < n
    io_dtype = x_ptr.dtype.element_ty
    dy_base = dy_ptr + g * n * dout
    x_base = x_ptr + g * n * din
    h_base = h_ptr + g * n * hidden
    w1_base = w1_ptr + g * hidden * din
    w2_base = w2_ptr + g * dout * hidden
    dpre_base = dpre_ptr + g * n * hidden

    # db2 = sum of dy over the rows (rows past n load as 0).
    for o0 in range(0, dout, BLOCK_C):
        outs = o0 + tl.arange(0, BLOCK_C)
        mask_o = outs < dout
        dy = _load_tile(dy_base, rows, outs, dout, mask_m, mask_o)
        tl.store(db2_ptr + g * dout + outs, tl.sum(dy.to(tl.float32), axis=0).to(db2_ptr.dtype.element_ty), mask=mask_o)

    # Per hidden chunk: dW2 = dy^T h, dh = dy W2, d_pre = dh * relu'(.), db1, dW1 = d_pre^T x.
    for h0 in range(0, hidden, BLOCK_C):
        hs = h0 + tl.arange(0, BLOCK_C)
        mask_h = hs < hidden
        h = _load_tile(h_base, rows, hs, hidden, mask_m, mask_h)
        dh = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        for o0 in range(0, dout, BLOCK_C):
            outs = o0 + tl.arange(0, BLOCK_C)
            mask_o = outs < dout
            dy = _load_tile(dy_base, rows, outs, dout, mask_m, mask_o)
            w2 = _load_tile(w2_base, outs, hs, hidden, mask_o, mask_h)
            dh = tl.dot(dy, w2, dh, input_precision=INPUT_PRECISION)
            dw2 = tl.dot(tl.trans(dy), h, input_precision=INPUT_PRECISION)
            _store_tile(dw2_ptr + g * dout * hidden, outs, hs, hidden, mask_o, mask_h, dw2)
        # dh is rounded to the I/O dtype as PyTorch's gradient would be; the ReLU mask comes from
        # its output h, as PyTorch's ReLU backward takes it.
        d_pre = tl.where(h > 0.0, dh.to(io_dtype).to(tl.float32), 0.0)
        tl.store(db1_ptr + g * hidden + hs, tl.sum(d_pre, axis=0).to(db1_ptr.dtype.element_ty), mask=mask_h)
        d_pre = d_pre.to(io_dtype)
        _store_tile(dpre_base, rows, hs, hidden, mask_m, mask_h, d_pre)
        for k0 in range(0, din, BLOCK_C):
            ks = k0 + tl.arange(0, BLOCK_C)
            mask_k = ks < din
            x = _load_tile(x_base, rows, ks, din, mask_m, mask_k)
            dw1 = tl.dot(tl.trans(d_pre), x, input_precision=INPUT_PRECISION)
            _store_tile(dw1_ptr + g * hidden * din, hs, ks, din, mask_h, mask_k, dw1)
    # The dx pass reads d_pre chunks written by other threads of this program.
    tl.debug_barrier()

    # dx = d_pre W1, reduced over the hidden chunks in a fixed order.
    for k0 in range(0, din, BLOCK_C):
        ks = k0 + tl.arange(0, BLOCK_C)
        mask_k = ks < din
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        for h0 in range(0, hidden, BLOCK_C):
            hs = h0 + tl.arange(0, BLOCK_C)
            mask_h = hs < hidden
            d_pre = _load_tile(dpre_base, rows, hs, hidden, mask_m, mask_h)
            w1 = _load_tile(w1_base, hs, ks, din, mask_h, mask_k)
            acc = tl.dot(d_pre, w1, acc, input_precision=INPUT_PRECISION)
        _store_tile(dx_ptr + g * n * din, rows, ks, din, mask_m, mask_k, acc)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # ignored for 16-bit operands


def grouped_config(dtype: torch.dtype) -> dict:
    """Tiles of the grouped kernels: 16 rows, and column/reduction chunks per dtype.

    On the GPU, fp32 FMA dots hold a whole reduction chunk of each operand per thread, so fp32
    takes 16-wide chunks; 16-bit operands go through mma and take 64. The interpreter (fp32
    only) runs 64-wide chunks: it pays per loop iteration, and the chunk width changes only
    trip counts of the same loops (the tests use widths above 64 to cover several chunks and
    a masked tail); the GPU's fp32 configuration is compiled and checked by aot.
    """
    chunk = 16 if dtype == torch.float32 and not _uses_interpreter() else 64
    return dict(BLOCK_M=BLOCK_ROWS, BLOCK_C=chunk, num_warps=4)


def _uses_interpreter() -> bool:
    return not isinstance(grouped_linear_fwd_kernel, triton.runtime.JITFunction)


def _check_stack(op: str, named: dict, shapes: dict) -> None:
    """Every tensor contiguous, of one supported dtype, with the expected shape."""
    dtype = next(iter(named.values())).dtype
    if dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"{op}: tensors must be float32, float16 or bfloat16, got {dtype}")
    for name, t in named.items():
        if tuple(t.shape) != shapes[name]:
            raise ValueError(f"{op}: {name} must have shape {list(shapes[name])}, got {list(t.shape)}")
        if t.dtype != dtype:
            dtypes = {k: v.dtype for k, v in named.items()}
            raise ValueError(f"{op}: all tensors must share one dtype (tl.dot needs it), got {dtypes}")
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous")
    check_same_device(op, named)


def check_grouped_linear_args(x, weight, bias=None, dy=None) -> None:
    """Validate grouped_linear's arguments (the backward passes dy and no bias).

    Also used by the ops' fake implementations.
    """
    if x.dim() != 3 or weight.dim() != 3:
        raise ValueError(
            f"grouped_linear: expected x [G, n, din] and weight [G, dout, din]; got "
            f"{list(x.shape)} and {list(weight.shape)}"
        )
    groups, n, din = x.shape
    dout = weight.shape[1]
    if min(groups, n, din, dout) < 1:
        raise ValueError(
            f"grouped_linear: every dimension must be non-empty, got x {list(x.shape)}, weight {list(weight.shape)}"
        )
    named = {"x": x, "weight": weight}
    shapes = {"x": (groups, n, din), "weight": (groups, dout, din)}
    if bias is not None:
        named["bias"], shapes["bias"] = bias, (groups, dout)
    if dy is not None:
        named["dy"], shapes["dy"] = dy, (groups, n, dout)
    _check_stack("grouped_linear", named, shapes)


def check_grouped_bottleneck_args(x, w1, b1=None, w2=None, b2=None, dy=None, h=None) -> None:
    """Validate grouped_bottleneck_mlp's arguments (the backward passes dy and h, no biases).

    Also used by the ops' fake implementations.
    """
    if x.dim() != 3 or w1.dim() != 3 or w2.dim() != 3:
        raise ValueError(
            "grouped_bottleneck_mlp: expected x [G, n, din], w1 [G, h, din], w2 [G, dout, h]; got "
            f"{list(x.shape)}, {list(w1.shape)}, {list(w2.shape)}"
        )
    groups, n, din = x.shape
    hidden, dout = w1.shape[1], w2.shape[1]
    if min(groups, n, din, hidden, dout) < 1:
        raise ValueError(
            f"grouped_bottleneck_mlp: every dimension must be non-empty, got x {list(x.shape)}, "
            f"w1 {list(w1.shape)}, w2 {list(w2.shape)}"
        )
    if n > MAX_BOTTLENECK_TOKENS:
        raise ValueError(
            f"grouped_bottleneck_mlp: at most {MAX_BOTTLENECK_TOKENS} tokens per group (one row "
            f"tile), got n={n}"
        )
    named = {"x": x, "w1": w1, "w2": w2}
    shapes = {"x": (groups, n, din), "w1": (groups, hidden, din), "w2": (groups, dout, hidden)}
    optional = (
        ("b1", b1, (groups, hidden)),
        ("b2", b2, (groups, dout)),
        ("dy", dy, (groups, n, dout)),
        ("h", h, (groups, n, hidden)),
    )
    for name, t, shape in optional:
        if t is not None:
            named[name], shapes[name] = t, shape
    _check_stack("grouped_bottleneck_mlp", named, shapes)


def grouped_linear_forward(x, weight, bias):
    """y[g] = x[g] @ weight[g]^T + bias[g] for all groups in one launch."""
    check_grouped_linear_args(x, weight, bias)
    require_kernel_device("grouped_linear", x.device)
    groups, n, din = x.shape
    dout = weight.shape[1]
    y = torch.empty((groups, n, dout), device=x.device, dtype=x.dtype)
    cfg = grouped_config(x.dtype)
    grid = (groups, cdiv(dout, cfg["BLOCK_C"]), cdiv(n, cfg["BLOCK_M"]))
    launch(grouped_linear_fwd_kernel, grid,
        x, weight, bias, y, n, din, dout,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_C"], BLOCK_K=cfg["BLOCK_C"],
        INPUT_PRECISION=_precision(x.dtype), num_warps=cfg["num_warps"],
    )  # fmt: skip
    return y


def grouped_linear_backward(dy, x, weight):
    """(dx, dweight, dbias) of grouped_linear for all groups in one launch."""
    check_grouped_linear_args(x, weight, dy=dy)
    require_kernel_device("grouped_linear", x.device)
    groups, n, din = x.shape
    dout = weight.shape[1]
    dx = torch.empty_like(x)
    dw = torch.empty_like(weight)
    db = torch.empty((groups, dout), device=x.device, dtype=x.dtype)
    cfg = grouped_config(x.dtype)
    grid = (groups, cdiv(din, cfg["BLOCK_C"]))
    launch(grouped_linear_bwd_kernel, grid,
        dy, x, weight, dx, dw, db, n, din, dout,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_OUT=cfg["BLOCK_C"], BLOCK_IN=cfg["BLOCK_C"],
        INPUT_PRECISION=_precision(x.dtype), num_warps=cfg["num_warps"],
    )  # fmt: skip
    return dx, dw, db


def grouped_bottleneck_forward(x, w1, b1, w2, b2):
    """(y, h): y[g] = relu(x[g] @ w1[g]^T + b1[g]) @ w2[g]^T + b2[g] in one launch; h is the
    hidden activation [G, n, hidden] the backward needs."""
    check_grouped_bottleneck_args(x, w1, b1, w2, b2)
    require_kernel_device("grouped_bottleneck_mlp", x.device)
    groups, n, din = x.shape
    hidden, dout = w1.shape[1], w2.shape[1]
    h = torch.empty((groups, n, hidden), device=x.device, dtype=x.dtype)
    y = torch.empty((groups, n, dout), device=x.device, dtype=x.dtype)
    launch(grouped_bottleneck_fwd_kernel, (groups,),
        x, w1, b1, w2, b2, h, y, n, din, hidden, dout, INPUT_PRECISION=_precision(x.dtype), **grouped_config(x.dtype)
    )
    return y, h


def grouped_bottleneck_backward(dy, x, h, w1, w2):
    """(dx, dw1, db1, dw2, db2) of grouped_bottleneck for all groups in one launch."""
    check_grouped_bottleneck_args(x, w1, w2=w2, dy=dy, h=h)
    require_kernel_device("grouped_bottleneck_mlp", x.device)
    groups, n, din = x.shape
    hidden, dout = w1.shape[1], w2.shape[1]
    dpre = torch.empty_like(h)
    dx, dw1, dw2 = torch.empty_like(x), torch.empty_like(w1), torch.empty_like(w2)
    db1 = torch.empty((groups, hidden), device=x.device, dtype=x.dtype)
    db2 = torch.empty((groups, dout), device=x.device, dtype=x.dtype)
    launch(grouped_bottleneck_bwd_kernel, (groups,),
        dy, x, h, w1, w2, dpre, dx, dw1, db1, dw2, db2, n, din, hidden, dout,
        INPUT_PRECISION=_precision(x.dtype), **grouped_config(x.dtype),
    )  # fmt: skip
    return dx, dw1, db1, dw2, db2


def _aot_specs():
    from fastprompt.kernels.aot import TRITON_DTYPE, AotSpec

    specs = []
    sizes = {"n": "i32", "din": "i32", "dout": "i32"}
    bottleneck_sizes = {"n": "i32", "din": "i32", "hidden": "i32", "dout": "i32"}
    kernels = (
        ("grouped_linear_fwd", grouped_linear_fwd_kernel, ("x", "w", "b", "y"), sizes,
         lambda c: {"BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_C"], "BLOCK_K": c["BLOCK_C"]}),
        ("grouped_linear_bwd", grouped_linear_bwd_kernel, ("dy", "x", "w", "dx", "dw", "db"), sizes,
         lambda c: {"BLOCK_M": c["BLOCK_M"], "BLOCK_OUT": c["BLOCK_C"], "BLOCK_IN": c["BLOCK_C"]}),
        ("grouped_bottleneck_fwd", grouped_bottleneck_fwd_kernel, ("x", "w1", "b1", "w2", "b2", "h", "y"),
         bottleneck_sizes, lambda c: {"BLOCK_M": c["BLOCK_M"], "BLOCK_C": c["BLOCK_C"]}),
        ("grouped_bottleneck_bwd", grouped_bottleneck_bwd_kernel,
         ("dy", "x", "h", "w1", "w2", "dpre", "dx", "dw1", "db1", "dw2", "db2"),
         bottleneck_sizes, lambda c: {"BLOCK_M": c["BLOCK_M"], "BLOCK_C": c["BLOCK_C"]}),
    )  # fmt: skip
    for dtype in _SUPPORTED_DTYPES:
        t = TRITON_DTYPE[dtype]
        cfg = grouped_config(dtype)
        for name, fn, pointers, size_args, tiles in kernels:
            sig = {f"{p}_ptr": f"*{t}" for p in pointers} | size_args
            specs.append(
                AotSpec(
                    name=f"{name}[{t}]", fn=fn, signature=sig,
                    constexprs={**tiles(cfg), "INPUT_PRECISION": _precision(dtype)},
                    num_warps=cfg["num_warps"], num_stages=2,
                    divisible_by_16=tuple(a for a in sig if a.endswith("_ptr") or a in ("din", "hidden", "dout")),
                    hot=True,
                )  # fmt: skip
            )
    return specs


# Every configuration the launchers can pick: one per kernel and dtype (wgmma not required:
# see the module docstring).
AOT_SPECS = _aot_specs()
