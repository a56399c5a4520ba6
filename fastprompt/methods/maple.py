"""MaPLe (METHODS.md §3.4): text prompts per layer, coupled into the vision tower by a Linear per layer."""

from __future__ import annotations

import torch.nn as nn

from ..method import PromptMethod
from ..schedule import TowerSchedule
from ..sources import Coupled, FreeTokens
from ._build import BuildContext, cloned_linears, template_slots


class MaPLe(PromptMethod):
    """n text tokens replace the template slots in layers 1..J; vision tokens are F_l(text tokens of layer l),
    appended at layer 1 and replaced up to J. F_1 has its own init; F_2..F_J start identical (deep copies)."""

    name = "maple"

    def __init__(self, ctx: BuildContext, n_ctx: int = 2, depth: int = 9, ctx_init: str | None = "a photo of a"):
        super().__init__(ctx.info)
        info = ctx.info
        ctx.check_depth(self.name, "depth", depth)
        self.template, from_words = template_slots(ctx_init, n_ctx)
        self.text_slots = n_ctx
        dt, dv = info.text.width, info.vision.width
        text = {1: FreeTokens(n_ctx, dt, init=ctx.word_embeddings(ctx_init, n_ctx) if from_words else None)}
        text.update({l: FreeTokens(n_ctx, dt) for l in range(2, depth + 1)})
        couplings = [nn.Linear(dt, dv)] + list(cloned_linears(dt, dv, depth - 1))
        vision = {l: Coupled(text[l], couplings[l - 1]) for l in range(1, depth + 1)}
        self.text_schedule = TowerSchedule.deep("text", info.text.layers, n_ctx, depth=depth)
        self.vision_schedule = TowerSchedule.deep("vision", info.vision.layers, n_ctx, depth=depth)
        self.set_sources("text", text)
        self.set_sources("vision", vision)
