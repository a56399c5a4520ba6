"""CoOp and CoCoOp (METHODS.md §3.1, §3.2): learnable text context in the first layer only."""

from __future__ import annotations

from ..method import PromptMethod
from ..schedule import TowerSchedule
from ..sources import FreeTokens, InstanceShift, bottleneck_mlp
from ._build import BuildContext, template_slots


class CoOp(PromptMethod):
    """Context vectors replace the n template slots after SOS at layer 1.

    `ctx_init` ("a photo of a") initialises from word embeddings (the "ctxv1" variant); otherwise
    N(0, 0.02^2). `class_specific` gives every class its own context (CSC, C x n x d).
    """

    name = "coop"
    vision_prompts = False

    def __init__(self, ctx: BuildContext, n_ctx: int = 16, ctx_init: str | None = None, class_specific: bool = False):
        super().__init__(ctx.info)
        if ctx_init:
            n_ctx = len(ctx.tokenizer.encode(ctx_init))
        self.template, from_words = template_slots(ctx_init, n_ctx)
        self.text_slots = n_ctx
        width = ctx.info.text.width
        init = ctx.word_embeddings(ctx_init, n_ctx) if from_words else None
        classes = ctx.num_classes if class_specific else 0
        self.text_schedule = TowerSchedule.deep("text", ctx.info.text.layers, n_ctx, depth=1)
        self.set_sources("text", {1: FreeTokens(n_ctx, width, init=init, classes=classes)})


class CoCoOp(PromptMethod):
    """CoOp context plus a per-image shift from a meta-net on the frozen image feature (text pass per image)."""

    name = "cocoop"
    vision_prompts = False  # its meta-net reads the frozen image feature, which any vision tower gives

    def __init__(self, ctx: BuildContext, n_ctx: int = 4, ctx_init: str | None = "a photo of a", meta_hidden: int | None = None):
        super().__init__(ctx.info)
        if ctx_init:
            n_ctx = len(ctx.tokenizer.encode(ctx_init))
        self.template, from_words = template_slots(ctx_init, n_ctx)
        self.text_slots = n_ctx
        width, embed = ctx.info.text.width, ctx.info.embed_dim
        init = ctx.word_embeddings(ctx_init, n_ctx) if from_words else None
        meta_net = bottleneck_mlp(embed, meta_hidden or embed // 16, width)
        self.text_schedule = TowerSchedule.deep("text", ctx.info.text.layers, n_ctx, depth=1)
        self.set_sources("text", {1: InstanceShift(FreeTokens(n_ctx, width, init=init), meta_net)})
