"""Every method against METHODS.md: trainable parameter counts (§4) and per-layer sequence lengths (§1.4),
on a random-weight open_clip ViT-B-16."""

import pytest
import torch

import fastprompt

# METHODS.md §4 (ViT-B/16).
PARAM_COUNTS = [
    ("clip", {}, 0),
    ("coop", {}, 8_192),
    ("cocoop", {}, 35_360),
    ("ivlp", {}, 30_720),
    ("vpt_deep", {}, 73_728),
    ("promptsrc", {}, 46_080),
    ("maple", {}, 3_555_072),
    ("mpl", {}, 6_702_336),
    ("mudpt", {}, 1_243_136),
    ("mudpt", {"n_ctx": 2, "depth": 9}, 1_204_736),
    ("mmrl", {}, 4_992_256),
    ("mmrl", {"rep_dim": 32}, 689_056),
    # MCPL-CLIP is a reconstruction: PMS 9 x 164,736 + SA block 3,152,384 + 2 decoder layers 8,410,112
    # + projection 131,712 + prompts 9,216 (METHODS.md §4 says "about 13.2M").
    ("mcpl", {}, 1_482_624 + 3_152_384 + 8_410_112 + 131_712 + 9_216),
]


@pytest.mark.parametrize("name,options,expected", PARAM_COUNTS, ids=lambda v: str(v))
def test_trainable_parameter_count_vit_b16(vit_b16, name, options, expected):
    model = fastprompt.build(name, vit_b16, ["cat", "dog"], **options)
    assert sum(p.numel() for p in model.trainable_parameters()) == expected
    # Nothing of CLIP itself is trainable.
    assert not any(p.requires_grad for p in model.clip.parameters())


def _expected_vision(name):
    if name in ("clip", "coop", "cocoop", "deep_language"):
        return [197] * 12
    if name == "vpt_deep":
        return [205] * 12
    if name in ("ivlp", "maple", "mcpl"):
        return [199] * 12
    if name in ("mudpt", "promptsrc"):
        return [201] * 12
    if name == "mpl":
        return [197 + layer for layer in range(1, 10)] + [206] * 3
    if name == "mmrl":
        return [197] * 5 + [202] * 7
    raise KeyError(name)


@pytest.mark.parametrize("name", sorted(fastprompt.METHODS))
def test_layer_by_layer_sequence_lengths(vit_b16, name):
    model = fastprompt.build(name, vit_b16, ["cat", "dog"], truncate_text=False)
    model.trace = []
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    vision = [n for tower, _, n in model.trace if tower == "vision"]
    text = [n for tower, _, n in model.trace if tower == "text"]
    assert vision == _expected_vision(name)
    assert text == ([77] * 5 + [82] * 7 if name == "mmrl" else [77] * 12)
    # The schedule object predicts what ran.
    assert model.method.vision_schedule.sequence_lengths(197) == vision
    assert model.method.text_schedule.sequence_lengths(77) == text


def test_mpl_segment_matches_methods_md(vit_b16):
    """MPL: the segment before layer l (2..9) has length l; the first token added at each layer is carried."""
    model = fastprompt.build("mpl", vit_b16, ["cat"])
    assert model.method.vision_schedule.segment_lengths() == list(range(1, 10)) + [9, 9, 9]


def test_every_method_registered_and_unknown_name_lists_them(tiny_clip):
    expected = {"clip", "coop", "cocoop", "vpt_deep", "deep_language", "ivlp", "maple", "mpl", "mudpt", "mmrl",
                "promptsrc", "mcpl"}
    assert set(fastprompt.METHODS) == expected
    with pytest.raises(KeyError) as err:
        fastprompt.build("maple2", tiny_clip, ["cat"])
    for name in expected:
        assert name in str(err.value)
