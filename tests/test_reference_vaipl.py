"""MCPL-CLIP's logits against a reference written from METHODS.md §3.9 in plain torch, in float64.

Only parameter values are read from the built model. Everything else is computed here: the prompt
self-attention S and the PMS maps, the vision tokens (open_clip's frozen blocks run by hand with the
MaPLe splice rule), the text features (the 77-token template with open_clip's causal mask), the max-pooled
queries, the decoder layers (self-attention, cross-attention, MLP), the projection and the residual
integration w_{b,c} = w_c + u_{b,c}. The helpers are shared with test_method_mcpl.py.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import fastprompt
from fastprompt.backbones import create_clip

NAMES = ["red circle", "blue square", "green triangle", "yellow star", "purple cross"]
N_CTX, DEPTH = 2, 9


def layer_norm(x, ln):
    return F.layer_norm(x, (x.shape[-1],), ln.weight.detach(), ln.bias.detach(), eps=1e-5)


def linear(x, lin):
    return x @ lin.weight.detach().t() + lin.bias.detach()


def multihead(query, key_value, mha):
    """Scaled dot-product attention with nn.MultiheadAttention's parameter layout: [..., Lq, d] x [..., Lk, d]."""
    d, heads = mha.embed_dim, mha.num_heads
    w, b = mha.in_proj_weight.detach(), mha.in_proj_bias.detach()
    q, k, v = (x @ w[i * d : (i + 1) * d].t() + b[i * d : (i + 1) * d]
               for i, x in enumerate((query, key_value, key_value)))

    def split(x):  # [..., L, d] -> [..., H, L, d/H]
        return x.unflatten(-1, (heads, d // heads)).transpose(-3, -2)

    q, k, v = split(q), split(k), split(v)
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
    return linear((probs @ v).transpose(-3, -2).flatten(-2), mha.out_proj)


def self_attention_block(tokens, block):
    """S: pre-LN residual attention block with a QuickGELU MLP over a set of prompt tokens [n, d]."""
    x = tokens
    h = layer_norm(x, block.ln_1)
    x = x + multihead(h, h, block.attn)
    h = linear(layer_norm(x, block.ln_2), block.mlp.c_fc)
    return x + linear(h * torch.sigmoid(1.702 * h), block.mlp.c_proj)


def bottleneck(tokens, pms):
    """PMS-Standard: Linear -> ReLU -> Linear."""
    return linear(torch.relu(linear(tokens, pms[0])), pms[2])


def raw_prompts(method):
    """P_1..P_J: the free text prompt parameters of each layer."""
    out = {}
    for layer in range(1, DEPTH + 1):
        src = method.text_sources[str(layer)]
        out[layer] = getattr(src, "source", src).tokens.detach()
    return out


def vision_tokens(clip, images, prompts_by_layer):
    """All final vision tokens ln_post(x) @ proj [B, N, E]: layer-1 prompts appended after the positional
    embedding and before ln_pre, layers 2..J replace the last n tokens."""
    v = clip.visual
    x = v.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], 1) + v.positional_embedding
    x = v.ln_pre(torch.cat([x, prompts_by_layer[1].expand(x.shape[0], -1, -1)], 1))
    for i, blk in enumerate(v.transformer.resblocks):
        if 1 <= i < DEPTH:
            x = torch.cat([x[:, :-N_CTX], prompts_by_layer[i + 1].expand(x.shape[0], -1, -1)], 1)
        x = blk(x)
    return v.ln_post(x) @ v.proj


def text_input_embeds(clip, ids, slots):
    """Token embeddings of the class prompts with slots 1..n replaced by the layer-1 prompt (no positional)."""
    x = clip.token_embedding(ids)
    return torch.cat([x[:, :1], slots.expand(x.shape[0], -1, -1), x[:, 1 + N_CTX :]], 1)


def text_features(clip, ids, slots_by_layer):
    x = text_input_embeds(clip, ids, slots_by_layer[1]) + clip.positional_embedding
    for i, blk in enumerate(clip.transformer.resblocks):
        if 1 <= i < DEPTH:
            x = torch.cat([x[:, :1], slots_by_layer[i + 1].expand(x.shape[0], -1, -1), x[:, 1 + N_CTX :]], 1)
        x = blk(x, attn_mask=clip.attn_mask)
    x = clip.ln_final(x)
    return x[torch.arange(x.shape[0]), ids.argmax(-1)] @ clip.text_projection


def decode(queries, image_tokens, decoder):
    """queries [B, C, d] x image tokens [B, N, d] -> u [B, C, E]: N_d layers of self-attention over the queries,
    cross-attention to the image tokens and an MLP (exact GELU), each pre-LN and residual; then the projection."""
    q = queries
    for layer in decoder.layers:
        h = layer_norm(q, layer["ln_self"])
        q = q + multihead(h, h, layer["self_attn"])
        q = q + multihead(layer_norm(q, layer["ln_q"]), layer_norm(image_tokens, layer["ln_kv"]), layer["cross_attn"])
        mlp = layer["mlp"]
        q = q + linear(F.gelu(linear(layer_norm(q, layer["ln_mlp"]), mlp[0])), mlp[2])
    return bottleneck(q, decoder.proj)


def reference_logits(model, images, per_class=False):
    clip, m = model.clip, model.method
    ids = model.tokenizer([f"a photo of a {c}." for c in model.classnames])
    prompts = raw_prompts(m)
    attended = {l: self_attention_block(p, m.attention.block) for l, p in prompts.items()}
    z = vision_tokens(clip, images, {l: bottleneck(attended[l], m.pms[l - 1]) for l in attended})
    f, w = z[:, 0], text_features(clip, ids, attended)
    embeds = text_input_embeds(clip, ids, attended[1])
    valid = torch.arange(ids.shape[1])[None] <= ids.argmax(-1)[:, None]  # SOS..EOT
    queries = embeds.masked_fill(~valid[..., None], float("-inf")).amax(1)  # [C, d]
    queries = queries.expand(images.shape[0], -1, -1)
    if per_class:  # every class decoded alone: a query set of one
        u = torch.cat([decode(queries[:, c : c + 1], z, m.decoder) for c in range(queries.shape[1])], 1)
    else:
        u = decode(queries, z, m.decoder)
    cos = (F.normalize(f, dim=-1)[:, None] * F.normalize(w[None] + u, dim=-1)).sum(-1)
    return clip.logit_scale.exp() * cos


@pytest.fixture(scope="module")
def small_clip64():
    """Width 128: two heads in S and in the decoder, so the head split is exercised."""
    return create_clip("small").double()


@pytest.mark.parametrize("per_class", [False, True], ids=["across_classes", "per_class"])
def test_vaipl_logits_equal_the_plain_torch_reference(small_clip64, per_class):
    torch.manual_seed(0)
    model = fastprompt.build("mcpl", small_clip64, NAMES, per_class_decoding=per_class).double()
    for p in model.method.parameters():  # biases and LayerNorms away from their 0/1 init, so each one counts
        p.data.add_(0.05 * torch.randn_like(p))
    images = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = reference_logits(model, images, per_class)
        trained = model(images).logits["main"]  # training path: everything computed in the forward
        model.eval()
        cached = model(images).logits["main"]  # inference path: the class part from the cache
    torch.testing.assert_close(trained, expected.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached, expected.float(), rtol=1e-5, atol=1e-5)
