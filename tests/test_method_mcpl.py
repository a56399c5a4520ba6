"""MCPL-CLIP's options (fastprompt/methods/mcpl): each does what its docstring says, checked against plain-torch
computations from METHODS.md §3.9 (helpers in test_reference_vaipl.py). Float64 on the tiny CLIP. The patched fast
path against the eager path for each option is in tests/test_patch.py, the grouped PMS launch in
tests/test_grouped_maps.py."""

import open_clip
import pytest
import torch
import torch.nn.functional as F
from test_reference_vaipl import (
    N_CTX,
    bottleneck,
    raw_prompts,
    self_attention_block,
    text_features,
    text_input_embeds,
    vision_tokens,
)

import fastprompt

NAMES = ["red circle", "blue square", "green triangle", "yellow star", "purple cross"]


def images64(n=2, size=32):
    return torch.randn(n, 3, size, size, dtype=torch.float64)


def class_ids(model):
    return model.tokenizer([f"a photo of a {c}." for c in model.classnames])


def close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def count(model):
    return sum(p.numel() for p in model.trainable_parameters())


@pytest.mark.parametrize("sa_to_text", [True, False])
def test_sa_to_text_chooses_attended_or_raw_prompts_for_the_text_tower(tiny_clip64, sa_to_text):
    model = fastprompt.build("mcpl", tiny_clip64, NAMES, sa_to_text=sa_to_text).double()
    m = model.method
    prompts = raw_prompts(m)
    attended = {l: self_attention_block(p, m.attention.block) for l, p in prompts.items()}
    images = images64()
    with torch.no_grad():
        out = model(images)
        close(out.text_features, text_features(tiny_clip64, class_ids(model), attended if sa_to_text else prompts))
        # The vision tower reads PMS(S(P_l)) either way.
        mapped = {l: bottleneck(attended[l], m.pms[l - 1]) for l in attended}
        close(out.image_features, vision_tokens(tiny_clip64, images, mapped)[:, 0])


def test_sa_to_text_is_on_by_default():
    # "we add self-attention to the text encoder ... enriching text"
    assert fastprompt.method_options("mcpl")["sa_to_text"] is True


@pytest.mark.parametrize("free", [False, True])
def test_visual_prompts_are_mapped_prompts_plus_an_optional_free_block(tiny_clip64, free):
    model = fastprompt.build("mcpl", tiny_clip64, NAMES, free_visual_prompts=free).double()
    m = model.method
    attended = {l: self_attention_block(p, m.attention.block) for l, p in raw_prompts(m).items()}
    for layer, tokens in attended.items():
        source = m.vision_sources[str(layer)]
        expected = bottleneck(tokens, m.pms[layer - 1])
        if free:
            expected = expected + source.first.tokens.detach()
        close(source(None).detach(), expected)
    baseline = fastprompt.build("mcpl", tiny_clip64, NAMES)
    extra = count(model) - count(baseline)
    assert extra == (9 * N_CTX * 64 if free else 0)  # one free [n, d_v] block per prompted layer


@pytest.mark.parametrize("per_class", [False, True])
def test_per_class_decoding_makes_a_class_logits_independent_of_the_class_set(tiny_clip64, per_class):
    model = fastprompt.build("mcpl", tiny_clip64, NAMES, per_class_decoding=per_class).double().eval()
    images = images64(3)
    with torch.no_grad():
        all_five = model(images).logits["main"]
        model.set_classnames([NAMES[3], NAMES[1]])
        two = model(images).logits["main"]
    difference = (two - all_five[:, [3, 1]]).abs().max().item()
    if per_class:
        assert difference < 1e-10
    else:  # the decoder's self-attention mixes the class queries
        assert difference > 1e-4


def uneven_clip(text_width=64, vision_width=96):
    """A random CLIP whose towers and embedding differ in width (ViT-B/16: text 512, vision 768, embed 512)."""
    torch.manual_seed(0)
    clip = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=dict(image_size=32, layers=12, width=vision_width, patch_size=8, head_width=32),
        text_cfg=dict(context_length=77, vocab_size=49408, width=text_width, heads=2, layers=12),
    )
    return clip.double().eval()


def test_pms_none_uses_the_text_prompts_as_visual_prompts_padded_with_zeros():
    clip = uneven_clip()
    model = fastprompt.build("mcpl", clip, NAMES, pms="none").double()
    m = model.method
    for layer, tokens in raw_prompts(m).items():
        attended = self_attention_block(tokens, m.attention.block)
        visual = m.vision_sources[str(layer)](None).detach()
        close(visual, torch.cat([attended, torch.zeros(N_CTX, 32, dtype=attended.dtype)], -1))
        # With sa_to_text (default) the text tower holds exactly these vectors.
        close(m.text_sources[str(layer)](None).detach(), visual[:, :64])
    standard = fastprompt.build("mcpl", clip, NAMES)
    saved = count(standard) - count(model)
    assert saved == 9 * ((64 * 128 + 128) + (128 * 96 + 96))  # nine PMS-Standard maps 64 -> 128 -> 96, no others
    model(images64())  # runs end to end
    with pytest.raises(ValueError, match="vision width .96. to be at least the text width .128."):
        fastprompt.build("mcpl", uneven_clip(text_width=128), NAMES, pms="none")


@pytest.mark.parametrize("cmpp_mean", ["per_class", "all_classes"])
def test_cmpp_adds_the_mean_text_input_embedding_to_the_image_feature(tiny_clip64, cmpp_mean):
    model = fastprompt.build("mcpl", tiny_clip64, NAMES, fusion="cmpp", cmpp_mean=cmpp_mean).double()
    m = model.method
    ids = class_ids(model)
    with torch.no_grad():
        out = model(images64())
        embeds = text_input_embeds(tiny_clip64, ids, self_attention_block(raw_prompts(m)[1], m.attention.block))
        valid = (torch.arange(ids.shape[1])[None] <= ids.argmax(-1)[:, None]).double()[..., None]  # SOS..EOT
        if cmpp_mean == "per_class":  # f_{b,c} = f_b + mean_c, compared with w_c
            mean = (embeds * valid).sum(1) / valid.sum(1)  # [C, d]
            f = out.image_features[:, None] + mean[None]
        else:  # one mean over every class's tokens, added to every image feature
            mean = (embeds * valid).sum((0, 1)) / valid.sum()
            f = (out.image_features + mean)[:, None]
        cos = (F.normalize(f, dim=-1) * F.normalize(out.text_features, dim=-1)[None]).sum(-1)
        close(out.logits["main"], (tiny_clip64.logit_scale.exp() * cos).float(), tol=1e-5)
        model.eval()
        close(model(out.images).logits["main"], out.logits["main"], tol=1e-6)  # the cached class means
    assert fastprompt.method_options("mcpl")["cmpp_mean"] == "per_class"


def test_shared_pms_is_one_map_for_every_layer_and_predicts_fewer_parameter_bytes(tiny_clip64):
    model = fastprompt.build("mcpl", tiny_clip64, NAMES, shared_pms=True).double()
    m = model.method
    for layer, tokens in raw_prompts(m).items():
        attended = self_attention_block(tokens, m.attention.block)
        close(m.vision_sources[str(layer)](None).detach(), bottleneck(attended, m.pms))
    per_layer = fastprompt.build("mcpl", tiny_clip64, NAMES)
    pms = (64 * 128 + 128) + (128 * 64 + 64)
    assert count(per_layer) - count(model) == 8 * pms

    from fastprompt.memory import predict_for

    key = "trainable parameters, gradients, optimizer state"
    names = ["cat", "dog", "car"]
    separate = predict_for("mcpl", names, batch=4, device="cpu").parts[key]
    shared = predict_for("mcpl", names, batch=4, device="cpu", method_options={"shared_pms": True}).parts[key]
    vit_b16_pms = (512 * 128 + 128) + (128 * 768 + 768)
    saved = separate - shared
    # Eight PMS maps fewer, each held at least as fp32 weights and fp32 gradients.
    assert saved % (8 * vit_b16_pms) == 0 and saved >= 8 * vit_b16_pms * 8


@pytest.mark.parametrize("options,message", [
    (dict(pms="tiny"), "pms must be one of .*'none'"),
    (dict(cmpp_mean="mean"), "cmpp_mean must be one of"),
    (dict(per_class_decoding=True, fusion="cmpp"), "per_class_decoding applies to VAIPL"),
    (dict(cmpp_mean="all_classes"), "cmpp_mean applies to fusion='cmpp' only"),
    (dict(shared_pms=True, pms="none"), "no PMS to share"),
])
def test_bad_options_name_the_problem(tiny_clip, options, message):
    with pytest.raises(ValueError, match=message):
        fastprompt.build("mcpl", tiny_clip, NAMES, **options)
