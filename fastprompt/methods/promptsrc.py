"""PromptSRC (METHODS.md §3.8): IVLP 4+4 with self-regularisation against the frozen CLIP, and Gaussian
prompt aggregation (GPA) of the per-epoch weights."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from ..method import EncoderOutputs
from ._build import BuildContext
from .deep import IVLP

# PromptSRC's teacher averages 60 ImageNet templates: the first 60 of OpenAI's 80 (same set, other order).
PROMPTSRC_TEMPLATES = tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES[:60])


class PromptSRC(IVLP):
    name = "promptsrc"

    def __init__(
        self,
        ctx: BuildContext,
        n_ctx: int = 4,
        depth: int = 9,
        text_weight: float = 25.0,
        image_weight: float = 10.0,
        kl_weight: float = 1.0,
        gpa_mean: float = 15.0,
        gpa_std: float = 1.0,
    ):
        ctx.check_depth(self.name, "depth", depth)  # named as the user gave it, before IVLP's text_/vision_depth
        super().__init__(ctx, n_text=n_ctx, n_vision=n_ctx, text_depth=depth, vision_depth=depth)
        self.text_weight, self.image_weight, self.kl_weight = text_weight, image_weight, kl_weight
        self.gpa_mean, self.gpa_std = gpa_mean, gpa_std

    def uses_frozen_image_features(self) -> bool:
        return True  # the L1 consistency with the frozen image features

    def uses_frozen_text_features(self) -> bool:
        return True  # the L1 consistency with the frozen text features (PROMPTSRC_TEMPLATES)

    def loss(self, out: EncoderOutputs, labels: torch.Tensor, model=None):
        logits = out.logits["main"]
        ce = F.cross_entropy(logits, labels)
        parts = {"ce": ce.detach()}
        if model is None:
            return ce, parts
        w0 = model.frozen_text_features(PROMPTSRC_TEMPLATES)
        f0 = F.normalize(model.frozen_image_features(out.images).float(), dim=-1)
        w = F.normalize(out.text_features.float(), dim=-1)
        f = F.normalize(out.image_features.float(), dim=-1)
        l1_text = (w - w0).abs().mean()
        l1_image = (f - f0).abs().mean()
        z0 = out.logit_scale * f0 @ w0.t()
        kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(z0, -1), reduction="sum", log_target=True)
        kl = kl / logits.numel()
        loss = ce + self.text_weight * l1_text + self.image_weight * l1_image + self.kl_weight * kl
        parts.update(l1_text=l1_text.detach(), l1_image=l1_image.detach(), kl=kl.detach())
        return loss, parts


class GaussianPromptAggregation:
    """Running Gaussian-weighted average of the trainable parameters over epochs 1..E (GPA).

    Call `update(epoch)` after each epoch; `apply()` writes the average into the parameters at the end.
    Weights g_e ~ N(e; mean, std^2) normalised over e = 1..E.
    """

    def __init__(self, params: dict[str, torch.Tensor], epochs: int, mean: float, std: float):
        raw = [math.exp(-0.5 * ((e - mean) / std) ** 2) for e in range(1, epochs + 1)]
        total = sum(raw)
        if total == 0:
            raise ValueError(f"GPA weights vanish for mean={mean}, std={std} over {epochs} epochs")
        self.weights = [r / total for r in raw]
        self.params = params
        self.sums = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}

    @torch.no_grad()
    def update(self, epoch: int) -> None:
        g = self.weights[epoch - 1]
        for k, p in self.params.items():
            self.sums[k].add_(p.detach().float(), alpha=g)

    @torch.no_grad()
    def apply(self) -> None:
        for k, p in self.params.items():
            p.copy_(self.sums[k].to(p.dtype))
