"""The general model against independent computations, in float64 on the tiny CLIP.

Each reference below is written straight from METHODS.md with open_clip's own modules and its own
77-token causal mask, so a splice, positional-embedding, mask or pooling mistake in the engine shows up.
"""

import dataclasses

import pytest
import torch

import fastprompt
from fastprompt.method import cosine_logits

NAMES = ["red circle", "blue square", "green triangle", "yellow star", "purple cross"]


def images64(n=3, size=32):
    return torch.randn(n, 3, size, size, dtype=torch.float64)


def close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def reference_vision(clip, images, tokens_by_layer, n, depth):
    """MaPLe/IVLP rule: layer-1 prompts appended after the positional embedding and before ln_pre; layers
    2..depth replace the last n tokens; CLS pooled after ln_post."""
    v = clip.visual
    x = v.conv1(images).flatten(2).transpose(1, 2)
    cls = v.class_embedding.expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1) + v.positional_embedding
    x = v.ln_pre(torch.cat([x, tokens_by_layer[1].expand(x.shape[0], -1, -1)], 1))
    for i, blk in enumerate(v.transformer.resblocks):
        if 1 <= i < depth:
            x = torch.cat([x[:, :-n], tokens_by_layer[i + 1].expand(x.shape[0], -1, -1)], 1)
        x = blk(x)
    return v.ln_post(x[:, 0]) @ v.proj


def reference_text(clip, tokens77, slots_by_layer, n, depth):
    """Text replace rule on the full 77 tokens with open_clip's causal mask and argmax (EOT) pooling."""
    x = clip.token_embedding(tokens77)
    x = torch.cat([x[:, :1], slots_by_layer[1].expand(x.shape[0], -1, -1), x[:, 1 + n :]], 1)
    x = x + clip.positional_embedding
    for i, blk in enumerate(clip.transformer.resblocks):
        if 1 <= i < depth:
            x = torch.cat([x[:, :1], slots_by_layer[i + 1].expand(x.shape[0], -1, -1), x[:, 1 + n :]], 1)
        x = blk(x, attn_mask=clip.attn_mask)
    x = clip.ln_final(x)
    return x[torch.arange(x.shape[0]), tokens77.argmax(-1)] @ clip.text_projection


def test_no_prompts_equals_open_clip_zero_shot(tiny_clip64):
    model = fastprompt.build("clip", tiny_clip64, NAMES)
    imgs = images64()
    out = model(imgs)
    tok = model.tokenizer([f"a photo of a {c}." for c in NAMES])
    f = tiny_clip64.encode_image(imgs, normalize=True)
    w = tiny_clip64.encode_text(tok, normalize=True)
    close(out.logits["main"], (tiny_clip64.logit_scale.exp() * f @ w.t()).float(), tol=1e-5)
    close(out.image_features, tiny_clip64.encode_image(imgs))
    close(out.text_features, tiny_clip64.encode_text(tok))


@pytest.mark.parametrize("truncate", [True, False])
def test_maple_equals_reference(tiny_clip64, truncate):
    model = fastprompt.build("maple", tiny_clip64, NAMES, truncate_text=truncate).double()
    imgs = images64()
    out = model(imgs)
    m = model.method
    text_tokens = {l: m.text_sources[str(l)](None) for l in range(1, 10)}
    vision_tokens = {l: m.vision_sources[str(l)](None) for l in range(1, 10)}
    close(out.image_features, reference_vision(tiny_clip64, imgs, vision_tokens, 2, 9))
    close(out.text_features, reference_text(tiny_clip64, model.prompts.tokens, text_tokens, 2, 9))


def test_text_cut_after_last_eot_gives_same_features_and_gradients(tiny_clip64):
    imgs, labels = images64(), torch.tensor([0, 3, 4])
    results = []
    for truncate in (True, False):
        torch.manual_seed(1)
        model = fastprompt.build("maple", tiny_clip64, NAMES, truncate_text=truncate).double()
        out = model(imgs)
        loss, _ = model.loss(out, labels)
        loss.backward()
        results.append((out.text_features.detach(), {n: p.grad.clone() for n, p in model.method.named_parameters()}))
    (t1, g1), (t2, g2) = results
    close(t1, t2)
    assert g1.keys() == g2.keys()
    for name in g1:
        close(g1[name], g2[name])


def test_mpl_with_add_equal_drop_equals_vpt_deep(tiny_clip64):
    """MPL with add = remove = 1 is deep VPT whose per-layer tokens are the coupled maps' outputs."""
    imgs = images64()
    mpl = fastprompt.build("mpl", tiny_clip64, NAMES, n_add=1, n_remove=1).double()
    vpt = fastprompt.build("vpt_deep", tiny_clip64, NAMES, n_vision=1, vision_depth=9).double()
    with torch.no_grad():
        for layer in range(1, 10):
            vpt.method.vision_sources[str(layer)].tokens.copy_(mpl.method.vision_sources[str(layer)](None))
    assert mpl.method.vision_schedule.edits == vpt.method.vision_schedule.edits
    close(mpl(imgs).image_features, vpt(imgs).image_features)


def test_vision_head_and_tail_sites_give_the_same_logits(tiny_clip64):
    imgs = images64()
    tail = fastprompt.build("ivlp", tiny_clip64, NAMES).double()
    head = fastprompt.build("ivlp", tiny_clip64, NAMES).double()
    head.method.load_state_dict(tail.method.state_dict())
    head.method.vision_schedule = dataclasses.replace(tail.method.vision_schedule, site="head")
    a, b = tail(imgs), head(imgs)
    close(a.logits["main"], b.logits["main"], tol=1e-9)
    assert a.vision_segment != b.vision_segment  # the prompts really sat elsewhere


def test_mmrl_inserted_tokens_shift_the_pooled_index(tiny_clip64):
    model = fastprompt.build("mmrl", tiny_clip64, NAMES, truncate_text=False).double()
    m = model.method
    out = model(images64())
    clip = tiny_clip64
    tokens = model.prompts.tokens
    # Reference: plain CLIP through layer 5, insert K=5 mapped tokens after SOS at layer 6 (no positional
    # embedding, mask rebuilt for 82), replace them in 7..12, pool at EOT + 5.
    x = clip.token_embedding(tokens) + clip.positional_embedding
    for i, blk in enumerate(clip.transformer.resblocks):
        layer = i + 1
        if layer >= 6:
            new = m.text_sources[str(layer)](None).expand(x.shape[0], -1, -1)
            keep = x[:, 1 + 5 :] if layer > 6 else x[:, 1:]
            x = torch.cat([x[:, :1], new, keep], 1)
        mask = torch.full((x.shape[1],) * 2, float("-inf"), dtype=x.dtype).triu(1)
        x = blk(x, attn_mask=mask)
    x = clip.ln_final(x)
    rows = torch.arange(x.shape[0])
    shifted = x[rows, tokens.argmax(-1) + 5] @ clip.text_projection
    unshifted = x[rows, tokens.argmax(-1)] @ clip.text_projection
    close(out.text_features, shifted)
    assert (out.text_features - unshifted).abs().max() > 1e-3


def test_mmrl_rep_head_and_decoupled_inference(tiny_clip64):
    model = fastprompt.build("mmrl", tiny_clip64, NAMES).double()
    out = model(images64())
    start, length = out.vision_segment
    assert (start, length) == (1, 5)
    rep = out.vision_tokens[:, 1:6].mean(1) @ model.method.proj_rep
    close(out.logits["rep"], cosine_logits(rep, out.text_features, out.logit_scale))
    close(model.predict(out, "novel"), out.logits["main"])
    # The paper's fusion (default): log(0.7 softmax(z_c) + 0.3 softmax(z_r)); the released code's fuses logits.
    # (The heads' logits are fp32 here: fp32 rounding between the two ways of writing the mixture.)
    fused = torch.log(0.7 * out.logits["main"].double().softmax(-1) + 0.3 * out.logits["rep"].double().softmax(-1))
    torch.testing.assert_close(model.predict(out, "base").double(), fused, rtol=1e-6, atol=1e-6)
    model.method.fusion = "logits"
    close(model.predict(out, "base"), 0.7 * out.logits["main"] + 0.3 * out.logits["rep"])


def test_cocoop_equals_per_image_reference(tiny_clip64):
    """CoCoOp: ctx + meta-net(normalised frozen image feature) on every slot; one text pass per (image, class)."""
    model = fastprompt.build("cocoop", tiny_clip64, NAMES).double()
    imgs = images64(2)
    out = model(imgs)
    src = model.method.text_sources["1"]
    f = tiny_clip64.encode_image(imgs, normalize=True)
    for b in range(2):
        ctx_b = {1: src.base.tokens + src.net(f[b])}
        w = reference_text(tiny_clip64, model.prompts.tokens, ctx_b, 4, 1)
        close(out.text_features[b], w)
    assert out.logits["main"].shape == (2, len(NAMES))


def test_class_names_can_change_for_novel_evaluation(tiny_clip64):
    model = fastprompt.build("maple", tiny_clip64, NAMES[:3]).double()
    imgs = images64(2)
    model.set_classnames(NAMES[3:])
    out = model(imgs)
    ref = fastprompt.build("maple", tiny_clip64, NAMES[3:]).double()
    ref.method.load_state_dict(model.method.state_dict())
    close(out.logits["main"], ref(imgs).logits["main"])


def test_eval_text_cache_tracks_parameter_updates(tiny_clip64):
    model = fastprompt.build("coop", tiny_clip64, NAMES).double().eval()
    imgs = images64(1)
    with torch.no_grad():
        first = model(imgs).text_features.clone()
        # (a random change: a constant shift of a token would be removed by every LayerNorm)
        model.method.text_sources["1"].tokens.add_(torch.randn_like(model.method.text_sources["1"].tokens))
        second = model(imgs).text_features
    assert (first - second).abs().max() > 1e-4


def test_vaipl_attention_equals_nn_multihead_attention():
    """MCPL's decoder runs nn.MultiheadAttention's parameters through fastprompt's attention op."""
    from fastprompt.methods.mcpl import _multihead

    mha = torch.nn.MultiheadAttention(64, 2, batch_first=True).double()
    queries = torch.randn(1, 7, 64, dtype=torch.float64)  # C = 7 class queries shared by the images
    tokens = torch.randn(3, 11, 64, dtype=torch.float64)  # B = 3 images of N = 11 tokens
    expected = mha(queries.expand(3, -1, -1), tokens, tokens, need_weights=False)[0]
    close(_multihead(mha, queries, tokens), expected)


def test_mcpl_post_integration_adds_vaipl_features_to_class_features(tiny_clip64):
    from fastprompt.methods.mcpl import max_pooled_queries

    model = fastprompt.build("mcpl", tiny_clip64, NAMES).double()
    out = model(images64(2))
    m = model.method
    u = m.decoder(max_pooled_queries(out.text_input_embeds, out.text_lengths), out.vision_tokens @ out.vision_proj)
    expected = cosine_logits(out.image_features, out.text_features[None] + u, out.logit_scale)
    close(out.logits["main"], expected)
