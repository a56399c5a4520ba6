"""The base every method configures: schedules, token sources, template, heads and loss.

A method is a small nn.Module holding only its trainable parts (prompt sources, mapping networks,
extra heads). The general model (fastprompt.model.PromptedCLIP) runs the frozen CLIP with the
method's schedule and sources; the method then turns the encoders' outputs into logits and a loss.
Defaults give the plain CLIP classifier (one head: logit scale x cosine) and cross-entropy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbone import BackboneInfo
from .schedule import TowerSchedule
from .sources import TokenSource


@dataclass
class EncoderOutputs:
    """What one forward of the general model produced; methods read it to build logits and losses."""

    image_features: torch.Tensor  # [B, E] pooled CLS, projected (not normalised)
    text_features: torch.Tensor  # [C, E], or [B, C, E] when text prompts depend on the image
    # [B, N, D] final tokens after ln_post (prompts included); None when the vision tower's last block ran on the
    # CLS rows only (PromptedCLIP.last_layer): a method that reads them says so in reads_vision_tokens
    vision_tokens: torch.Tensor | None
    vision_segment: tuple[int, int]  # (start, length) of the prompt segment in vision_tokens
    logit_scale: torch.Tensor  # CLIP's exp(logit_scale)
    vision_proj: torch.Tensor | None = None  # CLIP's visual.proj (frozen), to project vision tokens
    images: torch.Tensor | None = None  # the input batch (for teacher regularisers)
    frozen_image_features: torch.Tensor | None = None  # unprompted CLIP features, when computed
    text_input_embeds: torch.Tensor | None = None  # [C, L, d] layer-1 text embeddings (no positional)
    text_lengths: torch.Tensor | None = None  # [C] SOS..EOT lengths
    class_state: object = None  # PromptMethod.class_state's result, cached with the text features at inference
    logits: dict[str, torch.Tensor] = field(default_factory=dict)


def cosine_logits(image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """scale * cos(f_b, w_c): text [C, E] -> [B, C]; per-image text [B, C, E] -> [B, C]."""
    f = F.normalize(image_features.float(), dim=-1)
    w = F.normalize(text_features.float(), dim=-1)
    if w.dim() == 2:
        return scale * f @ w.t()
    return scale * torch.einsum("be,bce->bc", f, w)


class PromptMethod(nn.Module):
    """Subclasses set the attributes in __init__ and override heads/loss/predict where they differ."""

    name = "clip"
    #: Text template with one '{}'; its first `text_slots` tokens after SOS are learnable.
    template = "a photo of a {}."
    text_slots = 0
    #: Whether heads read EncoderOutputs.text_input_embeds (MCPL's VAIPL queries); the packed path skips it otherwise.
    uses_text_input_embeds = False
    #: {option: allowed values} of the string options with a fixed set of values. The constructor checks them;
    #: the runner checks a config against the same table before any data is read (read-only: do not mutate).
    option_choices: dict[str, tuple] = {}
    #: Whether the method prompts (or reads the tokens of) the vision tower's transformer, which a CNN vision tower
    #: (RN50) does not have; False for the text-prompt methods. See prompts_vision for options that decide it.
    vision_prompts = True

    @classmethod
    def prompts_vision(cls, options: dict) -> bool:
        """Whether this method built with `options` (the user's, before defaults) puts prompts into the vision
        tower: fastprompt.build refuses such a method on a CNN vision tower before constructing it."""
        return cls.vision_prompts

    def __init__(self, info: BackboneInfo):
        super().__init__()
        self.info = info
        self.text_schedule = TowerSchedule.none("text", info.text.layers)
        self.vision_schedule = TowerSchedule.none("vision", info.vision.layers)
        self.text_sources = nn.ModuleDict()  # key: 1-based layer index as str
        self.vision_sources = nn.ModuleDict()

    # --- configuration helpers -------------------------------------------------------------------
    def set_sources(self, tower: str, sources: dict[int, TokenSource]) -> None:
        target = self.text_sources if tower == "text" else self.vision_sources
        for layer, src in sources.items():
            target[str(layer)] = src

    def needs_image_features(self) -> bool:
        """Instance-conditioned prompts need the frozen image features before the text pass."""
        return any(s.scope == "image" for s in self.text_sources.values())

    def needs_vision_before_text(self) -> bool:
        """Text prompts computed from the prompted vision output (one text pass per image and class)."""
        return any(s.scope == "pair" for s in self.text_sources.values())

    def per_image_text(self) -> bool:
        return self.needs_image_features() or self.needs_vision_before_text()

    def uses_frozen_image_features(self) -> bool:
        """Whether the loss reads the frozen CLIP's features of the batch (model.frozen_image_features: teacher
        regularisers). The general model then keeps the prompted vision pass's state before its first prompted layer
        for that teacher pass (the layers below are the same computation), instead of running them twice."""
        return False

    def uses_frozen_text_features(self) -> bool:
        """Whether the loss reads the frozen CLIP's text features of the class set (model.frozen_text_features:
        teacher regularisers), computed once per run."""
        return False

    def reads_vision_tokens(self) -> bool:
        """Whether the heads or the token sources read EncoderOutputs.vision_tokens (every final vision token, not
        only the pooled CLS feature): the general model then runs the vision tower's last block on every row."""
        return False

    # --- hooks the general model calls ------------------------------------------------------------
    def class_state(self, text_features, text_input_embeds, text_lengths):
        """What `heads` computes from the class set and the parameters alone (MCPL: VAIPL's class queries). At
        inference the general model computes it once per class set, caches it with the text features, and hands
        it to `heads` as EncoderOutputs.class_state (None otherwise: `heads` then computes it). Default: nothing."""
        return None

    def heads(self, out: EncoderOutputs) -> dict[str, torch.Tensor]:
        return {"main": cosine_logits(out.image_features, out.text_features, out.logit_scale)}

    def loss(self, out: EncoderOutputs, labels: torch.Tensor, model=None) -> tuple[torch.Tensor, dict]:
        ce = F.cross_entropy(out.logits["main"], labels)
        return ce, {"ce": ce.detach()}

    def predict(self, out: EncoderOutputs, mode: str = "base") -> torch.Tensor:
        """Logits used for accuracy. `mode` is 'base' (training classes) or 'novel' (unseen classes)."""
        return out.logits["main"]

    def extra_repr(self) -> str:
        return f"name={self.name!r}, template={self.template!r}, text_slots={self.text_slots}"
