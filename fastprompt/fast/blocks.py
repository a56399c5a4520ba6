"""A residual attention block's computation, split into the pieces the fast paths need.

`BlockKernels` says which implementation each piece uses: 'triton' (fastprompt's kernels: LayerNorm with
fp32 statistics, fused bias+GELU MLP that saves only its input, flash-style attention) or 'torch' (the same
math in PyTorch ops); the attention backend comes from fastprompt.ops.backends ('auto', 'triton',
'xformers', 'sdpa', 'eager'). Every piece reads the block's own parameters at call time (no copies), so
`model.half()`, `.to()`, `load_state_dict` keep working on a patched model.

Under autocast the GEMM inputs are cast to the autocast dtype here, explicitly, because custom ops are
not autocast-aware; LayerNorm and softmax statistics stay in fp32 either way.

With the Triton kernels in eager mode, a block whose weights are all frozen runs everything but its attention as
two autograd nodes (fastprompt.ops.frozen_block; runs_frozen_halves says when): the same kernels in the same order,
less host time per block. Traced or compiled, the op-by-op composition below is what torch.compile sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..backbone import _gelu_kind


@dataclass(frozen=True)
class BlockKernels:
    norm_mlp: str = "torch"  # 'triton' | 'torch'
    attention: str = "auto"  # fastprompt.ops.backends name or 'auto'
    mlp_gemm: str = "triton"  # the frozen MLP's first GEMM with the Triton kernels: 'triton' | 'cublas' (ops.mlp)


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


def layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm, kernels: BlockKernels) -> torch.Tensor:
    """open_clip LayerNorm / LayerNormFp32: statistics in fp32, result in the input's dtype."""
    if kernels.norm_mlp == "triton":
        from ..ops.layer_norm import layer_norm as triton_layer_norm

        return triton_layer_norm(x, norm.weight, norm.bias, norm.eps)
    stats = torch.promote_types(x.dtype, torch.float32)  # fp32 statistics; float64 stays float64
    with torch.autocast(x.device.type, enabled=False):
        out = F.layer_norm(x.to(stats), norm.normalized_shape, norm.weight.to(stats), norm.bias.to(stats), norm.eps)
    return out.to(x.dtype)


def fuses_splices(kernels: BlockKernels) -> bool:
    """Whether a prompt splice that replaces as many rows as it removes can run inside the next block's first
    LayerNorm (add_layer_norm's `splice`): with the Triton kernels."""
    return kernels.norm_mlp == "triton"


def add_layer_norm(x: torch.Tensor, branch: torch.Tensor, norm: torch.nn.LayerNorm,
                   kernels: BlockKernels, splice=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + branch, LayerNorm(x + branch)): the residual add and the next LayerNorm. With the Triton kernels one
    fused pass (the sum is rounded to x's dtype exactly as the separate add rounds it), which also saves the add's
    launch forward and the gradient's accumulation launch backward.

    `splice = (new, period, start)` (Triton kernels only, see fuses_splices): rows [start, start + n) of each of the
    first G groups of `period` rows of the sum are new [G, n, d] instead, in the same pass: a deep prompt entering
    the block without a separate add, cat and their backward."""
    branch = branch.to(x.dtype)
    if kernels.norm_mlp == "triton":
        from ..ops.layer_norm import layer_norm as triton_layer_norm
        from ..ops.layer_norm import layer_norm_spliced

        if splice is not None:
            new, period, start = splice
            normed, summed = layer_norm_spliced(branch, x, new.to(x.dtype), norm.weight, norm.bias, norm.eps,
                                                period, start)
            return summed, normed
        normed, summed = triton_layer_norm(branch, norm.weight, norm.bias, norm.eps, residual=x)
        return summed, normed
    if splice is not None:
        raise ValueError("a splice fused into the LayerNorm needs the Triton kernels")
    x = x + branch
    return x, layer_norm(x, norm, kernels)


def linear(x: torch.Tensor, layer) -> torch.Tensor:
    weight, bias = (layer.weight, layer.bias) if hasattr(layer, "weight") else layer
    dtype = _compute_dtype(x, weight)
    return F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))


def split_heads(out: torch.Tensor, heads: int) -> torch.Tensor:
    """[..., 3 * width] -> [..., 3, heads, head_dim], a view (Tensor.unflatten is a Python method: host time per
    call)."""
    *leading, width = out.shape
    return out.view(*leading, 3, heads, width // (3 * heads))


def _heads(out: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return split_heads(out, heads).unbind(-3)


def qkv(block, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One GEMM for q, k, v; each returned as [..., L, H, hd] (no transposes)."""
    attn = block.attn
    return _heads(linear(h, (attn.in_proj_weight, attn.in_proj_bias)), attn.num_heads)


def qkv_rows(block, h: torch.Tensor) -> torch.Tensor:
    """One GEMM for q, k, v of a [N, D] stream, viewed [N, 3, H, hd] (no copy): the packed text attention takes it
    whole and gives back one gradient."""
    attn = block.attn
    return split_heads(linear(h, (attn.in_proj_weight, attn.in_proj_bias)), attn.num_heads)


def attention_out(block, o: torch.Tensor) -> torch.Tensor:
    """Heads merged and the output projection: [..., L, H, hd] -> [..., L, D]."""
    return linear(o.flatten(-2), block.attn.out_proj)


def mlp(block, h: torch.Tensor, kernels: BlockKernels) -> torch.Tensor:
    fc, proj = block.mlp.c_fc, block.mlp.c_proj
    act = _gelu_kind(block.mlp.gelu)
    if kernels.norm_mlp == "triton":
        from ..ops.mlp import frozen_mlp

        dtype = _compute_dtype(h, fc.weight)
        cast = [t.to(dtype) for t in (h, fc.weight, fc.bias, proj.weight, proj.bias)]
        return frozen_mlp(*cast, activation=act, gemm=kernels.mlp_gemm)
    return linear(block.mlp.gelu(linear(h, fc)), proj)


def dense_attention(q, k, v, causal: bool, kernels: BlockKernels) -> torch.Tensor:
    from ..ops.attention import attention

    return attention(q, k, v, causal=causal, backend=kernels.attention)


def block_forward(block, x: torch.Tensor, causal: bool, kernels: BlockKernels) -> torch.Tensor:
    """x + attn(LN1 x); then + MLP(LN2 .), for a dense [B, L, D] sequence (LayerScale honoured)."""
    x, branch = block_forward_pending(block, x, None, causal, kernels)
    return x + branch.to(x.dtype)


def frozen_tensors(block, mlp_gemm: str):
    """The block's weights as fastprompt.ops.frozen_block takes them, read now (no copies): (ln_1 w, b, eps,
    in_proj w, b, out_proj w, b, ln_2 w, b, eps, c_fc w, b, c_proj w, b, activation, the MLP's GEMM plan
    `mlp_gemm`). Read through the modules'
    own dicts: each `module.attr` of a submodule or parameter is a Python call (nn.Module.__getattr__), ~30 per
    block per step otherwise."""
    modules = block._modules
    ln1, ln2, attn, mlp_ = modules["ln_1"], modules["ln_2"], modules["attn"], modules["mlp"]
    ap, out = attn._parameters, attn._modules["out_proj"]._parameters
    fc, proj = mlp_._modules["c_fc"]._parameters, mlp_._modules["c_proj"]._parameters
    l1, l2 = ln1._parameters, ln2._parameters
    return (l1["weight"], l1["bias"], ln1.eps, ap["in_proj_weight"], ap["in_proj_bias"], out["weight"], out["bias"],
            l2["weight"], l2["bias"], ln2.eps, fc["weight"], fc["bias"], proj["weight"], proj["bias"],
            _gelu_kind(mlp_._modules["gelu"]), mlp_gemm)


_TENSOR_SLOTS = (0, 1, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13)  # positions of tensors in frozen_tensors' tuple
_GEMM_SLOTS = (3, 4, 5, 6, 10, 11, 12, 13)  # the GEMM weights and biases: x's dtype, or a cast would be needed


def runs_frozen_halves(block, x: torch.Tensor, pending: torch.Tensor | None, kernels: BlockKernels):
    """The block's frozen_tensors when it runs as fastprompt.ops.frozen_block's two autograd nodes around its
    attention (the same kernels and results as the op-by-op path, less host time), else None: Triton kernels in
    eager mode, no LayerScale, no weight that wants a gradient, and nothing to cast (x, the GEMM weights and any
    autocast dtype agree). With or without a pending branch (a tower's first block has none)."""
    if kernels.norm_mlp != "triton":
        return None
    from ..ops._library import direct_call_ok

    modules = block._modules
    if type(modules["ls_1"]) is not torch.nn.Identity or type(modules["ls_2"]) is not torch.nn.Identity:
        return None
    if not direct_call_ok(x):
        return None
    weights = frozen_tensors(block, kernels.mlp_gemm)
    dtype, grad = x.dtype, torch.is_grad_enabled()
    for slot in _TENSOR_SLOTS:
        t = weights[slot]
        if t is None or (grad and t.requires_grad):
            return None
    for slot in _GEMM_SLOTS:
        if weights[slot].dtype != dtype:
            return None
    if torch.is_autocast_enabled(x.device.type) and torch.get_autocast_dtype(x.device.type) != dtype:
        return None
    return weights


def pre_attention(weights, x: torch.Tensor, pending: torch.Tensor | None,
                  splice=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + pending with `splice` in, its LN1 through the qkv GEMM [..., 3 * width]) as one node; `weights` from
    runs_frozen_halves. Without a pending branch: (x, LN1(x) through the GEMM)."""
    from ..ops.frozen_block import pre_attention as fused

    dtype = x.dtype
    if pending is not None and pending.dtype != dtype:
        pending = pending.to(dtype)
    if splice is not None and splice[0].dtype != dtype:
        splice = (splice[0].to(dtype),) + tuple(splice[1:])
    return fused(weights, x, pending, splice)


def post_attention(weights, x: torch.Tensor, o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + out_proj(o), the MLP branch of its LN2, not added) as one node; o is [..., heads, head_dim]."""
    from ..ops.frozen_block import post_attention as fused

    return fused(weights, x, o)


def block_forward_pending(block, x: torch.Tensor, pending: torch.Tensor | None, causal: bool,
                          kernels: BlockKernels, splice=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One block whose input is x + pending (pending: the previous block's MLP branch, not added yet, or None).
    That add runs fused into LN1 (add_layer_norm), saving a launch forward and the gradient accumulation's launch
    backward per block; so does a prompt splice of the input (`splice`, see add_layer_norm; needs a pending
    branch). Returns (x + attention branch, this block's MLP branch, not added)."""
    weights, x, q, k, v = _to_heads(block, x, pending, kernels, splice)
    o = dense_attention(q, k, v, causal, kernels)
    if weights is not None:
        return post_attention(weights, x, o)
    x, h = add_layer_norm(x, block.ls_1(attention_out(block, o)), block.ln_2, kernels)
    return x, block.ls_2(mlp(block, h, kernels))


def _to_heads(block, x: torch.Tensor, pending: torch.Tensor | None, kernels: BlockKernels, splice):
    """A dense block up to its attention: (the frozen halves' weights or None, x + pending with `splice` in, q, k,
    v as [..., L, H, hd] views of one qkv GEMM)."""
    weights = runs_frozen_halves(block, x, pending, kernels)
    if weights is not None:
        x, out = pre_attention(weights, x, pending, splice)
        return (weights, x, *_heads(out, block._modules["attn"].num_heads))
    if pending is None:
        if splice is not None:
            raise ValueError("a splice fused into LN1 needs a pending branch")
        h = layer_norm(x, block.ln_1, kernels)
    else:
        x, h = add_layer_norm(x, pending, block.ln_1, kernels, splice)
    return (None, x, *qkv(block, h))


# --- a tower's last block on its pooled rows only ----------------------------------------------------------------
# A tower's output is read at one row per sequence (vision: the CLS token, through ln_post; text: the EOT token,
# through ln_final), and after the last block nothing mixes rows. So the last block needs every row's keys and
# values, but its attention queries, output projection, residual adds, second LayerNorm and MLP only at the pooled
# rows: about three quarters of the block's work (PERFORMANCE.md §1.3's last-layer trim). Exact: each pooled row is
# the same sum of the same terms as in the full block (only the GEMMs' row blocking differs).
def finish_rows(block, weights, x: torch.Tensor, o: torch.Tensor, kernels: BlockKernels) -> torch.Tensor:
    """x + out_proj(o), then + MLP(LN2 .), finished, for rows x [R, D] and their attention outputs o [R, H, hd];
    `weights` from runs_frozen_halves (one autograd node) or None (op by op)."""
    if weights is not None:
        x, branch = post_attention(weights, x, o)
        return x + branch
    x, h = add_layer_norm(x, block.ls_1(attention_out(block, o)), block.ln_2, kernels)
    return x + block.ls_2(mlp(block, h, kernels)).to(x.dtype)


def block_forward_cls(block, x: torch.Tensor, pending: torch.Tensor | None, kernels: BlockKernels,
                      splice=None) -> torch.Tensor:
    """The block's finished output at each sequence's first row (the CLS token) only, [B, D], for a dense
    non-causal [B, L, D] input x + pending (`splice` as in block_forward_pending): every row's keys and values, the
    CLS row's query, and the rest of the block on the CLS rows."""
    weights, x, q, k, v = _to_heads(block, x, pending, kernels, splice)
    o = dense_attention(q[:, :1], k, v, False, kernels)  # [B, 1, H, hd]
    return finish_rows(block, weights, x[:, 0], o[:, 0], kernels)
