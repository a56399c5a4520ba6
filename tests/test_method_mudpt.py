"""MuDPT (METHODS.md §3.6, the paper's Sec. II-B): the cross-modal Injection Model against a hand-written
reference, the coupling of the two towers it creates, the parameter counts of shared and per-layer maps from
their arithmetic, the options and their errors, and the few-shot preset depth. The patched fast path of each
injection is in tests/test_patch.py, the grouped linear maps in tests/test_grouped_maps.py."""

import open_clip
import pytest
import torch

import fastprompt
from fastprompt.runner.presets import preset
from fastprompt.sources import SourceContext

NAMES = ["red circle", "blue square", "green triangle"]


@pytest.fixture(scope="module")
def uneven_clip64():
    """Text width 128 (2 heads of 64), vision width 192 (3 heads): the two directions differ in width and
    head count, as 512 / 768 do in ViT-B/16."""
    torch.manual_seed(0)
    clip = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=dict(image_size=32, layers=12, width=192, patch_size=16, head_width=64),
        text_cfg=dict(context_length=77, vocab_size=49408, width=128, heads=2, layers=12),
    )
    return clip.double().eval()


def reference_attention(query, context, weights):
    """Multi-head attention written out: queries from one modality's prompts, keys and values from the other
    modality's prompts projected to the query width, one head per 64 channels, then the output projection."""
    wq, bq, wk, bk, wv, bv, wo, bo = weights
    q, k, v = query @ wq.T + bq, context @ wk.T + bk, context @ wv.T + bv
    heads = []
    for h in range(query.shape[-1] // 64):
        cols = slice(64 * h, 64 * (h + 1))
        scores = q[:, cols] @ k[:, cols].T / 64**0.5
        heads.append(torch.softmax(scores, dim=-1) @ v[:, cols])
    return torch.cat(heads, dim=-1) @ wo.T + bo


def _weights(attention):
    return [t.detach() for lin in (attention.query, attention.key, attention.value, attention.out)
            for t in (lin.weight, lin.bias)]


@pytest.mark.parametrize("maps", ["shared", "per_layer"])
def test_spliced_prompts_equal_the_hand_written_cross_attention(uneven_clip64, maps):
    model = fastprompt.build("mudpt", uneven_clip64, NAMES, maps=maps).double()
    method = model.method
    with torch.no_grad():
        for p in method.parameters():  # away from the identical per-layer init, so a layer mix-up shows
            p.add_(0.05 * torch.randn_like(p))
        text = model._layer_tokens("text", SourceContext())
        vision = model._layer_tokens("vision", SourceContext())
    assert sorted(text) == sorted(vision) == list(range(1, 13))
    injections = set()
    for layer in range(1, 13):
        t = method.text_sources[str(layer)].first.tokens.detach()  # the free prompts T_l, V_l
        v = method.vision_sources[str(layer)].first.tokens.detach()
        injection = method.text_sources[str(layer)].second.layer.injection
        injections.add(id(injection))
        expected_text = t + reference_attention(t, v, _weights(injection.text_from_vision))
        expected_vision = v + reference_attention(v, t, _weights(injection.vision_from_text))
        torch.testing.assert_close(text[layer][0], expected_text, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(vision[layer][0], expected_vision, rtol=1e-10, atol=1e-12)
    assert len(injections) == (1 if maps == "shared" else 12)


def test_a_vision_prompt_changes_the_text_prompts_of_its_layer_and_vice_versa(tiny_clip):
    model = fastprompt.build("mudpt", tiny_clip, NAMES)
    method = model.method

    def prompts():
        with torch.no_grad():
            return ({k: v[0].clone() for k, v in model._layer_tokens("text", SourceContext()).items()},
                    {k: v[0].clone() for k, v in model._layer_tokens("vision", SourceContext()).items()})

    text_before, vision_before = prompts()
    with torch.no_grad():
        method.vision_sources["5"].first.tokens[2] += 1.0  # one token of V_5
    text_after, vision_after = prompts()
    assert not torch.allclose(text_after[5], text_before[5])
    assert all(torch.equal(text_after[l], text_before[l]) for l in range(1, 13) if l != 5)
    with torch.no_grad():
        method.text_sources["1"].first.tokens[0] += 1.0  # one token of T_1 (layer 1 is fused too)
    _, vision_last = prompts()
    assert not torch.allclose(vision_last[1], vision_after[1])
    assert all(torch.equal(vision_last[l], vision_after[l]) for l in range(2, 13))


def test_training_reaches_both_directions_of_the_injection(tiny_clip):
    model = fastprompt.build("mudpt", tiny_clip, NAMES)
    loss, _ = model.loss(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 2]))
    loss.backward()
    injection = model.method.text_sources["3"].second.layer.injection
    for side in (injection.text_from_vision, injection.vision_from_text):
        for lin in (side.query, side.key, side.value, side.out):
            assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def _linear(d_in, d_out):
    return d_in * d_out + d_out


def _cross_attention(d_query, d_context):
    return 2 * _linear(d_query, d_query) + 2 * _linear(d_context, d_query)  # Q, O; K, V


# ViT-B/16, n = 4, J = 12: prompts 12 x 4 x (512 + 768); linear maps E_0 and E_tv 512->768, E_vt 768->512.
PROMPTS = 12 * 4 * (512 + 768)
COUNTS = [
    ({"injection": "linear"}, PROMPTS + 2 * _linear(512, 768) + _linear(768, 512)),
    ({"injection": "linear", "maps": "per_layer"}, PROMPTS + 12 * _linear(512, 768) + 11 * _linear(768, 512)),
    ({}, PROMPTS + _cross_attention(512, 768) + _cross_attention(768, 512)),
    ({"maps": "per_layer"}, PROMPTS + 12 * (_cross_attention(512, 768) + _cross_attention(768, 512))),
]


@pytest.mark.parametrize("options,expected", COUNTS, ids=str)
def test_parameter_counts_of_shared_and_per_layer_maps(vit_b16, options, expected):
    model = fastprompt.build("mudpt", vit_b16, ["cat"], **options)
    assert sum(p.numel() for p in model.trainable_parameters()) == expected
    if options == {"injection": "linear"}:
        assert expected == 1_243_136  # METHODS.md §4


def test_per_layer_maps_start_identical_but_are_separate(tiny_clip):
    method = fastprompt.build("mudpt", tiny_clip, NAMES, injection="linear", maps="per_layer").method
    maps = [method.vision_sources[str(l)].second.mapping for l in range(2, 13)]
    assert len({id(m) for m in maps}) == 11
    assert all(torch.equal(m.weight, maps[0].weight) for m in maps)


def test_options_are_listed_and_bad_values_name_the_choices(tiny_clip):
    options = fastprompt.method_options("mudpt")
    assert options["injection"] == "cross_attention" and options["maps"] == "shared"
    with pytest.raises(ValueError, match="cross_attention, linear, self_attention.*'attention'.*self_attention"):
        fastprompt.build("mudpt", tiny_clip, NAMES, injection="attention")
    with pytest.raises(ValueError, match="shared, per_layer; got 'layer'"):
        fastprompt.build("mudpt", tiny_clip, NAMES, maps="layer")


def test_cross_attention_has_no_grouped_couplings(tiny_clip):
    model = fastprompt.build("mudpt", tiny_clip, NAMES)
    model.use_grouped_maps = True
    assert model.grouped_maps() is None


@pytest.mark.parametrize("dataset", ["dtd", "imagenet"])
def test_fewshot_preset_uses_the_papers_depth_12(dataset):
    # The paper's few-shot protocol: "prompt tuning depth of 12"; the other protocols keep the released J = 9.
    assert preset("mudpt", "fewshot", dataset, 16)[1]["depth"] == 12
    for protocol in ("b2n", "xd", "dg"):
        assert preset("mudpt", protocol, dataset, 16)[1]["depth"] == 9


@pytest.mark.parametrize("maps,calls", [("shared", 2), ("per_layer", 24)])
def test_a_shared_injection_runs_all_layers_in_one_batched_call(tiny_clip, monkeypatch, maps, calls):
    """maps='shared': the 12 layers' pairs come from one batched attention per direction (2 calls per forward, not
    24), computing what the per-layer calls compute (the reference test above holds for both)."""
    from fastprompt.methods.mudpt import CrossAttention

    seen = []
    original = CrossAttention.forward
    monkeypatch.setattr(CrossAttention, "forward", lambda self, q, c: seen.append(tuple(q.shape)) or original(self, q, c))
    model = fastprompt.build("mudpt", tiny_clip, NAMES, maps=maps)
    model(torch.randn(2, 3, 32, 32))
    assert len(seen) == calls
    if maps == "shared":
        assert all(shape[0] == 12 for shape in seen)  # [layers, n, d]


@pytest.mark.parametrize("maps,adds", [("shared", 2), ("per_layer", 24)])
def test_eq7_sums_are_one_add_per_tower_with_a_shared_injection(tiny_clip, maps, adds):
    """T_l + T~_l and V_l + V~_l for all 12 layers: one add per tower when the injection is shared (the sum of the
    stacked layers; the values are the reference test's above), one per layer and tower otherwise."""
    from bench.host import OpCounter

    model = fastprompt.build("mudpt", tiny_clip, NAMES, maps=maps)
    ctx = SourceContext()
    with OpCounter() as seen:
        model._layer_tokens("text", ctx)
        model._layer_tokens("vision", ctx)
    assert seen.ops["aten::add"] == adds
