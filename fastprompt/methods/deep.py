"""Independent deep prompts (METHODS.md §3.3): IVLP, deep language prompting, VPT-deep.

Each prompted layer owns a free block; text blocks replace the template slots after SOS, vision blocks
are appended at the tail at layer 1 and replace the last n tokens up to the depth.
"""

from __future__ import annotations

import inspect

from ..method import PromptMethod
from ..schedule import TowerSchedule
from ..sources import FreeTokens
from ._build import BuildContext, template_slots


class IVLP(PromptMethod):
    name = "ivlp"

    @classmethod
    def prompts_vision(cls, options: dict) -> bool:
        n_vision = inspect.signature(cls.__init__).parameters.get("n_vision")
        if n_vision is None:  # a subclass that fixes it (PromptSRC: n_ctx in both towers)
            return cls.vision_prompts
        return options.get("n_vision", n_vision.default) > 0

    def __init__(
        self,
        ctx: BuildContext,
        n_text: int = 2,
        n_vision: int = 2,
        text_depth: int = 12,
        vision_depth: int = 12,
        ctx_init: str | None = "a photo of a",
    ):
        super().__init__(ctx.info)
        info = ctx.info
        if n_text:
            ctx.check_depth(self.name, "text_depth", text_depth, ("text",))
        if n_vision:
            ctx.check_depth(self.name, "vision_depth", vision_depth, ("vision",))
        if n_text:
            # Layer-1 text context from the init words when it fits them (n <= 4 for "a photo of a").
            words = ctx_init if ctx_init and n_text <= len(ctx.tokenizer.encode(ctx_init)) else None
            self.template, from_words = template_slots(words, n_text)
            self.text_slots = n_text
            first = FreeTokens(n_text, info.text.width, init=ctx.word_embeddings(words, n_text) if from_words else None)
            sources = {1: first}
            sources.update({l: FreeTokens(n_text, info.text.width) for l in range(2, text_depth + 1)})
            self.text_schedule = TowerSchedule.deep("text", info.text.layers, n_text, depth=text_depth)
            self.set_sources("text", sources)
        if n_vision:
            self.vision_schedule = TowerSchedule.deep("vision", info.vision.layers, n_vision, depth=vision_depth)
            self.set_sources("vision", {l: FreeTokens(n_vision, info.vision.width) for l in range(1, vision_depth + 1)})


class DeepLanguagePrompting(IVLP):
    name = "deep_language"
    vision_prompts = False

    def __init__(self, ctx: BuildContext, n_text: int = 4, text_depth: int = 12, ctx_init: str | None = "a photo of a"):
        super().__init__(ctx, n_text=n_text, n_vision=0, text_depth=text_depth, ctx_init=ctx_init)


class VPTDeep(IVLP):
    """Deep vision prompts; the text is the frozen hand template (its features are computed once)."""

    name = "vpt_deep"

    def __init__(self, ctx: BuildContext, n_vision: int = 8, vision_depth: int = 12, template: str = "a photo of a {}."):
        super().__init__(ctx, n_text=0, n_vision=n_vision, vision_depth=vision_depth)
        self.template = template
