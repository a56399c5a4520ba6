"""MuDPT (METHODS.md §3.6): bi-directional deep prompts, each tower's prompt = its own + the other's mapped.

The released trainer's "injection model" is linear maps summed with the originals (default); the paper's
attention injection is the `injection="attention"` option (the UMuDPT variant: LN -> one residual attention
block over the layer's n prompt tokens -> LN -> Linear).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from open_clip.transformer import ResidualAttentionBlock

from ..method import PromptMethod
from ..schedule import TowerSchedule
from ..sources import Coupled, FreeTokens, Sum
from ._build import BuildContext


class AttentionInjection(nn.Module):
    """LN -> residual attention block over the n prompt tokens -> LN -> Linear(d_in -> d_out)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.norm_in = nn.LayerNorm(d_in)
        self.block = ResidualAttentionBlock(d_in, max(1, d_in // 64), batch_first=True)
        self.norm_out = nn.LayerNorm(d_in)
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.block(self.norm_in(tokens).unsqueeze(0)).squeeze(0)
        return self.proj(self.norm_out(x))


class MuDPT(PromptMethod):
    name = "mudpt"

    def __init__(self, ctx: BuildContext, n_ctx: int = 4, depth: int = 12, ctx_init: str = "a photo of a", injection: str = "linear"):
        super().__init__(ctx.info)
        if injection not in ("linear", "attention"):
            raise ValueError(f"injection must be 'linear' or 'attention', got {injection!r}")
        info = ctx.info
        dt, dv = info.text.width, info.vision.width
        words = ctx_init.split()
        if n_ctx > len(words):
            raise ValueError(f"n_ctx={n_ctx} needs at least {n_ctx} init words, {ctx_init!r} has {len(words)}")
        # The released code keeps only the first n init words in the template ("a photo {}." for n = 2).
        self.template = " ".join(words[:n_ctx]) + " {}."
        self.text_slots = n_ctx
        make = nn.Linear if injection == "linear" else AttentionInjection
        t = {1: FreeTokens(n_ctx, dt, init=ctx.word_embeddings(ctx_init, n_ctx))}
        t.update({l: FreeTokens(n_ctx, dt) for l in range(2, depth + 1)})
        v = {l: FreeTokens(n_ctx, dv) for l in range(1, depth + 1)}
        first_map, text_to_vision, vision_to_text = make(dt, dv), make(dt, dv), make(dv, dt)
        text = {1: t[1]}
        text.update({l: Sum(t[l], Coupled(v[l], vision_to_text)) for l in range(2, depth + 1)})
        vision = {1: Sum(v[1], Coupled(t[1], first_map))}
        vision.update({l: Sum(v[l], Coupled(t[l], text_to_vision)) for l in range(2, depth + 1)})
        self.text_schedule = TowerSchedule.deep("text", info.text.layers, n_ctx, depth=depth)
        self.vision_schedule = TowerSchedule.deep("vision", info.vision.layers, n_ctx, depth=depth)
        self.set_sources("text", text)
        self.set_sources("vision", vision)
