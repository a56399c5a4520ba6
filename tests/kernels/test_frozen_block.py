"""A frozen block's halves around attention as two autograd nodes (fastprompt.ops.frozen_block).

In eager mode a patched block with frozen weights runs LN1 + qkv GEMM and out GEMM + LN2 + MLP as two Functions
instead of about ten nodes. Checked here: against plain PyTorch in float64 (an independent reference written from
the block's definition), bit-identical to the op-by-op path in outputs and every input gradient (it calls the same
kernels in the same order), one node per half, the same saved memory, and each condition that sends a block back to
the op-by-op path. fp32 under the interpreter on CPU; on a GPU the dtypes of kernel_targets.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from fastprompt.backbones import create_clip  # noqa: E402
from fastprompt.fast import blocks  # noqa: E402
from fastprompt.fast.blocks import BlockKernels, block_forward_pending, runs_frozen_halves  # noqa: E402
from kernel_numerics import assert_within_torch_error  # noqa: E402
from kernel_targets import MATRIX_DTYPE  # noqa: E402

KERNELS = BlockKernels(norm_mlp="triton", attention="sdpa")  # the halves are Triton; attention is any backend
GEMMS = ("triton", "cublas")  # the MLP's first GEMM (fastprompt.ops.mlp): both plans run inside the halves


def _block(device, dtype):
    clip = create_clip("tiny")  # ViT-B/16's block structure (pre-LN, QuickGELU MLP, no LayerScale) at width 64
    block = clip.visual.transformer.resblocks[3].to(device, dtype)
    block.requires_grad_(False)
    return block


def _inputs(device, dtype, splice, rows=(2, 9)):
    """(x, pending, new): splice False/True, or "first" (a tower's first block: nothing pending, no splice)."""
    g = torch.Generator().manual_seed(0)
    B, L = rows
    x, pending = (torch.randn(B, L, 64, generator=g).to(device, dtype).requires_grad_() for _ in range(2))
    new = torch.randn(B, 3, 64, generator=g).to(device, dtype).requires_grad_() if splice is True else None
    return x, (None if splice == "first" else pending), new


def _run(block, x, pending, new, causal=False, kernels=KERNELS):
    splice = None if new is None else (new, x.shape[1], 2)  # rows 2..4 of each sequence are the new prompt
    s, branch = block_forward_pending(block, x, pending, causal, kernels, splice)
    return s, branch


def _grads(outputs, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    cotangents = [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in outputs]
    return torch.autograd.grad(outputs, [i for i in inputs if i is not None], cotangents)


def _reference(block, x, pending, new, causal=False, dtype=torch.float64):
    """The block from its definition in plain PyTorch at `dtype`: s = x + pending (rows 2..4 of each sequence
    replaced by `new`; s = x without a pending branch), s + attn(LN1 s), then the MLP branch of LN2."""
    x = x.to(dtype)
    s = x if pending is None else x + pending.to(dtype)
    if new is not None:
        s = torch.cat([s[:, :2], new.to(dtype), s[:, 5:]], dim=1)
    p = {n: t.to(dtype) for n, t in block.named_parameters()}
    h = F.layer_norm(s, (64,), p["ln_1.weight"], p["ln_1.bias"], block.ln_1.eps)
    qkv = F.linear(h, p["attn.in_proj_weight"], p["attn.in_proj_bias"])
    q, k, v = qkv.unflatten(-1, (3, block.attn.num_heads, -1)).permute(2, 0, 3, 1, 4)  # each [B, H, L, hd]
    o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    s = s + F.linear(o.transpose(1, 2).flatten(-2), p["attn.out_proj.weight"], p["attn.out_proj.bias"])
    h = F.layer_norm(s, (64,), p["ln_2.weight"], p["ln_2.bias"], block.ln_2.eps)
    hidden = F.linear(h, p["mlp.c_fc.weight"], p["mlp.c_fc.bias"])
    branch = F.linear(block.mlp.gelu(hidden), p["mlp.c_proj.weight"], p["mlp.c_proj.bias"])  # the config's GELU
    return s, branch


@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize("splice", [False, True, "first"], ids=["residual", "splice", "first"])
@pytest.mark.parametrize("causal", [False, True], ids=["dense", "causal"])
def test_halves_equal_the_block_definition_in_float64(kernel_device, splice, causal, gemm):
    dtype = MATRIX_DTYPE
    kernels = BlockKernels(norm_mlp="triton", attention="sdpa", mlp_gemm=gemm)
    block = _block(kernel_device, dtype)
    x, pending, new = _inputs(kernel_device, dtype, splice)
    assert runs_frozen_halves(block, x, pending, kernels) is not None
    got = _run(block, x, pending, new, causal, kernels)
    inputs = [t.detach().double().requires_grad_() if t is not None else None for t in (x, pending, new)]
    ref = _reference(block, *inputs, causal=causal)
    ref_torch = _reference(block, *(t.detach() if t is not None else None for t in (x, pending, new)),
                           causal=causal, dtype=dtype)  # PyTorch's own error at this dtype bounds the kernels'
    for name, a, r, t in zip(("s", "branch"), got, ref, ref_torch):
        assert_within_torch_error(name, a.detach(), r.detach(), t.to(dtype), dtype)
    grads = _grads(got, (x, pending, new))
    ref_grads = _grads(ref, inputs)
    names = [n for n, t in zip(("dx", "dpending", "dnew"), (x, pending, new)) if t is not None]
    assert len(grads) == len(ref_grads) == len(names)
    for name, a, r in zip(names, grads, ref_grads):
        scale = r.abs().max().item()
        torch.testing.assert_close(a.double(), r, rtol=0, atol=(2e-5 if dtype == torch.float32 else 3e-2) * scale,
                                   msg=name)


@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize("splice", [False, True, "first"], ids=["residual", "splice", "first"])
def test_halves_are_bit_identical_to_the_op_by_op_path(kernel_device, splice, gemm, monkeypatch):
    kernels = BlockKernels(norm_mlp="triton", attention="sdpa", mlp_gemm=gemm)
    block = _block(kernel_device, MATRIX_DTYPE)
    x, pending, new = _inputs(kernel_device, MATRIX_DTYPE, splice)
    fused = _run(block, x, pending, new, kernels=kernels)
    fused_grads = _grads(fused, (x, pending, new))
    monkeypatch.setattr(blocks, "runs_frozen_halves", lambda *args, **kwargs: None)
    plain = _run(block, x, pending, new, kernels=kernels)
    plain_grads = _grads(plain, (x, pending, new))
    for a, b in zip(fused + fused_grads, plain + plain_grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("gemm", GEMMS)
def test_stream_layout_and_splice_groups(kernel_device, gemm):
    """The halves on the packed text layout ([rows, d], a splice per prefix group) through PackedText's block: a
    small CLIP's MaPLe text tower, fused against op by op, loss and prompt gradients bit-identical."""
    import fastprompt
    from fastprompt.fast import packed_text

    clip = create_clip("small").to(kernel_device, MATRIX_DTYPE)  # head_dim 64, which the Triton attention serves
    fastprompt.patch(clip, backend="triton", mlp_gemm=gemm)
    assert fastprompt.fast.fast_path(clip).kernels.mlp_gemm == gemm
    model = fastprompt.build("maple", clip, ["red circle", "blue square", "green triangle"])

    def text_step():
        model.zero_grad(set_to_none=True)
        features, _ = model.encode_text()
        features.float().square().sum().backward()
        return [features] + [p.grad.clone() for p in model.method.parameters() if p.grad is not None]

    calls = []
    real = blocks.runs_frozen_halves

    def counting(*args):
        weights = real(*args)
        calls.append(weights is not None)
        return weights

    packed_text.runs_frozen_halves = counting
    try:
        fused = text_step()
        assert calls == [True] * 12  # every text block, the first one (no pending branch) included
        packed_text.runs_frozen_halves = lambda *a: None
        plain = text_step()
    finally:
        packed_text.runs_frozen_halves = real
    assert len(fused) == len(plain) > 1
    for a, b in zip(fused, plain):
        assert torch.equal(a, b)


@pytest.mark.parametrize("first", [False, True], ids=["pending", "first"])
def test_one_node_per_half_and_the_same_saved_memory(kernel_device, monkeypatch, first):
    block = _block(kernel_device, MATRIX_DTYPE)
    x, pending, _ = _inputs(kernel_device, MATRIX_DTYPE, "first" if first else False)

    def nodes_and_saved():
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            s, branch = _run(block, x, pending, None)
        seen, stack = set(), [s.grad_fn, branch.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen or type(node).__name__ == "AccumulateGrad":
                continue
            seen.add(node)
            stack.extend(n for n, _ in node.next_functions)
        params = {p.data_ptr() for p in block.parameters()}
        activations = {t.data_ptr(): t.numel() * t.element_size() for t in saved if t.data_ptr() not in params}
        return sorted(type(n).__name__ for n in seen), sum(activations.values())

    fused_nodes, fused_bytes = nodes_and_saved()
    monkeypatch.setattr(blocks, "runs_frozen_halves", lambda *args, **kwargs: None)
    plain_nodes, plain_bytes = nodes_and_saved()
    halves = [n for n in fused_nodes if n.startswith(("_PreAttention", "_FirstPreAttention", "_PostAttention"))]
    pre = "_FirstPreAttentionBackward" if first else "_PreAttentionBackward"
    assert halves == sorted(["_PostAttentionBackward", pre])
    replaced = ("Addmm", "Eager_layer_norm", "Eager_frozen_mlp")
    assert not [n for n in fused_nodes if n.startswith(replaced)]
    assert len([n for n in plain_nodes if n.startswith(replaced)]) == 5  # 2 LayerNorms, 2 GEMMs, the MLP
    assert len(plain_nodes) >= len(fused_nodes) + 5
    assert fused_bytes == plain_bytes


def test_conditions_that_keep_the_op_by_op_path(kernel_device):
    block = _block(kernel_device, MATRIX_DTYPE)
    x, pending, _ = _inputs(kernel_device, MATRIX_DTYPE, False)
    assert runs_frozen_halves(block, x, pending, KERNELS) is not None
    assert runs_frozen_halves(block, x, None, KERNELS) is not None  # nothing pending (a first block): LN1 of x
    assert None is runs_frozen_halves(block, x, pending, BlockKernels(norm_mlp="torch", attention="sdpa"))
    block.mlp.c_fc.weight.requires_grad_(True)  # a trained weight needs the path that computes its gradient
    assert None is runs_frozen_halves(block, x, pending, KERNELS)
    with torch.no_grad():  # ... unless nothing is differentiated
        assert runs_frozen_halves(block, x, pending, KERNELS) is not None
    block.mlp.c_fc.weight.requires_grad_(False)
    other = torch.float64 if MATRIX_DTYPE == torch.float32 else torch.float32
    assert None is runs_frozen_halves(block, x.to(other), pending.to(other), KERNELS)  # a cast would be needed
    amp = torch.float16 if MATRIX_DTYPE == torch.bfloat16 else torch.bfloat16
    with torch.autocast(kernel_device, dtype=amp):  # autocast would cast the GEMM inputs
        assert None is runs_frozen_halves(block, x, pending, KERNELS)
    block.ls_1 = torch.nn.Module()  # LayerScale (or anything but Identity) between attention and the sum
    assert None is runs_frozen_halves(block, x, pending, KERNELS)
    block.ls_1 = torch.nn.Identity()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):  # tracing (compile, export, op counting): the registered ops
        assert None is runs_frozen_halves(block, x, pending, KERNELS)
