"""The method x backbone support matrix (USERS.md need 7): every method on every tiny backbone family, and one clear
error for the architectures fastprompt cannot prompt.

The RN50-shaped backbone (open_clip's ModifiedResNet) has no vision transformer: the methods that prompt only the
text run on it (CoOp's paper reports RN50 first), every other method is refused with one error naming it.

Each supported cell builds the method, runs one training step (finite loss, a gradient on every trainable
parameter) and an eval-mode forward, with the eager reference path and the patched fast path agreeing in float64.
Expectations that do not come from the code under test: zero-shot equals open_clip's own encoders on each family,
and the parameter counts and sequence lengths on the ViT-L/14-shaped backbone follow METHODS.md's formulas with
that backbone's widths and depths (text 96, vision 128, embed 48; 12 text and 24 vision layers).
"""

import copy

import open_clip
import pytest
import torch

import fastprompt
from fastprompt.backbones import TINY_CONFIGS, create_clip
from fastprompt.fast import patch

NAMES = ["red circle", "blue square", "green triangle"]
LABELS = torch.tensor([0, 2])
# Every tiny family; 'small' is the 'tiny' structure at head width 64 (for the Triton kernels), left out here.
BACKBONES = sorted(set(TINY_CONFIGS) - {"small"})
CNN_BACKBONES = {"tiny-rn50"}
# The methods with no vision prompts (METHODS.md: CoOp, CoCoOp, deep language prompting; zero-shot CLIP).
TEXT_METHODS = {"clip", "coop", "cocoop", "deep_language"}


@pytest.fixture()
def few_teacher_templates(monkeypatch):
    """PromptSRC's teacher averages 60 templates, each a full frozen text pass: 2 of them exercise the same code
    on every backbone in a fraction of the time (the matrix checks backbones, not the template count)."""
    from fastprompt.methods import promptsrc

    monkeypatch.setattr(promptsrc, "PROMPTSRC_TEMPLATES", promptsrc.PROMPTSRC_TEMPLATES[:2])


@pytest.fixture(scope="module")
def clips():
    """Per backbone: (reference CLIP, patched CLIP), float64, built once and shared by every method (build only
    freezes the CLIP; it changes nothing else in it)."""
    built = {}
    for name in BACKBONES:
        reference = create_clip(name).double().requires_grad_(False)
        fast = copy.deepcopy(reference)
        patch(fast, backend="sdpa")
        built[name] = (reference, fast)
    return built


def images_for(clip, n=2):
    size = clip.visual.image_size  # a pair on a VisionTransformer, an int on a ModifiedResNet
    return torch.randn(n, 3, *((size, size) if isinstance(size, int) else size), dtype=torch.float64)


def close(a, b, tol=1e-9):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_zero_shot_equals_open_clip_on_every_backbone(clips, backbone):
    """QuickGELU, LayerScale, no ln_pre, 'eos' pooling, a 32-token context: the prompt engine runs open_clip's
    own modules in open_clip's order, so with no prompts it must give open_clip's features on both paths."""
    reference, fast = clips[backbone]
    images = images_for(reference)
    tokens = open_clip.get_tokenizer("ViT-B-16", context_length=reference.positional_embedding.shape[0])(
        [f"a photo of a {c}." for c in NAMES])
    with torch.no_grad():
        expected_image = reference.encode_image(images)
        expected_text = reference.encode_text(tokens)
    for clip in (reference, fast):
        out = fastprompt.build("clip", clip, NAMES)(images)
        close(out.image_features, expected_image)
        close(out.text_features, expected_text)


@pytest.mark.parametrize("method", sorted(fastprompt.METHODS))
@pytest.mark.parametrize("backbone", BACKBONES)
def test_method_trains_and_evaluates_on_backbone(clips, few_teacher_templates, backbone, method):
    reference_clip, fast_clip = clips[backbone]
    torch.manual_seed(0)
    if backbone in CNN_BACKBONES and method not in TEXT_METHODS:
        for clip in (reference_clip, fast_clip):
            with pytest.raises(fastprompt.UnsupportedModelError, match=rf"method '{method}' puts prompts into the"
                               r" vision tower.*CNN \(ModifiedResNet.*coop, cocoop"):
                fastprompt.build(method, clip, NAMES)
        return
    ref = fastprompt.build(method, reference_clip, NAMES, text_path="reference").double()
    fast = fastprompt.build(method, fast_clip, NAMES).double()
    assert fast.uses_packed_text()
    fast.method.load_state_dict(ref.method.state_dict())
    images = images_for(reference_clip)
    trained = []
    for model in (ref, fast):
        model.train()
        out = model(images)
        loss, _ = model.loss(out, LABELS)
        assert torch.isfinite(loss)
        params = dict(model.method.named_parameters())
        if params:  # zero-shot CLIP trains nothing
            loss.backward()
            missing = [n for n, p in params.items() if p.grad is None or not torch.isfinite(p.grad).all()]
            assert not missing, f"no (finite) gradient for {missing}"
        trained.append((out, {n: p.grad for n, p in params.items()}))
    (o1, g1), (o2, g2) = trained
    for head in o1.logits:
        close(o2.logits[head], o1.logits[head])
    for name in g1:
        close(g2[name], g1[name])
    for model, (out, _) in zip((ref, fast), trained):
        model.eval()
        with torch.no_grad():
            evaluated = model(images)
        prediction = model.predict(evaluated)
        assert prediction.shape == (2, len(NAMES)) and torch.isfinite(prediction).all()
        # No dropout anywhere: the eval forward (cached text and prompts) equals the training forward.
        close(evaluated.logits["main"], out.logits["main"].detach())


# --- the ViT-L/14-shaped backbone against METHODS.md's formulas at its sizes ----------------------------------
DT, DV, E, LT, LV, V_TOKENS = 96, 128, 48, 12, 24, 17  # tiny-l14: widths, embed_dim, depths, 1 + 4x4 patches


def linear(d_in, d_out):
    return d_in * d_out + d_out


def test_l14_shapes_come_from_the_backbone(clips):
    info = fastprompt.inspect_clip(clips["tiny-l14"][0])
    assert (info.text.width, info.vision.width, info.embed_dim) == (DT, DV, E)
    assert (info.text.layers, info.vision.layers, info.vision_tokens) == (LT, LV, V_TOKENS)


@pytest.mark.parametrize("method,options,expected", [
    # MaPLe: 2 text tokens per layer 1..9 and the coupling Linear(d_text -> d_vision) per layer (the "512 -> 768"
    # that had to be edited by hand for ViT-L/14 in the original code).
    ("maple", {}, 9 * 2 * DT + 9 * linear(DT, DV)),
    # MMRL: R 5 x 512, one map per layer J..L of each tower (text 6..12, vision 6..24), proj_rep d_vision x embed.
    ("mmrl", {}, 5 * 512 + 7 * linear(512, DT) + 19 * linear(512, DV) + DV * E),
    ("mmrl", {"space": "separate"}, 7 * 5 * DT + 19 * 5 * DV + DV * E),
    # CoCoOp's meta-net: embed -> embed/16 -> d_text, on top of 4 context tokens of the text width.
    ("cocoop", {}, 4 * DT + linear(E, E // 16) + linear(E // 16, DT)),
])
def test_parameter_counts_on_l14(clips, method, options, expected):
    model = fastprompt.build(method, clips["tiny-l14"][0], NAMES, **options)
    assert sum(p.numel() for p in model.trainable_parameters()) == expected


def test_sequence_lengths_on_l14(clips):
    images = images_for(clips["tiny-l14"][0], 1)
    lengths = {}
    for method in ("maple", "mmrl"):
        model = fastprompt.build(method, clips["tiny-l14"][0], NAMES, text_path="reference").double()
        model.trace = []
        model(images)
        lengths[method] = [n for tower, _, n in model.trace if tower == "vision"], [
            n for tower, _, n in model.trace if tower == "text"]
    template = len(open_clip.get_tokenizer("ViT-B-16").encode("a photo of a green triangle.")) + 2
    # MaPLe appends 2 vision prompts at layer 1 and keeps them through all 24 layers; its text length is fixed.
    assert lengths["maple"] == ([V_TOKENS + 2] * LV, [template] * LT)
    # MMRL inserts 5 tokens from layer 6 in each tower, up to its own last layer.
    assert lengths["mmrl"] == ([V_TOKENS] * 5 + [V_TOKENS + 5] * (LV - 5), [template] * 5 + [template + 5] * (LT - 5))


def test_mmrl_text_to_vision_needs_equal_depths(clips):
    with pytest.raises(ValueError, match="12 text and 24 vision layers"):
        fastprompt.build("mmrl", clips["tiny-l14"][0], NAMES, space="text_to_vision")


# --- shallower than the paper defaults: adapt or one clear error ----------------------------------------------
@pytest.fixture(scope="module")
def shallow_clip():
    return open_clip.CLIP(embed_dim=32, vision_cfg=dict(image_size=16, layers=4, width=32, patch_size=8, head_width=16),
                          text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=4))


# The paper defaults that count ViT-B/16's 12 layers (METHODS.md §3): the option the error names, and the
# options that make the method fit 4 layers.
DEEP_DEFAULTS = {
    "deep_language": ("text_depth=12", {"text_depth": 4}),
    "ivlp": ("text_depth=12", {"text_depth": 4, "vision_depth": 4}),
    "maple": ("depth=9", {"depth": 4}),
    "mcpl": ("depth=9", {"depth": 4}),
    "mmrl": ("first_layer=6", {"first_layer": 3}),
    "mpl": ("depth=9", {"depth": 4}),
    "mudpt": ("depth=12", {"depth": 4}),
    "promptsrc": ("depth=9", {"depth": 4}),
    "vpt_deep": ("vision_depth=12", {"vision_depth": 4}),
}


@pytest.mark.parametrize("method", sorted(fastprompt.METHODS))
def test_default_depths_on_a_4_layer_backbone(shallow_clip, method):
    if method not in DEEP_DEFAULTS:  # first-layer-only prompts fit any depth
        out = fastprompt.build(method, shallow_clip, NAMES)(torch.randn(1, 3, 16, 16))
        assert out.logits["main"].shape == (1, len(NAMES))
        return
    named, fitting = DEEP_DEFAULTS[method]
    with pytest.raises(ValueError, match=rf"(?i){method} option {named}\b.*4 layers"):
        fastprompt.build(method, shallow_clip, NAMES)
    out = fastprompt.build(method, shallow_clip, NAMES, **fitting)(torch.randn(1, 3, 16, 16))
    assert out.logits["main"].shape == (1, len(NAMES))


# --- architectures that cannot be prompted: one clear error each -----------------------------------------------
_TEXT = dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2)
_VISION = dict(image_size=32, layers=2, width=32, patch_size=16, head_width=16)

UNSUPPORTED = {
    "coca_attentional_pool": (lambda: open_clip.CLIP(32, dict(_VISION, attentional_pool=True, attn_pooler_queries=4,
                                                              attn_pooler_heads=2), _TEXT), "attentional pooling"),
    "clipa_avg_pool": (lambda: open_clip.CLIP(32, dict(_VISION, pool_type="avg", final_ln_after_pool=True), _TEXT),
                       "pool_type='avg'"),
    "siglip_last_token_text": (lambda: open_clip.CLIP(32, _VISION, dict(_TEXT, pool_type="last")),
                               "text_pool_type='last'"),
    "bidirectional_text": (lambda: open_clip.CLIP(32, _VISION, dict(_TEXT, no_causal_mask=True)), "causal"),
    "text_proj_bias": (lambda: open_clip.CLIP(32, _VISION, dict(_TEXT, proj_bias=True)), "proj_bias"),
    "custom_text_tower": (lambda: open_clip.CustomTextCLIP(32, _VISION, _TEXT), "CustomTextCLIP"),
    "qk_norm_blocks": (lambda: open_clip.CLIP(32, dict(_VISION, qk_norm=True), _TEXT), "CustomResidualAttentionBlock"),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_architectures_give_one_clear_error(case):
    make, message = UNSUPPORTED[case]
    clip = make()
    for method in ("coop", "maple"):
        with pytest.raises(fastprompt.UnsupportedModelError, match=message):
            fastprompt.build(method, clip, NAMES)
    with pytest.raises(fastprompt.UnsupportedModelError, match=message):
        fastprompt.patch(clip)
    assert not fastprompt.is_patched(clip)


def test_a_tokenizer_that_does_not_fit_the_model_is_refused(clips):
    short_context = clips["tiny-alt"][0]  # 32-token text context
    with pytest.raises(ValueError, match="pads to 77 tokens but the model's text context is 32"):
        fastprompt.build("coop", short_context, NAMES, tokenizer=open_clip.get_tokenizer("ViT-B-16"))
    # 'eos' pooling at open_clip's default eos_id 2, which the CLIP tokenizer does not end prompts with.
    eos2 = open_clip.CLIP(32, _VISION, dict(_TEXT, pool_type="eos"))
    with pytest.raises(ValueError, match="eos_id=2"):
        fastprompt.build("coop", eos2, NAMES)
