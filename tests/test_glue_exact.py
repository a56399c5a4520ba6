"""Fewer glue launches on the fast path, each change exact (issue 9 item 3, issue 8 item 2).

The packed text tower keeps one stream across layers, and every block leaves its MLP branch pending so the next
block's first LayerNorm adds it (fused with the Triton kernels). The references are the unpatched eager path
(open_clip's own blocks, a cat per splice); the launch counts are checked against what the design says a
tower dispatches, counted under fake tensors on the Triton kernel path (nothing computes).
"""

import copy
from collections import Counter

import open_clip
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import fastprompt
from fastprompt.backbones import create_clip
from fastprompt.fast import patch

NAMES = ["red circle", "blue square", "green triangle"]


def _pair(name, backend, clip, **options):
    reference_clip = copy.deepcopy(clip)
    torch.manual_seed(0)
    ref = fastprompt.build(name, reference_clip, NAMES, text_path="reference", **options)
    patch(clip, backend=backend)
    fast = fastprompt.build(name, clip, NAMES, **options)
    fast.method.load_state_dict(ref.method.state_dict())
    return ref, fast


def _step(model, images, labels):
    x = images.clone().requires_grad_(True)
    out = model(x)
    loss, _ = model.loss(out, labels)
    loss.backward()
    return out, x.grad, {n: p.grad for n, p in model.method.named_parameters()}


@pytest.mark.parametrize("name", ["maple", "cocoop", "mpl"])
def test_block_recompute_on_the_fast_path_equals_the_reference(name):
    """open_clip's grad_checkpointing flag on both models: the pending branch crosses the recompute boundary."""
    clip = create_clip("tiny").double()
    ref, fast = _pair(name, "sdpa", clip)
    for model in (ref, fast):
        model.double()
        model.clip.transformer.grad_checkpointing = model.clip.visual.transformer.grad_checkpointing = True
    images, labels = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 2])
    (o1, x1, g1), (o2, x2, g2) = _step(ref, images, labels), _step(fast, images, labels)
    tol = dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(o2.logits["main"], o1.logits["main"], **tol)
    torch.testing.assert_close(x2, x1, **tol)
    for pname in g1:
        torch.testing.assert_close(g2[pname], g1[pname], **tol, msg=pname)


def _triton_pair(name, device):
    """(eager reference, patched Triton model) of `name` on the 'small' CLIP (head dim 64, the kernels' smallest):
    both fp32 under the interpreter on a CPU; on a GPU the patched model compiled in bf16 (the attention kernels'
    GPU dtype) and the reference in fp32."""
    reference_clip = create_clip("small", device=device)
    clip = create_clip("small", precision="bf16" if device == "cuda" else "fp32", device=device)
    clip.load_state_dict(reference_clip.state_dict())
    torch.manual_seed(0)
    ref = fastprompt.build(name, reference_clip, NAMES, text_path="reference")
    patch(clip, backend="triton")
    fast = fastprompt.build(name, clip, NAMES)
    fast.method.load_state_dict(ref.method.state_dict())
    return ref, fast


def _assert_triton_step_matches(ref, fast, device):
    """One training step of each: logits, the image gradient and every prompt gradient. fp32 on both sides (a CPU):
    to fp32 rounding. bf16 against fp32 (a GPU): directions to bf16's rounding (test_patch's triton test)."""
    images, labels = torch.randn(2, 3, 64, 64, device=device), torch.tensor([0, 2], device=device)
    (o1, x1, g1), (o2, x2, g2) = _step(ref, images, labels), _step(fast, images, labels)
    if device != "cuda":
        torch.testing.assert_close(o2.logits["main"], o1.logits["main"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(x2, x1, rtol=1e-3, atol=1e-6)
        for pname in g1:
            torch.testing.assert_close(g2[pname], g1[pname], rtol=1e-3, atol=1e-5, msg=pname)
        return
    unit = lambda t: torch.nn.functional.normalize(t.float().flatten()[None], dim=-1)  # noqa: E731
    for name in ("image_features", "text_features"):
        a, b = getattr(o1, name), getattr(o2, name)
        torch.testing.assert_close(unit(b), unit(a), rtol=0, atol=2e-2, msg=name)
    for pname, grad in (("images", x1), *g1.items()):
        other = x2 if pname == "images" else g2[pname]
        torch.testing.assert_close(unit(other), unit(grad), rtol=0, atol=5e-2, msg=pname)


def test_triton_kernel_path_with_prompt_groups_equals_the_reference(kernel_device):
    """Fused residual LayerNorms (Triton) with several prefix groups (CoCoOp: one per image) and a vision tower
    without prompts, where every block's add is fused, against the eager reference. (Groups per class and per
    image-class pair are checked in float64 on the PyTorch ops in tests/test_patch.py.)"""
    ref, fast = _triton_pair("cocoop", kernel_device)
    _assert_triton_step_matches(ref, fast, kernel_device)


@pytest.mark.parametrize("name,recompute", [("maple", True), ("vpt_deep", False), ("mcpl", False), ("mpl", False)])
def test_triton_kernel_path_with_deep_prompt_splices_equals_the_reference(name, recompute, kernel_device):
    """Deep prompts entering each block inside its first LayerNorm kernel (the splice fused with the pending
    residual add, tested on its own in tests/kernels/test_layer_norm.py): MaPLe in both towers under block recompute
    (the splice crosses the recompute boundary), VPT in the vision tower, MCPL with its coupled prompts, MPL (adds
    and removes tokens: its splices change the length and keep the separate path), against the eager reference.
    Interpreted Triton is slow: one case per kind of splice."""
    ref, fast = _triton_pair(name, kernel_device)
    for model in (ref, fast):
        model.clip.transformer.grad_checkpointing = model.clip.visual.transformer.grad_checkpointing = recompute
    _assert_triton_step_matches(ref, fast, kernel_device)


def test_patched_encode_text_reads_no_mask_values_and_follows_an_edited_mask():
    clip = create_clip("tiny").double()
    reference = copy.deepcopy(clip)
    patch(clip, backend="sdpa")
    tokens = open_clip.get_tokenizer("ViT-B-16")([f"a photo of a {n}." for n in NAMES])
    with FakeTensorMode(allow_non_fake_inputs=True):  # a mask read would need values: fake tensors have none
        assert clip.encode_text(tokens.clone()).shape == (3, clip.text_projection.shape[1])
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_text(tokens), reference.encode_text(tokens), rtol=1e-12, atol=1e-12)
        for model in (clip, reference):  # no longer causal: key 2 hidden from every query
            model.attn_mask[:, 2] = float("-inf")
            model.attn_mask.fill_diagonal_(0.0)
        torch.testing.assert_close(clip.encode_text(tokens), reference.encode_text(tokens), rtol=1e-12, atol=1e-12)


class _Forward(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func._schema.name] += 1
        return func(*args, **(kwargs or {}))


def _triton_clip(device):
    """The 'small' CLIP (head dim 64) patched onto the Triton kernels: fp32 under the interpreter on a CPU, bf16 on
    a GPU (the attention kernels run fp32 only in the interpreter). The ops dispatched are the same either way."""
    clip = create_clip("small", precision="bf16" if device == "cuda" else "fp32", device=device)
    return patch(clip, backend="triton")


def test_triton_path_towers_dispatch_one_add_and_no_stream_rebuild_per_block(kernel_device):
    """CoOp on the Triton path (12 + 12 blocks, text prompts at layer 1 only, none in vision). Vision: one add for
    the positional embedding and one to finish the last block; the other eleven residual adds run inside the
    LayerNorm kernels. Text: one cat to splice layer 1's context; each block's attention is one op over the whole
    stream (the prefix's own and the suffixes'), so the stream is never split, joined or rebuilt between blocks."""
    clip = _triton_clip(kernel_device)
    model = fastprompt.build("coop", clip, NAMES)
    model.packed_text()
    images = torch.randn(2, 3, 64, 64, device=kernel_device)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.encode_text()  # the layers' constant inputs are built once
        vision, text, frozen = _Forward(), _Forward(), _Forward()
        with vision:
            model.encode_image(images)
        with text:
            model.encode_text()
        with frozen:  # open_clip's own encode_image (a teacher's frozen features) runs the same fused loop
            clip.encode_image(images)
    assert vision.ops["aten::add"] == 2 and vision.ops["aten::cat"] == 1  # the class token joins the patches
    assert frozen.ops["aten::add"] == 2
    assert text.ops["aten::cat"] == 1
    assert text.ops["fastprompt::prefix_stream_attention_fwd"] == 12 and text.ops["fastprompt::attention_fwd"] == 0
    assert text.ops["aten::add"] == 2  # layer 1's context gets its positions; the last block is finished


def test_maple_deep_prompts_enter_both_towers_without_a_cat_or_an_add(kernel_device):
    """MaPLe on the Triton path: each of the layers 2..9 replaces its prompt tokens inside LN1's kernel in both
    towers (`fastprompt::layer_norm_residual_splice`), so the towers dispatch only the cats and adds of layer 1
    (which has no pending branch: the embeddings) and of the last block."""
    clip = _triton_clip(kernel_device)
    model = fastprompt.build("maple", clip, NAMES)
    model.packed_text()
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.encode_text()
        vision, text = _Forward(), _Forward()
        with vision:
            model.encode_image(torch.randn(2, 3, 64, 64, device=kernel_device))
        with text:
            model.encode_text()
    for tower in (vision, text):
        assert tower.ops["fastprompt::layer_norm_residual_splice"] == 8
    assert vision.ops["aten::cat"] == 2 and vision.ops["aten::add"] == 2  # class token + layer 1's prompts
    assert text.ops["aten::cat"] == 1 and text.ops["aten::add"] == 2
