"""Zero-shot CLIP: a hand template, no prompts, nothing trained (the reference every method starts from)."""

from __future__ import annotations

from ..method import PromptMethod
from ._build import BuildContext


class ZeroShotCLIP(PromptMethod):
    name = "clip"
    vision_prompts = False

    def __init__(self, ctx: BuildContext, template: str = "a photo of a {}."):
        super().__init__(ctx.info)
        self.template = template
