"""MCPL-CLIP (METHODS.md §3.9, a reconstruction: the paper's equations were lost).

THIPL: n text prompts per layer 1..J (MaPLe rule); a shared self-attention block S over each layer's prompt
tokens, then a per-layer PMS bottleneck MLP maps them into the vision tower (V_l = PMS_l(S(P_l))).
VAIPL: a small transformer decoder whose queries are the max-pooled text input embeddings of each class and
whose keys/values are the projected vision output tokens of each image; its projected output u_{b,c} is added
to the class text feature after the encoder (default), or to the layer-1 text slots with a text pass per
(image, class) (the `integration="input"` alternative).

Alternatives (METHODS.md §3.9 brackets): `n_ctx` 2 or 4, `depth` 9 or 3, `sa_scope` 'layer' or 'joint'
(attention across all J*n prompt tokens), `sa_to_text` (also splice S(P_l) into the text tower),
`pms` 'standard' | 'large' | 'xlarge', `decoder_layers` 1..3, `integration` 'post' | 'input', and
`fusion` 'vaipl' or 'cmpp' (the ablation baseline: mean text input embedding added to vision features).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.transformer import QuickGELU, ResidualAttentionBlock

from ..method import EncoderOutputs, PromptMethod, cosine_logits
from ..schedule import TowerSchedule
from ..sources import Coupled, FreeTokens, SourceContext, TokenSource
from ._build import BuildContext, template_slots

PMS_SIZES = {"standard": (128, 2), "large": (128, 4), "xlarge": (256, 4)}


def pms_mlp(d_in: int, d_out: int, size: str) -> nn.Sequential:
    """Bottleneck MLP: Linear -> ReLU -> ... -> Linear with `linears` Linear layers of the given hidden width."""
    if size not in PMS_SIZES:
        raise ValueError(f"pms must be one of {sorted(PMS_SIZES)}, got {size!r}")
    hidden, linears = PMS_SIZES[size]
    dims = [d_in] + [hidden] * (linears - 1) + [d_out]
    layers: list[nn.Module] = []
    for i in range(linears):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < linears - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class PromptSelfAttention(nn.Module):
    """S: one pre-LN residual attention block (QuickGELU MLP) over a set of prompt tokens [n, d] -> [n, d]."""

    def __init__(self, width: int):
        super().__init__()
        self.block = ResidualAttentionBlock(width, max(1, width // 64), act_layer=QuickGELU, batch_first=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.block(tokens.unsqueeze(0)).squeeze(0)


class JointAttended(TokenSource):
    """Layer l's slice of S applied jointly to all layers' prompt tokens (computed once per forward)."""

    def __init__(self, attention: PromptSelfAttention, sources: list[TokenSource], index: int):
        super().__init__()
        self.attention = attention
        self.sources = sources  # plain list: the sources are registered as the text tower's sources
        self.index = index

    def forward(self, ctx: SourceContext) -> torch.Tensor:
        memo = ctx.memo.setdefault(id(self.attention), None)
        if memo is None:
            memo = self.attention(torch.cat([s(ctx) for s in self.sources], dim=0))
            ctx.memo[id(self.attention)] = memo
        n = self.sources[self.index](ctx).shape[0]
        return memo[self.index * n : (self.index + 1) * n]


def _project_queries(attn: nn.MultiheadAttention, query: torch.Tensor) -> torch.Tensor:
    """The query projection of nn.MultiheadAttention, as [..., L, H, head_dim]."""
    d = attn.embed_dim
    q = F.linear(query, attn.in_proj_weight[:d], attn.in_proj_bias[:d])
    return q.unflatten(-1, (attn.num_heads, d // attn.num_heads))


def _attend(attn: nn.MultiheadAttention, q: torch.Tensor, key_value: torch.Tensor) -> torch.Tensor:
    """nn.MultiheadAttention's math from projected queries `q` [1 or B, Lq, H, hd] through fastprompt's attention
    op (flash-style on GPU): the B x H x C x N probabilities of the class-query x image-token attention are never
    materialised. Keys and values come from one GEMM."""
    from ..ops.attention import attention

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


class VAIPLDecoder(nn.Module):
    """Queries [C, d] x image tokens [B, N, d] -> prompt features u [B, C, d_out].

    Each layer: q += SelfAttn(LN q) over the classes; q += CrossAttn(LN q, LN Z_b); q += MLP(LN q).
    Then Linear -> ReLU -> Linear. The first layer's self-attention and cross-attention queries are
    image-independent: they run once per forward (`prepare`), or once per class set at inference.
    """

    def __init__(self, width: int, layers: int = 2, out_dim: int | None = None, hidden: int = 128):
        super().__init__()
        if not 1 <= layers <= 3:
            raise ValueError(f"decoder_layers must be 1, 2 or 3, got {layers}")
        heads = max(1, width // 64)
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

    def prepare(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The class-only part, [C, d] -> ([1, C, d], [1, C, H, hd]): layer 1's self-attention over the classes and
        its cross-attention queries. Inference computes it once per class set (MCPLCLIP.class_state)."""
        layer = self.layers[0]
        q = queries.unsqueeze(0)
        h = layer["ln_self"](q)
        q = q + _multihead(layer["self_attn"], h, h)
        return q, _project_queries(layer["cross_attn"], layer["ln_q"](q))

    def forward(self, queries: torch.Tensor | None, image_tokens: torch.Tensor, prepared=None) -> torch.Tensor:
        q, cross_q = prepared if prepared is not None else self.prepare(queries)
        for i, layer in enumerate(self.layers):
            if i > 0:  # from here on the queries are per image: [B, C, d]
                h = layer["ln_self"](q)
                q = q + _multihead(layer["self_attn"], h, h)
                cross_q = _project_queries(layer["cross_attn"], layer["ln_q"](q))
            q = q + _attend(layer["cross_attn"], cross_q, layer["ln_kv"](image_tokens))  # [1, C, d] grows to [B, C, d]
            q = q + layer["mlp"](layer["ln_mlp"](q))
        return self.proj(q)


def max_pooled_queries(input_embeds: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Max over the valid positions (SOS..EOT) of each class's text input embeddings: [C, L, d] -> [C, d]."""
    positions = torch.arange(input_embeds.shape[1], device=input_embeds.device)
    valid = positions[None, :] < lengths[:, None]
    return input_embeds.masked_fill(~valid[..., None], float("-inf")).amax(dim=1)


class VAIPLInputShift(TokenSource):
    """`integration='input'`: layer-1 text slots + u_{b,c} (one text sequence per image and class)."""

    scope = "pair"

    def __init__(self, base: FreeTokens, method: "MCPLCLIP"):
        super().__init__()
        self.base = base
        self._method = [method]  # not a submodule: the method owns this source

    def forward(self, ctx: SourceContext) -> torch.Tensor:
        if ctx.vision_tokens is None:
            raise RuntimeError("VAIPL input integration needs the vision pass to run before the text pass")
        u = self._method[0].vaipl_features(ctx.class_input_embeds(self.base(ctx)), ctx.class_lengths,
                                           ctx.vision_tokens, ctx.vision_proj)
        return self.base(ctx)[None, None] + u[:, :, None, :].to(self.base(ctx).dtype)


class MCPLCLIP(PromptMethod):
    name = "mcpl"
    uses_text_input_embeds = True

    def __init__(
        self,
        ctx: BuildContext,
        n_ctx: int = 2,
        depth: int = 9,
        ctx_init: str = "a photo of a",
        pms: str = "standard",
        sa_scope: str = "layer",
        sa_to_text: bool = False,
        decoder_layers: int = 2,
        integration: str = "post",
        fusion: str = "vaipl",
    ):
        super().__init__(ctx.info)
        for name, value, allowed in (
            ("sa_scope", sa_scope, ("layer", "joint")),
            ("integration", integration, ("post", "input")),
            ("fusion", fusion, ("vaipl", "cmpp")),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if integration == "input" and fusion != "vaipl":
            raise ValueError("integration='input' applies to VAIPL only")
        info = ctx.info
        dt, dv, embed = info.text.width, info.vision.width, info.embed_dim
        self.template, from_words = template_slots(ctx_init, n_ctx)
        self.text_slots = n_ctx
        self.integration, self.fusion = integration, fusion
        prompts = {1: FreeTokens(n_ctx, dt, init=ctx.word_embeddings(ctx_init, n_ctx) if from_words else None)}
        prompts.update({l: FreeTokens(n_ctx, dt) for l in range(2, depth + 1)})
        self.attention = PromptSelfAttention(dt)
        layers = list(range(1, depth + 1))
        if sa_scope == "layer":
            attended = {l: Coupled(prompts[l], self.attention) for l in layers}
        else:
            attended = {l: JointAttended(self.attention, [prompts[k] for k in layers], l - 1) for l in layers}
        self.pms = nn.ModuleList(pms_mlp(dt, dv, pms) for _ in layers)
        vision = {l: Coupled(attended[l], self.pms[l - 1]) for l in layers}
        text = dict(attended) if sa_to_text else dict(prompts)
        if integration == "input":
            text[1] = VAIPLInputShift(prompts[1], self)
        self.text_schedule = TowerSchedule.deep("text", info.text.layers, n_ctx, depth=depth)
        self.vision_schedule = TowerSchedule.deep("vision", info.vision.layers, n_ctx, depth=depth)
        self.set_sources("text", text)
        self.set_sources("vision", vision)
        self.query_proj = nn.Linear(dt, embed) if dt != embed else nn.Identity()
        if fusion == "vaipl":
            out_dim = dt if integration == "input" else embed
            self.decoder = VAIPLDecoder(embed, decoder_layers, out_dim=out_dim)

    def vaipl_classes(self, input_embeds, lengths):
        """The class-only part of VAIPL (queries and the decoder's `prepare`), in the decoder's dtype (fp32)."""
        dtype = self.decoder.proj[0].weight.dtype
        return self.decoder.prepare(self.query_proj(max_pooled_queries(input_embeds.to(dtype), lengths)))

    def vaipl_features(self, input_embeds, lengths, vision_tokens, vision_proj, classes=None) -> torch.Tensor:
        """u [B, C, d_out]; `classes` is vaipl_classes(input_embeds, lengths) when already computed."""
        dtype = self.decoder.proj[0].weight.dtype  # the decoder trains in its parameters' dtype (fp32)
        if classes is None:
            classes = self.vaipl_classes(input_embeds, lengths)
        image_tokens = vision_tokens.to(dtype) @ vision_proj.to(dtype)
        return self.decoder(None, image_tokens, prepared=classes)

    def class_state(self, text_features, text_input_embeds, text_lengths):
        if self.integration == "post" and self.fusion == "vaipl":
            return self.vaipl_classes(text_input_embeds, text_lengths)
        return None

    def heads(self, out: EncoderOutputs) -> dict[str, torch.Tensor]:
        image, text = out.image_features, out.text_features
        if self.integration == "post":
            if self.fusion == "vaipl":
                u = self.vaipl_features(out.text_input_embeds, out.text_lengths, out.vision_tokens, out.vision_proj,
                                        classes=out.class_state)
                text = text.to(u.dtype)[None] + u  # w_{b,c} = w_c + u_{b,c}; cosine_logits normalises
            else:
                # CMPP: the mean text input embedding (over classes and valid tokens) added to the image feature.
                valid = torch.arange(out.text_input_embeds.shape[1], device=image.device)[None] < out.text_lengths[:, None]
                mean = (out.text_input_embeds.float() * valid[..., None]).sum((0, 1)) / valid.sum()
                mean = mean.to(self.pms[0][0].weight.dtype)
                image = image.to(mean.dtype) + self.query_proj(mean)
        return {"main": cosine_logits(image, text, out.logit_scale)}
