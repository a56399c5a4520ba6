"""VAIPL's parts: the class queries, the transformer decoder over the image tokens, the input-level integration,
and the CMPP baseline's pooled text embeddings (METHODS.md §3.9)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...sources import SourceContext, TokenSource

if TYPE_CHECKING:
    from . import MCPLCLIP


def _project_queries(attn: nn.MultiheadAttention, query: torch.Tensor) -> torch.Tensor:
    """The query projection of nn.MultiheadAttention, as [..., L, H, head_dim]."""
    d = attn.embed_dim
    q = F.linear(query, attn.in_proj_weight[:d], attn.in_proj_bias[:d])
    return q.unflatten(-1, (attn.num_heads, d // attn.num_heads))


def _attend(attn: nn.MultiheadAttention, q: torch.Tensor, key_value: torch.Tensor) -> torch.Tensor:
    """nn.MultiheadAttention's math from projected queries `q` [1 or B, Lq, H, hd] through fastprompt's attention
    op (flash-style on GPU): the B x H x C x N probabilities of the class-query x image-token attention are never
    materialised. Keys and values come from one GEMM."""
    from ...ops.attention import attention

    d, heads = attn.embed_dim, attn.num_heads
    kv = F.linear(key_value, attn.in_proj_weight[d:], attn.in_proj_bias[d:])
    k, v = kv.unflatten(-1, (2, heads, d // heads)).unbind(-3)
    if q.shape[0] != k.shape[0]:
        q = q.expand(k.shape[0], -1, -1, -1)
    o = attention(q, k, v, causal=False)
    return attn.out_proj(o.flatten(-2))


def _multihead(attn: nn.MultiheadAttention, query: torch.Tensor, key_value: torch.Tensor) -> torch.Tensor:
    """nn.MultiheadAttention(query, key_value, key_value) without its weights (see _attend)."""
    return _attend(attn, _project_queries(attn, query), key_value)


def _attend_to_itself(attn: nn.MultiheadAttention, h: torch.Tensor) -> torch.Tensor:
    """Self-attention of each query over a set holding only itself: the softmax over one key is 1, so the output
    is out_proj(value(h)). This is what decoding every class alone computes, without a launch per class."""
    d = attn.embed_dim
    return attn.out_proj(F.linear(h, attn.in_proj_weight[2 * d :], attn.in_proj_bias[2 * d :]))


class VAIPLDecoder(nn.Module):
    """Queries [C, d] x image tokens [B, N, d] -> prompt features u [B, C, d_out].

    Each layer: q += SelfAttn(LN q) over the classes; q += CrossAttn(LN q, LN Z_b); q += MLP(LN q).
    Then Linear -> ReLU -> Linear. The first layer's self-attention and cross-attention queries are
    image-independent: they run once per forward (`prepare`), or once per class set at inference.

    The self-attention mixes the class queries, so a class's u (and logit) depends on which other classes are
    evaluated. `per_class=True` decodes every class alone (its self-attention sees only itself): logits then
    depend on the class and the image only, whatever class set is evaluated.
    """

    def __init__(self, width: int, layers: int = 2, out_dim: int | None = None, hidden: int = 128,
                 per_class: bool = False):
        super().__init__()
        if not 1 <= layers <= 3:
            raise ValueError(f"decoder_layers must be 1, 2 or 3, got {layers}")
        heads = max(1, width // 64)
        self.per_class = per_class
        self.layers = nn.ModuleList()
        for _ in range(layers):
            self.layers.append(
                nn.ModuleDict(
                    dict(
                        ln_self=nn.LayerNorm(width),
                        self_attn=nn.MultiheadAttention(width, heads, batch_first=True),
                        ln_q=nn.LayerNorm(width),
                        ln_kv=nn.LayerNorm(width),
                        cross_attn=nn.MultiheadAttention(width, heads, batch_first=True),
                        ln_mlp=nn.LayerNorm(width),
                        mlp=nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)),
                    )
                )
            )
        self.proj = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, out_dim or width))

    def _self_attention(self, layer: nn.ModuleDict, q: torch.Tensor) -> torch.Tensor:
        h = layer["ln_self"](q)
        if self.per_class:
            return _attend_to_itself(layer["self_attn"], h)
        return _multihead(layer["self_attn"], h, h)

    def prepare(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The class-only part, [C, d] -> ([1, C, d], [1, C, H, hd]): layer 1's self-attention over the classes and
        its cross-attention queries. Inference computes it once per class set (MCPLCLIP.class_state)."""
        layer = self.layers[0]
        q = queries.unsqueeze(0)
        q = q + self._self_attention(layer, q)
        return q, _project_queries(layer["cross_attn"], layer["ln_q"](q))

    def forward(self, queries: torch.Tensor | None, image_tokens: torch.Tensor, prepared=None) -> torch.Tensor:
        q, cross_q = prepared if prepared is not None else self.prepare(queries)
        for i, layer in enumerate(self.layers):
            if i > 0:  # from here on the queries are per image: [B, C, d]
                q = q + self._self_attention(layer, q)
                cross_q = _project_queries(layer["cross_attn"], layer["ln_q"](q))
            q = q + _attend(layer["cross_attn"], cross_q, layer["ln_kv"](image_tokens))  # [1, C, d] grows to [B, C, d]
            q = q + layer["mlp"](layer["ln_mlp"](q))
        return self.proj(q)


def _valid_positions(input_embeds: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[C, L] True at each class prompt's SOS..EOT positions."""
    positions = torch.arange(input_embeds.shape[1], device=input_embeds.device)
    return positions[None, :] < lengths[:, None]


def max_pooled_queries(input_embeds: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Max over the valid positions (SOS..EOT) of each class's text input embeddings: [C, L, d] -> [C, d]."""
    valid = _valid_positions(input_embeds, lengths)
    return input_embeds.masked_fill(~valid[..., None], float("-inf")).amax(dim=1)


def mean_text_embeddings(input_embeds: torch.Tensor, lengths: torch.Tensor, per_class: bool) -> torch.Tensor:
    """CMPP's average of the text input embeddings over the valid positions (fp32): each class's own mean [C, d]
    (`per_class`), or one mean over every class's tokens [d]."""
    valid = _valid_positions(input_embeds, lengths)[..., None]
    summed = (input_embeds.float() * valid).sum(dim=1)  # [C, d]
    if per_class:
        return summed / lengths[:, None].to(summed.dtype)
    return summed.sum(dim=0) / valid.sum()


class VAIPLInputShift(TokenSource):
    """`integration='input'`: layer-1 text slots + u_{b,c} (one text sequence per image and class)."""

    scope = "pair"

    def __init__(self, base: TokenSource, method: "MCPLCLIP"):
        super().__init__()
        self.base = base
        self._method = [method]  # not a submodule: the method owns this source

    def forward(self, ctx: SourceContext) -> torch.Tensor:
        if ctx.vision_tokens is None:
            raise RuntimeError("VAIPL input integration needs the vision pass to run before the text pass")
        slots = self.base(ctx)
        u = self._method[0].vaipl_features(ctx.class_input_embeds(slots), ctx.class_lengths,
                                           ctx.vision_tokens, ctx.vision_proj)
        return slots[None, None] + u[:, :, None, :].to(slots.dtype)
