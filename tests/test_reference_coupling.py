"""MaPLe's coupling and MPL's add / carry / remove against references written from METHODS.md §1.1, §3.4, §3.5.

The references call the frozen open_clip modules one by one (conv1, class and positional embeddings, ln_pre,
each resblock, ln_post, proj; token embedding, positional embedding, resblocks with CLIP's 77-token causal mask,
ln_final, EOT pooling, text_projection) and compute every coupling as x @ W^T + b themselves. Nothing of
fastprompt's splice, schedule, source or text code runs in them: only the trained values (prompt tokens, map
weights) are read from the built model's state dict, after a random perturbation so that no map equals another.
"""

import open_clip
import pytest
import torch
import torch.nn.functional as F

import fastprompt

NAMES = ["red circle", "blue square", "green triangle"]


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-16")


def perturbed(model):
    """Trained-looking values: every learnable tensor moved randomly (maps that start as copies now differ)."""
    with torch.no_grad():
        for p in model.method.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def affine(tokens, state, key):
    return tokens @ state[f"{key}.weight"].t() + state[f"{key}.bias"]


def run_vision(clip, images, splice, lengths):
    """CLIP's vision tower with `splice(layer, x)` editing the sequence before each layer (1-based); layer 1's
    splice runs after the positional embedding and before ln_pre. Records each layer's sequence length."""
    v = clip.visual
    x = v.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + v.positional_embedding
    x = v.ln_pre(splice(1, x))
    for i, block in enumerate(v.transformer.resblocks):
        if i:
            x = splice(i + 1, x)
        lengths.append(x.shape[1])
        x = block(x)
    return v.ln_post(x[:, 0]) @ v.proj


def run_text(clip, ids, slots_by_layer, n):
    """CLIP's text tower on the 77-token prompts; slots 1..n hold slots_by_layer[1] at the input (positional
    embedding added) and are overwritten by slots_by_layer[l] before layer l."""
    x = clip.token_embedding(ids)
    x = torch.cat([x[:, :1], slots_by_layer[1].expand(len(ids), -1, -1), x[:, 1 + n :]], dim=1)
    x = x + clip.positional_embedding
    for i, block in enumerate(clip.transformer.resblocks):
        if i and i + 1 in slots_by_layer:
            x = torch.cat([x[:, :1], slots_by_layer[i + 1].expand(len(ids), -1, -1), x[:, 1 + n :]], dim=1)
        x = block(x, attn_mask=clip.attn_mask)
    x = clip.ln_final(x)
    return x[torch.arange(len(ids)), ids.argmax(-1)] @ clip.text_projection


def logits(clip, image_features, text_features):
    return clip.logit_scale.exp() * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).t()


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=2e-5)


def test_maple_logits_equal_reference(tiny_clip, tokenizer):
    """§3.4: text slots 1..2 of "a photo of a {c}." hold P_l; vision tokens F_l(P_l) appended at layer 1 and
    replacing the last 2 in layers 2..9; carried through 10..12."""
    model = perturbed(fastprompt.build("maple", tiny_clip, NAMES))
    state = model.method.state_dict()
    images = torch.randn(2, 3, 32, 32)
    text_slots = {l: state[f"text_sources.{l}.tokens"] for l in range(1, 10)}
    vision_new = {l: affine(text_slots[l], state, f"vision_sources.{l}.mapping") for l in range(1, 10)}

    def splice(layer, x):
        if layer == 1:
            return torch.cat([x, vision_new[1].expand(len(x), -1, -1)], dim=1)
        if layer <= 9:
            return torch.cat([x[:, :-2], vision_new[layer].expand(len(x), -1, -1)], dim=1)
        return x

    lengths = []
    ids = tokenizer([f"a photo of a {c}." for c in NAMES])
    with torch.no_grad():
        f = run_vision(tiny_clip, images, splice, lengths)
        w = run_text(tiny_clip, ids, text_slots, 2)
        out = model(images)
    assert lengths == [17 + 2] * 12  # 1 CLS + 16 patches of the 32 px tiny model, + 2 prompts
    close(out.logits["main"], logits(tiny_clip, f, w))


def mpl_reference(clip, state, images, ids, n_first, n_add, n_remove, depth, lengths):
    """§3.5 (n_ctx = 1): layer 1 appends F_1^k(ctx_1), k < n_first; before layer l = 2..depth the outputs of the
    last n_remove prompts are discarded and G_l^k(P_l), k < n_add, appended; the rest is carried."""
    text_slots = {l: state[f"text_sources.{l}.tokens"] for l in range(1, depth + 1)}
    added = {1: [affine(text_slots[1], state, f"vision_sources.1.parts.{k}.mapping") for k in range(n_first)]}
    for l in range(2, depth + 1):
        added[l] = [affine(text_slots[l], state, f"vision_sources.{l}.parts.{k}.mapping") for k in range(n_add)]

    def splice(layer, x):
        if layer > depth:
            return x
        kept = x if layer == 1 else x[:, : x.shape[1] - n_remove]
        return torch.cat([kept, *(t.expand(len(x), -1, -1) for t in added[layer])], dim=1)

    with torch.no_grad():
        return run_vision(clip, images, splice, lengths), run_text(clip, ids, text_slots, 1)


@pytest.mark.parametrize("n_first", [2, 1], ids=["paper", "released-code"])
def test_mpl_default_carry_equals_reference(tiny_clip, tokenizer, n_first):
    """Defaults add 2 / remove 1 per layer to depth 9: the vision sequence grows by one token per layer."""
    model = perturbed(fastprompt.build("mpl", tiny_clip, NAMES, n_first=n_first))
    images = torch.randn(2, 3, 32, 32)
    ids = tokenizer([f"X a photo of a {c}." for c in NAMES])
    lengths = []
    f, w = mpl_reference(tiny_clip, model.method.state_dict(), images, ids, n_first, 2, 1, 9, lengths)
    # Segment after layer l: n_first + (l - 1) * (2 - 1); ViT-B/16 (197 tokens) gives 199..207 (paper) or
    # 198..206 (released code); the tiny model has 17 base tokens.
    segment = [n_first + l - 1 for l in range(1, 10)] + [n_first + 8] * 3
    assert lengths == [17 + s for s in segment]
    model.trace = []
    with torch.no_grad():
        out = model(images)
    assert [n for tower, _, n in model.trace if tower == "vision"] == lengths
    close(out.logits["main"], logits(tiny_clip, f, w))


@pytest.mark.parametrize("n_add,n_remove", [(2, 2), (3, 1), (2, 0)])
def test_mpl_other_schedules_equal_reference(tiny_clip, tokenizer, n_add, n_remove):
    model = perturbed(fastprompt.build("mpl", tiny_clip, NAMES, n_add=n_add, n_remove=n_remove, depth=4))
    images = torch.randn(1, 3, 32, 32)
    ids = tokenizer([f"X a photo of a {c}." for c in NAMES])
    f, w = mpl_reference(tiny_clip, model.method.state_dict(), images, ids, n_add, n_add, n_remove, 4, [])
    with torch.no_grad():
        out = model(images)
    close(out.logits["main"], logits(tiny_clip, f, w))
