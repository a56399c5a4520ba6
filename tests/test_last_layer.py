"""Each tower's last block on its pooled rows only (PromptedCLIP.last_layer): the vision CLS rows, the packed text's
EOT rows. After the last block nothing mixes rows, so the pooled outputs, the logits and every gradient must equal
the full computation's (float64: to rounding), and open_clip's own encode_image/encode_text (the independent
reference) for an unprompted CLIP."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import fastprompt
from fastprompt.memory import options_for, step_geometry, structural_model
from fastprompt.method import PromptMethod

NAMES = ["red circle", "blue square", "green triangle", "yellow star", "purple cross"]

# Every vision schedule kind (head and tail sites, prompts entering the last block, none), every text prompt scope
# (shared, class, image, pair), and the methods that read the final vision tokens (kept whole under 'auto').
CASES = [
    ("maple", {}),
    ("vpt_deep", {}),  # vision prompts replaced at every layer, the last one included
    ("coop", {"class_specific": True}),  # one text prefix group per class
    ("cocoop", {}),  # text prompts per image
    ("mpl", {}),
    ("mudpt", {}),
    ("promptsrc", {}),
    ("mmrl", {}),  # reads the representation tokens' final outputs: vision full, text pooled
    ("mmrl", {"towers": "text"}),
    ("mcpl", {"fusion": "cmpp"}),
    ("mcpl", {"integration": "input"}),  # VAIPL per (image, class) pair, reads every vision token
]


def _grads(model):
    return [None if p.grad is None else p.grad.clone() for p in model.trainable_parameters()]


def _step(model, images, labels):
    model.zero_grad(set_to_none=True)
    out = model(images)
    loss, _ = model.loss(out, labels)
    loss.backward()
    return out, loss.detach(), _grads(model)


@pytest.mark.parametrize("patched", [False, True], ids=["unpatched", "patched"])
@pytest.mark.parametrize("method, options", CASES, ids=[f"{m}-{'-'.join(map(str, o.values())) or 'default'}"
                                                         for m, o in CASES])
def test_pooled_last_layer_equals_the_full_one(tiny_clip64, method, options, patched):
    clip = copy.deepcopy(tiny_clip64)
    if patched:
        fastprompt.patch(clip)
    torch.manual_seed(0)
    full = fastprompt.build(method, clip, NAMES, last_layer="full", **options).train()
    reads = full.method.reads_vision_tokens()
    pooled = fastprompt.build(method, clip, NAMES, last_layer="auto" if reads else "pooled", **options).train()
    pooled.method.load_state_dict(full.method.state_dict())
    assert not full.pools_last_layer("vision") and not full.pools_last_layer("text")
    if patched or not reads:
        assert pooled.pools_last_layer("vision") is not reads
    assert pooled.pools_last_layer("text") is pooled.uses_packed_text()

    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    labels = torch.tensor([0, 4, 2])
    out_full, loss_full, grads_full = _step(full, images, labels)
    out_pooled, loss_pooled, grads_pooled = _step(pooled, images, labels)
    assert (out_pooled.vision_tokens is None) is pooled.pools_last_layer("vision")
    assert out_full.vision_tokens is not None
    torch.testing.assert_close(out_pooled.image_features, out_full.image_features, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out_pooled.text_features, out_full.text_features, rtol=1e-10, atol=1e-10)
    assert out_pooled.logits.keys() == out_full.logits.keys()
    for head in out_full.logits:
        torch.testing.assert_close(out_pooled.logits[head], out_full.logits[head], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss_pooled, loss_full, rtol=1e-10, atol=1e-12)
    assert len(grads_full) == len(grads_pooled) > 0
    for a, b in zip(grads_full, grads_pooled):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)

    # Inference (the cached text path, no gradients) agrees too.
    full.eval(), pooled.eval()
    with torch.no_grad():
        torch.testing.assert_close(pooled(images).logits["main"], full(images).logits["main"], rtol=1e-10,
                                   atol=1e-10)


@pytest.mark.parametrize("patched", [False, True], ids=["unpatched", "patched"])
def test_unprompted_pooled_towers_equal_open_clip(tiny_clip64, patched):
    """The zero-shot configuration against open_clip's own encode_image / encode_text on the unpatched CLIP."""
    import open_clip

    reference = copy.deepcopy(tiny_clip64)
    clip = copy.deepcopy(tiny_clip64)
    if patched:
        fastprompt.patch(clip)
    model = fastprompt.build("clip", clip, NAMES, last_layer="pooled").eval()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        out = model(images)
        tokens = open_clip.get_tokenizer("ViT-B-16")([model.method.template.format(c) for c in NAMES])
        expected_text = reference.encode_text(tokens)
        expected_image = reference.encode_image(images)
    assert out.vision_tokens is None
    torch.testing.assert_close(out.image_features, expected_image, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.text_features, expected_text, rtol=1e-10, atol=1e-10)


def test_unpatched_last_block_runs_its_mlp_on_the_cls_rows_only(tiny_clip64):
    """On open_clip's own blocks the trim is visible from outside: the last vision block's MLP sees one row per
    image when pooled, every row when full; the blocks before it always see every row."""
    clip = copy.deepcopy(tiny_clip64)
    seen = []
    blocks = clip.visual.transformer.resblocks
    hooks = [blocks[i].mlp.register_forward_hook(lambda m, args, out, i=i: seen.append((i, tuple(args[0].shape))))
             for i in (len(blocks) - 2, len(blocks) - 1)]
    model = fastprompt.build("vpt_deep", clip, NAMES, last_layer="pooled")
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    length = model.info.vision_tokens + model.method.vision_schedule.edits[0].add
    model(images)
    assert seen == [(len(blocks) - 2, (2, length, 64)), (len(blocks) - 1, (2, 1, 64))]
    seen.clear()
    model.last_layer = "full"
    model(images)
    assert seen == [(len(blocks) - 2, (2, length, 64)), (len(blocks) - 1, (2, length, 64))]
    for hook in hooks:
        hook.remove()


def test_grad_checkpointing_keeps_the_pooled_block_exact(tiny_clip64):
    """open_clip's grad_checkpointing flag (block recompute) on both towers, with the pooled last blocks."""
    clip = copy.deepcopy(tiny_clip64)
    fastprompt.patch(clip)
    full = fastprompt.build("maple", clip, NAMES, last_layer="full").train()
    pooled = fastprompt.build("maple", clip, NAMES).train()
    pooled.method.load_state_dict(full.method.state_dict())
    images, labels = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 3])
    _, loss_full, grads_full = _step(full, images, labels)
    clip.set_grad_checkpointing(True)
    assert clip.visual.transformer.grad_checkpointing and clip.transformer.grad_checkpointing
    _, loss_pooled, grads_pooled = _step(pooled, images, labels)
    torch.testing.assert_close(loss_pooled, loss_full, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads_full, grads_pooled):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method, options, reads", [
    ("maple", {}, False), ("cocoop", {}, False), ("mmrl", {}, True), ("mmrl", {"towers": "text"}, False),
    ("mcpl", {}, True), ("mcpl", {"fusion": "cmpp"}, False), ("mcpl", {"integration": "input"}, True),
])
def test_which_methods_read_the_vision_tokens(tiny_clip, method, options, reads):
    """MMRL's representation head reads its tokens' final outputs and VAIPL cross-attends to every image token:
    they keep the vision tower's last block whole under 'auto' and refuse 'pooled' with a clear error."""
    clip = fastprompt.patch(copy.deepcopy(tiny_clip))
    model = fastprompt.build(method, clip, NAMES, **options)
    assert model.method.reads_vision_tokens() is reads
    assert model.pools_last_layer("vision") is not reads
    assert model.pools_last_layer("text")
    if reads:
        with pytest.raises(ValueError, match=f"last_layer='pooled': method '{method}' reads every final vision token"):
            fastprompt.build(method, clip, NAMES, last_layer="pooled", **options)


def test_last_layer_values_are_checked(tiny_clip):
    with pytest.raises(ValueError, match="last_layer must be 'auto', 'pooled' or 'full', got 'cls'"):
        fastprompt.build("coop", tiny_clip, NAMES, last_layer="cls")
    model = fastprompt.build("coop", tiny_clip, NAMES)
    assert model.last_layer == "auto" and not model.pools_last_layer("vision")  # unpatched: open_clip's rows
    with pytest.raises(ValueError, match="last_layer must be"):
        model.last_layer = None
    assert PromptMethod.reads_vision_tokens(model.method) is False


def test_geometry_of_the_pooled_last_layers_by_hand():
    """ViT-B/16, B = 4, CoOp on 50 classes: the vision tower's last layer keeps 4 x 197 rows through LN1 and the qkv
    GEMM and 4 CLS rows after it, attending with 4 queries; the packed text's last layer finishes 50 EOT rows and
    keeps its whole attention. FLOPs by the PERFORMANCE.md formula, the saves by the fused path's bytes per token."""
    from bench.flops import layer_flops

    model = structural_model("coop", [f"class {i}" for i in range(50)])
    options = options_for(patched=True, device="cuda")
    assert options.pooled_last_layer
    geometry = step_geometry(model, 4, options)
    full = step_geometry(model, 4, dataclasses.replace(options, pooled_last_layer=False))
    vision, text = geometry.pass_named("vision"), geometry.pass_named("text")
    last = vision.layers[-1]
    assert last.pooled and not any(layer.pooled for layer in vision.layers[:-1])
    assert (last.rows, last.finished_rows, last.attention_pairs) == (4 * 197, 4, 4 * 197)
    d, m = 768, 3072
    # CoOp's vision tower runs forward only: GEMMs once, no backward.
    assert layer_flops(vision, last) == 2 * 4 * 197 * 3 * d * d + 2 * 4 * (d * d + 2 * d * m) + 4 * d * 4 * 197
    assert layer_flops(vision, full.pass_named("vision").layers[-1]) == (2 * 4 * 197 * (4 * d * d + 2 * d * m)
                                                                         + 4 * d * 4 * 197 * 197)
    tl, tf = text.layers[-1], full.pass_named("text").layers[-1]
    assert tl.pooled and tl.finished_rows == 50 and tl.rows == tf.rows and tl.attention_pairs == tf.attention_pairs
    dt, ht = 512, 8
    # Fused path, bf16, per row: LN1 input + stats (2d + 8) and q/k/v (6d) on every row; attention output and
    # log-sum-exp (2d + 4h) on every row of the packed stream; LN2 sum + stats and the MLP input (4d + 8) on the
    # finished rows only.
    rows = tl.rows
    per_full_row = 14 * dt + 4 * ht + 16
    from fastprompt.memory import predict_peak_memory

    saved = predict_peak_memory(model, 4, options).parts["saved: text"]
    expected = (len(text.layers) - 1) * rows * per_full_row + rows * (10 * dt + 4 * ht + 8) + 50 * (4 * dt + 8)
    assert saved == expected


def _features_close(a, b, dtype):
    """Rows of a and b as unit vectors agree: to fp32 rounding, or to bf16's on a GPU (where the kernels run bf16)."""
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    a, b = torch.nn.functional.normalize(a.float(), dim=-1), torch.nn.functional.normalize(b.float(), dim=-1)
    torch.testing.assert_close(b, a, rtol=0, atol=tol)


def test_pooled_last_layer_on_the_triton_kernels(kernel_device):
    """The Triton path (frozen halves, the LayerNorm splice kernel, dense and packed attention; the interpreter in
    fp32 on a CPU, compiled bf16 on a GPU) on a 2-layer head-dim-64 CLIP: VPT-deep splices its prompts into the
    last block's LN1, which then finishes the CLS rows only; the text tower pools its EOT rows. Against the same
    kernels run on every row."""
    import open_clip

    dtype = torch.bfloat16 if kernel_device == "cuda" else torch.float32
    torch.manual_seed(0)
    config = dict(embed_dim=64, vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=64),
                  text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=2))
    clip = open_clip.CLIP(**config).eval().to(kernel_device, dtype)
    fastprompt.patch(clip, backend="triton")
    full = fastprompt.build("vpt_deep", clip, NAMES[:3], vision_depth=2, last_layer="full").train()
    pooled = fastprompt.build("vpt_deep", clip, NAMES[:3], vision_depth=2).train()
    pooled.method.load_state_dict(full.method.state_dict())
    assert pooled.pools_last_layer("vision") and pooled.pools_last_layer("text")
    assert full.method.vision_schedule.edits[-1].add == full.method.vision_schedule.edits[-1].drop > 0
    images = torch.randn(2, 3, 32, 32, device=kernel_device, dtype=dtype)
    labels = torch.tensor([0, 2], device=kernel_device)
    out_full, _, grads_full = _step(full, images, labels)
    out_pooled, _, grads_pooled = _step(pooled, images, labels)
    assert out_pooled.vision_tokens is None
    _features_close(out_full.image_features, out_pooled.image_features, dtype)
    _features_close(out_full.text_features, out_pooled.text_features, dtype)
    for a, b in zip(grads_full, grads_pooled):
        _features_close(a.flatten()[None], b.flatten()[None], dtype)


def test_patched_encode_image_pools_the_last_block_and_keeps_hooks_working(tiny_clip64, monkeypatch):
    """A patched CLIP's own encode_image (zero-shot use, the frozen teacher features) runs its last vision block on
    the CLS rows (one call, [B, D] out) and equals open_clip's; a hook on visual.transformer takes open_clip's
    forward instead, so the hook still sees every token; unpatch removes the instance forward."""
    import importlib

    patch_module = importlib.import_module("fastprompt.fast.patch")  # fastprompt.fast.patch is the function

    reference = copy.deepcopy(tiny_clip64)
    clip = fastprompt.patch(copy.deepcopy(tiny_clip64))
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    calls = []
    original = patch_module.block_forward_cls

    def recording(block, *args, **kwargs):
        out = original(block, *args, **kwargs)
        calls.append((block, tuple(out.shape)))
        return out

    monkeypatch.setattr(patch_module, "block_forward_cls", recording)
    with torch.no_grad():
        expected = reference.encode_image(images)
        torch.testing.assert_close(clip.encode_image(images), expected, rtol=1e-12, atol=1e-12)
        assert calls == [(clip.visual.transformer.resblocks[-1], (2, 64))]
        seen = []
        hook = clip.visual.transformer.register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
        torch.testing.assert_close(clip.encode_image(images), expected, rtol=1e-12, atol=1e-12)
        hook.remove()
    assert seen == [(2, 17, 64)] and len(calls) == 1
    assert "encode_image's last block on the CLS rows only" in str(clip.fastprompt_patch)
    fastprompt.unpatch(clip)
    assert "forward" not in clip.visual.__dict__
    assert torch.equal(clip.encode_image(images), reference.encode_image(images))


# --- the frozen teacher pass continues from the prompted pass ----------------------------------------------------
@pytest.mark.parametrize("options, shared", [({}, True), ({"towers": "text"}, True), ({"reg_weight": 0.0}, False)])
def test_mmrl_teacher_reuses_the_layers_below_the_first_prompt(tiny_clip64, monkeypatch, options, shared):
    """MMRL's image regulariser reads the frozen CLIP's features of the batch; its vision prompts start at layer 6,
    so layers 1-5 of the prompted pass are the frozen pass's. On a patched CLIP the teacher continues from there
    (from the pooled output itself when the vision tower has no prompts): its features equal open_clip's
    encode_image on the unpatched CLIP, and the loss and gradients equal a run that computes the teacher whole."""
    reference = copy.deepcopy(tiny_clip64)
    clip = fastprompt.patch(copy.deepcopy(tiny_clip64))
    model = fastprompt.build("mmrl", clip, NAMES, **options).train()
    images, labels = torch.randn(3, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 4, 2])
    seen = []
    original = model._frozen_from_stem
    monkeypatch.setattr(model, "_frozen_from_stem", lambda stem: seen.append(stem.layer) or original(stem))
    out = model(images)
    assert (model._vision_stem is not None) is shared
    with torch.no_grad():
        teacher = model.frozen_image_features(images)
    torch.testing.assert_close(teacher, reference.encode_image(images), rtol=1e-10, atol=1e-10)
    assert seen == ([6 if not options else 0] if shared else [])
    assert model._vision_stem is None  # used once

    _, loss_shared, grads_shared = _step(model, images, labels)
    monkeypatch.setattr(model, "_keeps_vision_stem", lambda: False)
    _, loss_whole, grads_whole = _step(model, images, labels)
    torch.testing.assert_close(loss_shared, loss_whole, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_whole, grads_shared):
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    assert out.image_features.requires_grad is (options.get("towers") != "text")


def test_teacher_stem_is_used_only_for_the_same_unchanged_batch(tiny_clip64, monkeypatch):
    """Other images, the same tensor changed in place, or an unpatched CLIP (the research code's whole second pass):
    the teacher runs clip.encode_image whole."""
    clip = fastprompt.patch(copy.deepcopy(tiny_clip64))
    model = fastprompt.build("mmrl", clip, NAMES).train()
    used = []
    original = model._frozen_from_stem
    monkeypatch.setattr(model, "_frozen_from_stem", lambda stem: used.append(1) or original(stem))
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model(images)
    other = images.clone()
    torch.testing.assert_close(model.frozen_image_features(other), clip.encode_image(other), rtol=0, atol=0)
    model(images)
    images.mul_(0.5)
    torch.testing.assert_close(model.frozen_image_features(images), clip.encode_image(images), rtol=0, atol=0)
    assert used == []
    unpatched = fastprompt.build("mmrl", copy.deepcopy(tiny_clip64), NAMES).train()
    unpatched(images)
    assert unpatched._vision_stem is None
    promptsrc = fastprompt.build("promptsrc", clip, NAMES).train()  # prompts from layer 1: nothing to share
    promptsrc(images)
    assert promptsrc.method.uses_frozen_image_features() and promptsrc._vision_stem is None


def test_geometry_of_the_teacher_passes():
    """What the FLOP count and the memory prediction read: MMRL's teacher runs layers 6-12 (the last pooled, no
    patch embedding) on a patched CLIP and all 12 on open_clip's; CoCoOp's unprompted vision tower is one pass."""
    names = [f"class {i}" for i in range(20)]
    mmrl = structural_model("mmrl", names)
    patched = step_geometry(mmrl, 4, options_for(patched=True, device="cuda")).pass_named("vision (frozen, teacher)")
    whole = step_geometry(mmrl, 4, options_for(patched=False, device="cuda")).pass_named("vision (frozen, teacher)")
    assert len(patched.layers) == 7 and patched.embed_flops == 0 and patched.layers[-1].pooled
    assert len(whole.layers) == 12 and whole.embed_flops > 0 and not any(layer.pooled for layer in whole.layers)
    for patched_flag in (True, False):
        cocoop = step_geometry(structural_model("cocoop", names), 4, options_for(patched=patched_flag, device="cuda"))
        assert [p.name for p in cocoop.passes if p.name.startswith("vision")] == ["vision"]
