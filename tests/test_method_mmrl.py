"""MMRL's loss against METHODS.md §3.7 computed here, and the paper's ablations (Tab. 4, Tab. 9) as options that
change what is computed. Float64 on the tiny CLIP; frozen features come from open_clip's own encoders."""

import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F

import fastprompt

NAMES = ["red circle", "blue square", "green triangle", "yellow star"]
TEMPLATE = "a drawing of a {}."
LABELS = torch.tensor([2, 0, 3])


def images64(n=3):
    return torch.randn(n, 3, 32, 32, dtype=torch.float64)


def build(clip, **options):
    """MMRL with every learnable tensor moved randomly (trained-looking, maps no longer copies of one)."""
    model = fastprompt.build("mmrl", clip, NAMES, template=TEMPLATE, truncate_text=False, **options).double()
    with torch.no_grad():
        for p in model.method.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def frozen_features(clip, images):
    ids = open_clip.get_tokenizer("ViT-B-16")([TEMPLATE.format(c) for c in NAMES])
    return clip.encode_image(images), clip.encode_text(ids)


def cos_logits(scale, f, w):
    return scale * F.normalize(f, dim=-1) @ F.normalize(w, dim=-1).t()


def rep_logits(out, proj_rep, k=5):
    """z_r: mean of the K representation-token outputs (right after CLS, after ln_post) through proj_rep."""
    return cos_logits(out.logit_scale, out.vision_tokens[:, 1 : 1 + k].mean(1) @ proj_rep, out.text_features)


def unit(x):
    return F.normalize(x, dim=-1)


# The regularisers of Tab. 9 on the L2-normalised features (the cosine one is L_cos of Sec. 3.2.3).
REGULARISERS = {
    "cosine": lambda f, f0: 1 - (unit(f) * unit(f0)).sum(-1).mean(),
    "l1": lambda f, f0: (unit(f) - unit(f0)).abs().mean(),
    "mse": lambda f, f0: ((unit(f) - unit(f0)) ** 2).mean(),
}


@pytest.mark.parametrize("regularizer", sorted(REGULARISERS))
def test_loss_is_weighted_ce_plus_lambda_regularisers(tiny_clip64, regularizer):
    """L = alpha CE(z_c) + (1 - alpha) CE(z_r) + lambda (L^v + L^t) against the frozen CLIP's f_0 and w_0."""
    alpha, lam = 0.3, 2.5
    model = build(tiny_clip64, alpha=alpha, reg_weight=lam, regularizer=regularizer)
    imgs = images64()
    out = model(imgs)
    loss, parts = model.loss(out, LABELS)
    f0, w0 = frozen_features(tiny_clip64, imgs)
    z_c = cos_logits(out.logit_scale, out.image_features, out.text_features)
    z_r = rep_logits(out, model.method.proj_rep)
    reg = REGULARISERS[regularizer]
    reg_v, reg_t = reg(out.image_features, f0), reg(out.text_features, w0)
    assert reg_v > 1e-4 and reg_t > 1e-4  # the prompts moved both towers away from the frozen model
    expected = alpha * F.cross_entropy(z_c, LABELS) + (1 - alpha) * F.cross_entropy(z_r, LABELS) + lam * (reg_v + reg_t)
    torch.testing.assert_close(loss.double(), expected.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["reg_image"].double(), reg_v.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["reg_text"].double(), reg_t.double(), rtol=1e-5, atol=1e-6)


def test_without_text_tokens_text_is_the_frozen_template(tiny_clip64):
    """w/o L: only vision representation tokens; the text tower is CLIP's on the hand template."""
    model = build(tiny_clip64, towers="vision")
    imgs = images64()
    model.trace = []
    out = model(imgs)
    f0, w0 = frozen_features(tiny_clip64, imgs)
    torch.testing.assert_close(out.text_features, w0, rtol=1e-10, atol=1e-10)
    assert [n for tower, _, n in model.trace if tower == "text"] == [77] * 12
    assert [n for tower, _, n in model.trace if tower == "vision"] == [17] * 5 + [22] * 7
    assert (out.image_features - f0).abs().max() > 1e-4
    assert set(out.logits) == {"main", "rep"}


def test_without_vision_tokens_there_is_one_head(tiny_clip64):
    """w/o V: no vision tokens, so no representation feature: CE(z_c) + lambda (L^v + L^t), predictions z_c."""
    lam = 1.5
    model = build(tiny_clip64, towers="text", reg_weight=lam)
    imgs = images64()
    model.trace = []
    out = model(imgs)
    f0, w0 = frozen_features(tiny_clip64, imgs)
    torch.testing.assert_close(out.image_features, f0, rtol=1e-10, atol=1e-10)
    assert [n for tower, _, n in model.trace if tower == "text"] == [77] * 5 + [82] * 7
    assert set(out.logits) == {"main"} and not hasattr(model.method, "proj_rep")
    z_c = cos_logits(out.logit_scale, out.image_features, out.text_features)
    reg = REGULARISERS["cosine"]
    expected = F.cross_entropy(z_c, LABELS) + lam * (reg(out.image_features, f0) + reg(out.text_features, w0))
    torch.testing.assert_close(model.loss(out, LABELS)[0].double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.predict(out, "base"), z_c.float(), rtol=1e-6, atol=1e-5)


def change_vision_sources_only(model):
    """Move every parameter the vision tower's sources read and the text tower's do not."""
    text_params = {id(p) for p in model.method.text_sources.parameters()}
    with torch.no_grad():
        for p in model.method.vision_sources.parameters():
            if id(p) not in text_params:
                p.add_(torch.randn_like(p))


def change_shared_or_text_sources(model):
    """Move every parameter the text tower's sources read (R itself when the space is shared)."""
    with torch.no_grad():
        for p in model.method.text_sources.parameters():
            p.add_(torch.randn_like(p))


@pytest.mark.parametrize("space", ["shared", "separate", "text_to_vision"])
def test_representation_space_decides_what_the_towers_share(tiny_clip64, space):
    """shared: one R feeds both towers; w/o RS ('separate'): independent tokens per tower; MMRL-dagger
    ('text_to_vision'): vision tokens are maps of the text tokens, nothing flows the other way."""
    model = build(tiny_clip64, space=space)
    imgs = images64(1)
    with torch.no_grad():
        before = model(imgs)
        change_shared_or_text_sources(model)
        after_text = model(imgs)
    text_moves_vision = (after_text.image_features - before.image_features).abs().max() > 1e-6
    assert text_moves_vision == (space != "separate")
    model = build(tiny_clip64, space=space)
    with torch.no_grad():
        before = model(imgs)
        change_vision_sources_only(model)
        after_vision = model(imgs)
    assert (after_vision.image_features - before.image_features).abs().max() > 1e-6
    torch.testing.assert_close(after_vision.text_features, before.text_features, rtol=0, atol=0)


def test_text_to_vision_maps_each_layers_text_tokens(tiny_clip64):
    model = build(tiny_clip64, space="text_to_vision")
    state = model.method.state_dict()
    for layer in range(6, 13):
        text, key = state[f"text_sources.{layer}.tokens"], f"vision_sources.{layer}.mapping"
        expected = text @ state[f"{key}.weight"].t() + state[f"{key}.bias"]
        torch.testing.assert_close(model.method.vision_sources[str(layer)](None), expected)


@pytest.mark.parametrize("inference,base_fused,novel_fused", [("decoupled", True, False), ("class", False, False),
                                                               ("fused", True, True)])
def test_inference_strategies(tiny_clip64, inference, base_fused, novel_fused):
    """w/o DS1 ('class') predicts z_c everywhere; w/o DS2 ('fused') fuses on novel classes too."""
    model = build(tiny_clip64, inference=inference)
    out = model(images64(2))
    z_c = out.logits["main"]
    z_r = rep_logits(out, model.method.proj_rep).float()
    # The paper's fusion (the default): p = 0.7 softmax(z_c) + 0.3 softmax(z_r), returned as log p.
    fused = torch.log(0.7 * z_c.softmax(-1) + 0.3 * z_r.softmax(-1))
    for mode, is_fused in (("base", base_fused), ("novel", novel_fused)):
        torch.testing.assert_close(model.predict(out, mode).float(), fused if is_fused else z_c, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"towers": "image"}, "towers must be one of"),
        ({"space": "text_to_vision", "towers": "vision"}, "needs towers='both'"),
        ({"regularizer": "kl"}, "regularizer must be one of"),
        ({"fusion": "mean"}, "fusion must be one of"),
    ],
)
def test_bad_options_name_the_problem(tiny_clip, options, message):
    with pytest.raises(ValueError, match=message):
        fastprompt.build("mmrl", tiny_clip, NAMES, **options)


def test_ablation_options_listed_with_mmrl_defaults():
    options = fastprompt.method_options("mmrl")
    assert {k: options[k] for k in ("towers", "space", "regularizer", "inference")} == {
        "towers": "both", "space": "shared", "regularizer": "cosine", "inference": "decoupled"}


@pytest.mark.parametrize("alpha", [0.7, 1.0, 0.0])
def test_fusion_probs_is_the_papers_mixture_and_logits_the_released_codes(tiny_clip64, alpha):
    """'probs' (default): softmax of the prediction is alpha p(y|f_c) + (1 - alpha) p(y|f_r), the paper's equation;
    'logits': alpha z_c + (1 - alpha) z_r, the released code's."""
    torch.manual_seed(0)
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    for fusion in ("probs", "logits"):
        torch.manual_seed(1)
        model = fastprompt.build("mmrl", copy.deepcopy(tiny_clip64), NAMES, alpha=alpha, fusion=fusion).double()
        with torch.no_grad():
            out = model(images)
        z_c, z_r = out.logits["main"].double(), out.logits["rep"].double()
        got = model.predict(out, "base").double()
        if fusion == "probs":
            torch.testing.assert_close(got.softmax(-1), alpha * z_c.softmax(-1) + (1 - alpha) * z_r.softmax(-1))
        else:
            torch.testing.assert_close(got, alpha * z_c + (1 - alpha) * z_r)
    assert fastprompt.method_options("mmrl")["fusion"] == "probs"
