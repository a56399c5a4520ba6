"""Every method against METHODS.md: trainable parameter counts (§4) and per-layer sequence lengths (§1.4),
on a random-weight open_clip ViT-B-16."""

import pytest
import torch

import fastprompt

# MCPL-CLIP (a reconstruction, METHODS.md §3.9) counted from the paper's description on ViT-B/16: text width 512,
# vision width 768, n = 2 prompts in each of J = 9 layers.
_T, _V, _N, _J = 512, 768, 2, 9
_PMS = (_T * 128 + 128) + (128 * _V + _V)  # PMS-Standard: Linear(512->128) -> ReLU -> Linear(128->768)
_LN = 2 * _T
_MHA = (3 * _T * _T + 3 * _T) + (_T * _T + _T)  # q/k/v and output projections, with biases
_MLP = (_T * 4 * _T + 4 * _T) + (4 * _T * _T + _T)  # Linear(512->2048) -> activation -> Linear(2048->512)
_SA = 2 * _LN + _MHA + _MLP  # the prompt self-attention: one pre-LN transformer block
_DECODER_LAYER = _LN + _MHA + 2 * _LN + _MHA + _LN + _MLP  # LN+self-attn, LN(q), LN(Z)+cross-attn, LN+MLP
_VAIPL_PROJ = (_T * 128 + 128) + (128 * _T + _T)  # the non-linear projection 512 -> 128 -> 512
_MCPL = _J * _PMS + _SA + 2 * _DECODER_LAYER + _VAIPL_PROJ + _J * _N * _T  # VAIPL-Standard: 2 decoder layers

# METHODS.md §4 (ViT-B/16).
PARAM_COUNTS = [
    ("clip", {}, 0),
    ("coop", {}, 8_192),
    ("cocoop", {}, 35_360),
    ("ivlp", {}, 30_720),
    ("vpt_deep", {}, 73_728),
    ("promptsrc", {}, 46_080),
    ("maple", {}, 3_555_072),
    # MPL: 9 text tokens + (2 at layer 1 + 2 per layer 2..9) Linears 512->768 (paper); the released code's
    # single layer-1 token (n_first=1) is one Linear fewer.
    ("mpl", {}, 9 * 512 + 18 * (512 * 768 + 768)),
    ("mpl", {"n_first": 1}, 6_702_336),
    ("mudpt", {"injection": "linear"}, 1_243_136),
    ("mudpt", {"injection": "linear", "n_ctx": 2, "depth": 9}, 1_204_736),
    # MuDPT's default cross-modal attention, one Injection Model for all 12 layers: prompts 12 x 4 x (512 + 768);
    # text side Q, O 512->512 and K, V 768->512; vision side Q, O 768->768 and K, V 512->768 (weights + biases).
    ("mudpt", {}, 12 * 4 * (512 + 768) + 2 * (512 * 512 + 512) + 2 * (768 * 512 + 512)
     + 2 * (768 * 768 + 768) + 2 * (512 * 768 + 768)),
    ("mmrl", {}, 4_992_256),
    ("mmrl", {"rep_dim": 32}, 689_056),
    # MMRL ablations (Tab. 4), from the paper's description: R 5 x 512, 7 layers (6..12) of maps 512->768 and/or
    # 512->512, proj_rep 768 x 512 while vision tokens exist; w/o RS: free 5-token blocks per layer and tower.
    ("mmrl", {"towers": "vision"}, 5 * 512 + 7 * (512 * 768 + 768) + 768 * 512),
    ("mmrl", {"towers": "text"}, 5 * 512 + 7 * (512 * 512 + 512)),
    ("mmrl", {"space": "separate"}, 7 * 5 * (768 + 512) + 768 * 512),
    ("mmrl", {"space": "text_to_vision"}, 7 * 5 * 512 + 7 * (512 * 768 + 768) + 768 * 512),
    ("mcpl", {}, _MCPL),  # METHODS.md §4 says "about 13.2M"
    ("mcpl", {"shared_pms": True}, _MCPL - (_J - 1) * _PMS),  # one PMS for all layers
    ("mcpl", {"pms": "none"}, _MCPL - _J * _PMS),  # text prompts used as visual prompts: no map
    ("mcpl", {"free_visual_prompts": True}, _MCPL + _J * _N * _V),  # plus a free [2, 768] block per layer
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
        return [198 + layer for layer in range(1, 10)] + [207] * 3
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
    """MPL: the segment at layer l (1..9) has length l + 1 (2 added, 1 removed per layer); the first token added
    at each layer is carried. The released code's single layer-1 token gives length l."""
    model = fastprompt.build("mpl", vit_b16, ["cat"])
    assert model.method.vision_schedule.segment_lengths() == list(range(2, 11)) + [10, 10, 10]
    model = fastprompt.build("mpl", vit_b16, ["cat"], n_first=1)
    assert model.method.vision_schedule.segment_lengths() == list(range(1, 10)) + [9, 9, 9]


def test_every_method_registered_and_unknown_name_lists_them(tiny_clip):
    expected = {"clip", "coop", "cocoop", "vpt_deep", "deep_language", "ivlp", "maple", "mpl", "mudpt", "mmrl",
                "promptsrc", "mcpl"}
    assert set(fastprompt.METHODS) == expected
    with pytest.raises(KeyError) as err:
        fastprompt.build("maple2", tiny_clip, ["cat"])
    for name in expected:
        assert name in str(err.value)
