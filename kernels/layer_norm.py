"""LayerNorm over the last dimension, with an optional fused residual add (Triton).

Semantics are open_clip's ``LayerNormFp32``: the input is upcast to fp32, mean and variance
(biased) are computed in fp32, the affine transform is applied in fp32 and the result is cast
back to the input's dtype. Weight and bias may be fp32 while x is bf16/fp16.

With a residual (the pre-LN block's ``x + attn`` followed by LN2) the kernel writes
``s = x + residual`` rounded to x's dtype -- exactly what ``x + attn`` gives in PyTorch -- and
normalises that rounded ``s``. The backward adds the gradient that reaches ``s`` directly
(through the residual stream) to the gradient coming through the normalisation.

Layout: a row is the last dimension and must be contiguous; rows may have any stride. One
program normalises one row held entirely in registers (``BLOCK_D = next_pow2(d)``, at least
512), so the widest supported row is ``MAX_WIDTH``.

Backward: dx always, from the fp32 mean/rstd saved by the forward. dW/dB only when asked
(a frozen CLIP never needs them): each program walks a fixed, strided set of rows and
accumulates fp32 partial sums, written to a ``[programs, d]`` buffer that the host reduces
with ``torch.sum`` -- deterministic, unlike atomics.

The residual and parameter-gradient switches are runtime integers, not constexprs: each is
one uniform branch per launch (no divergence, a few registers at most: see the aot table),
while every constexpr value would double the variants the GPU JIT-compiles at start-up and
``fastprompt.kernels.aot`` compiles and checks.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._launch import launch
from ._host import check_same_device, next_power_of_2

# Widest supported row: CLIP towers go up to 1664 (ViT-bigG); each power-of-two block up to
# here is one more kernel variant to compile and check ahead of time.
MAX_WIDTH = 2048
_MIN_BLOCK = 512
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def layer_norm_fwd_kernel(
    x_ptr,  # [rows, d] input, row stride stride_x
    res_ptr,  # [rows, d] residual (read only when has_residual)
    w_ptr,  # [d] weight
    b_ptr,  # [d] bias
    y_ptr,  # [rows, d] output, x's dtype, row stride stride_y
    sum_ptr,  # [rows, d] x + residual in x's dtype (written only when has_residual)
    mean_ptr,  # [rows] fp32
    rstd_ptr,  # [rows] fp32
    new_ptr,  # splice rows, x's dtype (read only when splice_len > 0)
    d,
    stride_x,
    stride_res,
    stride_y,
    stride_sum,
    stride_new_group,  # 0: one set of splice rows shared by every group
    stride_new_row,
    eps,
    has_residual,
    splice_rows,  # rows [0, splice_rows) are groups of splice_period rows ...
    splice_period,
    splice_start,  # ... whose rows [splice_start, splice_start + splice_len) come from new_ptr
    splice_len,
    BLOCK_D: tl.constexpr,
):
    row = tl.cast(tl.program_id(0), tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < d
    pos = row % splice_period
    spliced = (splice_len > 0) & (row < splice_rows) & (pos >= splice_start) & (pos < splice_start + splice_len)
    if spliced:
        # A spliced row: the prompt token replaces the stream's row (x + residual is not formed).
        src = new_ptr + (row // splice_period) * stride_new_group + (pos - splice_start) * stride_new_row
        x = tl.load(src + cols, mask=mask, other=0.0)
        tl.store(sum_ptr + row * stride_sum + cols, x, mask=mask)
    else:
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if has_residual:
            r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
            # Round the sum to the I/O dtype first: the residual stream PyTorch carries is rounded.
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
            tl.store(sum_ptr + row * stride_sum + cols, x, mask=mask)
    xf = x.to(tl.float32)
    mean = tl.sum(xf, axis=0) / d
    centered = tl.where(mask, xf - mean, 0.0)
    var = tl.sum(centered * centered, axis=0) / d
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = centered * rstd * w + b
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def layer_norm_bwd_kernel(
    dy_ptr,  # [rows, d] upstream gradient of the normalised output
    x_ptr,  # [rows, d] the normalised input (x, or x + residual)
    w_ptr,  # [d] weight
    mean_ptr,  # [rows] fp32
    rstd_ptr,  # [rows] fp32
    dsum_ptr,  # [rows, d] gradient reaching x + residual directly (read when has_dsum)
    dx_ptr,  # [rows, d] output, x's dtype
    dw_part_ptr,  # [programs, d] fp32 partial dW (written when param_grads)
    db_part_ptr,  # [programs, d] fp32 partial dB (written when param_grads)
    dnew_ptr,  # [groups, splice_len, d] gradient of the splice rows (written when splice_len > 0)
    rows,
    d,
    stride_dy,
    stride_x,
    stride_dsum,
    stride_dx,
    has_dsum,
    param_grads,
    splice_rows,  # as in the forward: spliced rows send their gradient to dnew and none to dx
    splice_period,
    splice_start,
    splice_len,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < d
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    # Fixed strided row sets per program keep the partial sums' order deterministic.
    for row_i32 in range(pid, rows, programs):
        row = tl.cast(row_i32, tl.int64)
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        wdy = w * dy
        c1 = tl.sum(xhat * wdy, axis=0) / d
        c2 = tl.sum(wdy, axis=0) / d
        dx = (wdy - (xhat * c1 + c2)) * rstd
        if has_dsum:
            dx += tl.load(dsum_ptr + row * stride_dsum + cols, mask=mask, other=0.0).to(tl.float32)
        pos = row % splice_period
        spliced = (splice_len > 0) & (row < splice_rows) & (pos >= splice_start) & (pos < splice_start + splice_len)
        if spliced:
            group = row // splice_period
            dnew = dnew_ptr + ((group * splice_len + pos - splice_start) * d)
            tl.store(dnew + cols, dx.to(dnew_ptr.dtype.element_ty), mask=mask)
            dx = tl.zeros((BLOCK_D,), dtype=tl.float32)
        tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if param_grads:
            dw_acc += dy * xhat
            db_acc += dy
    if param_grads:
        tl.store(dw_part_ptr + pid * d + cols, dw_acc, mask=mask)
        tl.store(db_part_ptr + pid * d + cols, db_acc, mask=mask)


@functools.lru_cache(maxsize=None)  # a few widths per model; a cache hit costs no Python call
def layer_norm_config(d: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps) the launchers use for rows of width d."""
    block = max(_MIN_BLOCK, next_power_of_2(d))
    num_warps = 4 if block <= 1024 else 8
    return block, num_warps


def _uses_interpreter() -> bool:
    return not isinstance(layer_norm_fwd_kernel, triton.runtime.JITFunction)


def _require_kernel_device(device: torch.device) -> None:
    if device.type == "cuda" or (device.type == "cpu" and _uses_interpreter()):
        return
    raise ValueError(
        f"layer_norm: the Triton kernel runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1), "
        f"got device {device}"
    )


def _check_rows(name: str, t: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> None:
    if t.dim() != 2 or tuple(t.shape) != shape:
        raise ValueError(f"layer_norm: {name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"layer_norm: {name} must have dtype {dtype}, got {t.dtype}")
    if t.stride(1) != 1 and shape[1] > 1:
        raise ValueError(f"layer_norm: the last dimension of {name} must be contiguous (stride 1)")


def check_forward_args(x, weight, bias, residual=None) -> None:
    """Validate the forward's arguments (also used by the ops' fake implementations)."""
    if x.dim() != 2:
        raise ValueError(f"layer_norm: the launcher takes x as [rows, d], got shape {list(x.shape)}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"layer_norm: x must be float32, float16 or bfloat16, got {x.dtype}")
    rows, d = x.shape
    if d < 1 or d > MAX_WIDTH:
        raise ValueError(f"layer_norm: the normalised width must be in [1, {MAX_WIDTH}], got {d}")
    _check_rows("x", x, (rows, d), x.dtype)
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            raise ValueError(f"layer_norm: {name} is required (an affine LayerNorm)")
        if p.shape != (d,):
            raise ValueError(f"layer_norm: {name} must have shape [{d}], got {list(p.shape)}")
        if p.dtype not in (torch.float32, x.dtype):
            raise ValueError(
                f"layer_norm: {name} must be float32 or x's dtype {x.dtype}, got {p.dtype}"
            )
        if not p.is_contiguous():
            raise ValueError(f"layer_norm: {name} must be contiguous")
    if bias.dtype != weight.dtype:
        raise ValueError(f"layer_norm: weight and bias must share a dtype, got {weight.dtype} and {bias.dtype}")
    tensors = {"x": x, "weight": weight, "bias": bias}
    if residual is not None:
        _check_rows("residual", residual, (rows, d), x.dtype)
        tensors["residual"] = residual
    check_same_device("layer_norm", tensors)


def check_splice(x, new, period: int, start: int) -> None:
    """A splice: new [groups, n, d] (its group stride may be 0: one set shared by every group) replaces rows
    [start, start + n) of each of the first `groups` groups of `period` rows of x [rows, d]."""
    if new.dim() != 3 or new.shape[2] != x.shape[1]:
        raise ValueError(f"layer_norm: splice rows must be [groups, n, {x.shape[1]}], got {list(new.shape)}")
    if new.dtype != x.dtype or new.device != x.device:
        raise ValueError(f"layer_norm: splice rows must be {x.dtype} on {x.device}, got {new.dtype} on {new.device}")
    if new.stride(2) != 1 and new.shape[2] > 1:
        raise ValueError("layer_norm: the last dimension of the splice rows must be contiguous (stride 1)")
    groups, n = new.shape[:2]
    if period < 1 or start < 0 or start + n > period or groups * period > x.shape[0]:
        raise ValueError(f"layer_norm: a splice of {n} rows at {start} in {groups} groups of {period} rows does not "
                         f"fit x's {x.shape[0]} rows")


def layer_norm_forward(x, weight, bias, eps: float, residual=None, splice=None):
    """LayerNorm of the rows of x (or of x + residual).

    ``splice = (new, period, start)``: rows [start, start + n) of each of the first ``new.shape[0]`` groups of
    ``period`` rows are ``new`` instead of x + residual (a prompt splice fused into the add; needs a residual).
    Returns (y, s, mean, rstd): y in x's dtype, s = x + residual, spliced (None without a residual),
    mean and rstd as fp32 [rows].
    """
    check_forward_args(x, weight, bias, residual)
    _require_kernel_device(x.device)
    rows, d = x.shape
    y = torch.empty_like(x)
    mean = torch.empty(rows, device=x.device, dtype=torch.float32)
    rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
    s = torch.empty_like(x) if residual is not None else None
    if splice is not None:
        if residual is None:
            raise ValueError("layer_norm: a splice needs a residual (it replaces rows of x + residual)")
        new, period, start = splice
        check_splice(x, new, period, start)
        groups, n = new.shape[:2]
        splice_args = (new.stride(0) if groups > 1 else 0, new.stride(1), groups * period, period, start, n)
    else:
        new, splice_args = x, (0, 0, 0, 1, 0, 0)
    if rows == 0:
        return y, s, mean, rstd
    block, num_warps = layer_norm_config(d)
    res = residual if residual is not None else x
    sum_out = s if s is not None else y
    stride_new_group, stride_new_row, *splice_rows = splice_args
    launch(layer_norm_fwd_kernel, (rows,),
        x, res, weight, bias, y, sum_out, mean, rstd, new,
        d, x.stride(0), res.stride(0), y.stride(0), sum_out.stride(0), stride_new_group, stride_new_row,
        float(eps), int(residual is not None), *splice_rows,
        BLOCK_D=block, num_warps=num_warps,
    )  # fmt: skip
    return y, s, mean, rstd


def _backward_programs(device: torch.device, rows: int) -> int:
    # Fixed per device, so the partial-sum grouping (and the result) is reproducible.
    if device.type == "cuda":
        return max(1, min(rows, 8 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(rows, 8))


def layer_norm_backward(dy, x, weight, mean, rstd, d_sum=None, param_grads: bool = False, splice=None):
    """Gradients of y = LayerNorm(x) (x being x + residual in the fused form).

    d_sum is the gradient reaching x directly (the residual stream); it is added to dx.
    ``splice = (groups, n, period, start)`` as in the forward: the spliced rows' gradient goes to dnew
    [groups, n, d] and dx is zero there.
    Returns (dx, dw, db), or (dx, dw, db, dnew) with a splice; dw and db are None unless param_grads, else fp32 [d].
    """
    if x.dim() != 2:
        raise ValueError(f"layer_norm: the launcher takes x as [rows, d], got shape {list(x.shape)}")
    rows, d = x.shape
    if weight.shape != (d,):
        raise ValueError(f"layer_norm: weight must have shape [{d}], got {list(weight.shape)}")
    _check_rows("dy", dy, (rows, d), x.dtype)
    _check_rows("x", x, (rows, d), x.dtype)
    for name, stat in (("mean", mean), ("rstd", rstd)):
        if stat.shape != (rows,) or stat.dtype != torch.float32 or not stat.is_contiguous():
            raise ValueError(f"layer_norm: {name} must be a contiguous float32 [{rows}] tensor")
    tensors = {"dy": dy, "x": x, "weight": weight, "mean": mean, "rstd": rstd}
    if d_sum is not None:
        _check_rows("d_sum", d_sum, (rows, d), x.dtype)
        tensors["d_sum"] = d_sum
    check_same_device("layer_norm", tensors)
    _require_kernel_device(x.device)

    dx = torch.empty_like(x)
    if splice is not None:
        groups, n, period, start = splice
        if period < 1 or start < 0 or start + n > period or groups * period > rows:
            raise ValueError(f"layer_norm: a splice of {n} rows at {start} in {groups} groups of {period} rows does "
                             f"not fit {rows} rows")
        dnew = torch.empty((groups, n, d), device=x.device, dtype=x.dtype)
        splice_args = (groups * period, period, start, n)
    else:
        dnew, splice_args = dx, (0, 1, 0, 0)
    programs = _backward_programs(x.device, rows)
    if param_grads:
        dw_part = torch.empty((programs, d), device=x.device, dtype=torch.float32)
        db_part = torch.empty((programs, d), device=x.device, dtype=torch.float32)
    else:
        dw_part = db_part = mean  # never written
    if rows > 0:
        block, num_warps = layer_norm_config(d)
        dsum = d_sum if d_sum is not None else dy
        launch(layer_norm_bwd_kernel, (programs,),
            dy, x, weight, mean, rstd, dsum, dx, dw_part, db_part, dnew,
            rows, d, dy.stride(0), x.stride(0), dsum.stride(0), dx.stride(0),
            int(d_sum is not None), int(param_grads), *splice_args,
            BLOCK_D=block, num_warps=num_warps,
        )  # fmt: skip
    if not param_grads:
        grads = (dx, None, None)
    elif rows == 0:
        grads = (dx, torch.zeros(d, device=x.device), torch.zeros(d, device=x.device))
    else:
        grads = (dx, dw_part.sum(0), db_part.sum(0))
    return grads if splice is None else (*grads, dnew)


def _aot_specs():
    from fastprompt.kernels.aot import TRITON_DTYPE, AotSpec

    specs = []
    blocks = [_MIN_BLOCK << i for i in range((next_power_of_2(MAX_WIDTH) // _MIN_BLOCK).bit_length())]
    for x_dtype in _SUPPORTED_DTYPES:
        x = TRITON_DTYPE[x_dtype]
        for w in sorted({x, "fp32"}):
            for block in blocks:
                num_warps = layer_norm_config(block)[1]
                fwd = {
                    "x_ptr": f"*{x}", "res_ptr": f"*{x}", "w_ptr": f"*{w}", "b_ptr": f"*{w}",
                    "y_ptr": f"*{x}", "sum_ptr": f"*{x}", "mean_ptr": "*fp32", "rstd_ptr": "*fp32",
                    "new_ptr": f"*{x}", "d": "i32", "stride_x": "i32", "stride_res": "i32", "stride_y": "i32",
                    "stride_sum": "i32", "stride_new_group": "i32", "stride_new_row": "i32", "eps": "fp32",
                    "has_residual": "i32", "splice_rows": "i32", "splice_period": "i32", "splice_start": "i32",
                    "splice_len": "i32",
                }  # fmt: skip
                bwd = {
                    "dy_ptr": f"*{x}", "x_ptr": f"*{x}", "w_ptr": f"*{w}", "mean_ptr": "*fp32",
                    "rstd_ptr": "*fp32", "dsum_ptr": f"*{x}", "dx_ptr": f"*{x}", "dw_part_ptr": "*fp32",
                    "db_part_ptr": "*fp32", "dnew_ptr": f"*{x}", "rows": "i32", "d": "i32", "stride_dy": "i32",
                    "stride_x": "i32", "stride_dsum": "i32", "stride_dx": "i32", "has_dsum": "i32",
                    "param_grads": "i32", "splice_rows": "i32", "splice_period": "i32", "splice_start": "i32",
                    "splice_len": "i32",
                }  # fmt: skip
                for kind, fn, sig in (("fwd", layer_norm_fwd_kernel, fwd), ("bwd", layer_norm_bwd_kernel, bwd)):
                    # The splice's strides may be 0 (one shared set) and its row counts anything: not aligned.
                    aligned = tuple(a for a in sig if a.endswith("_ptr") or (a.startswith("stride") and "new" not in a)
                                    or a == "d")
                    specs.append(
                        AotSpec(
                            name=f"layer_norm_{kind}[x={x},w={w},BLOCK_D={block}]",
                            fn=fn, signature=sig, constexprs={"BLOCK_D": block},
                            num_warps=num_warps, num_stages=1, divisible_by_16=aligned, hot=True,
                        )  # fmt: skip
                    )
    return specs


# Every configuration the launchers can pick: x dtype x weight dtype x BLOCK_D, forward and backward.
AOT_SPECS = _aot_specs()
