"""MMRL (METHODS.md §3.7): shared representation tokens mapped into both towers from layer 6, a second
(representation) head, decoupled inference and a cosine regulariser against the frozen model."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..method import EncoderOutputs, PromptMethod, cosine_logits
from ..schedule import TowerSchedule
from ..sources import Coupled, FreeTokens
from ._build import BuildContext, cloned_linears


class MMRL(PromptMethod):
    """K tokens R (K x d_r) mapped per layer by F^v_l / F^t_l and *inserted* after CLS / SOS at layer
    `first_layer` (text grows by K, EOT index shifts), replaced in later layers. Heads: CLS -> proj (z_c) and
    mean of the K vision outputs -> proj_rep (z_r). Loss alpha*CE(z_c) + (1-alpha)*CE(z_r) +
    lam*(cosine distance of image and text features to the frozen CLIP's). Prediction on training (base)
    classes fuses the heads; on novel classes and other datasets it uses z_c only."""

    name = "mmrl"

    def __init__(
        self,
        ctx: BuildContext,
        n_tokens: int = 5,
        rep_dim: int = 512,
        first_layer: int = 6,
        alpha: float = 0.7,
        reg_weight: float = 0.5,
        template: str = "a photo of a {}.",
        fusion: str = "logits",
    ):
        super().__init__(ctx.info)
        if fusion not in ("logits", "probs"):
            raise ValueError(f"fusion must be 'logits' (released code) or 'probs' (paper), got {fusion!r}")
        info = ctx.info
        self.template = template
        self.alpha, self.reg_weight, self.fusion = alpha, reg_weight, fusion
        last = info.vision.layers
        if info.text.layers != last:
            raise ValueError("MMRL needs towers of equal depth")
        layers = range(first_layer, last + 1)
        latent = FreeTokens(n_tokens, rep_dim)
        to_vision = cloned_linears(rep_dim, info.vision.width, len(layers))
        to_text = cloned_linears(rep_dim, info.text.width, len(layers))
        self.text_schedule = TowerSchedule.deep("text", last, n_tokens, depth=last, first=first_layer, mode="insert")
        self.vision_schedule = TowerSchedule.deep("vision", last, n_tokens, depth=last, first=first_layer, site="head")
        self.set_sources("vision", {l: Coupled(latent, m) for l, m in zip(layers, to_vision)})
        self.set_sources("text", {l: Coupled(latent, m) for l, m in zip(layers, to_text)})
        self.proj_rep = nn.Parameter(torch.randn(info.vision.width, info.embed_dim) * info.vision.width**-0.5)

    def heads(self, out: EncoderOutputs) -> dict[str, torch.Tensor]:
        start, length = out.vision_segment
        rep = out.vision_tokens[:, start : start + length].mean(dim=1)
        rep_features = rep @ self.proj_rep.to(rep.dtype)
        return {
            "main": cosine_logits(out.image_features, out.text_features, out.logit_scale),
            "rep": cosine_logits(rep_features, out.text_features, out.logit_scale),
        }

    def loss(self, out: EncoderOutputs, labels: torch.Tensor, model=None):
        ce_main = F.cross_entropy(out.logits["main"], labels)
        ce_rep = F.cross_entropy(out.logits["rep"], labels)
        loss = self.alpha * ce_main + (1 - self.alpha) * ce_rep
        parts = {"ce": ce_main.detach(), "ce_rep": ce_rep.detach()}
        if self.reg_weight and model is not None:
            frozen_img = model.frozen_image_features(out.images)
            frozen_txt = model.frozen_text_features((self.template,))
            reg_v = 1 - F.cosine_similarity(out.image_features.float(), frozen_img.float(), dim=-1).mean()
            reg_t = 1 - F.cosine_similarity(out.text_features.float(), frozen_txt.float(), dim=-1).mean()
            loss = loss + self.reg_weight * (reg_v + reg_t)
            parts.update(reg_image=reg_v.detach(), reg_text=reg_t.detach())
        return loss, parts

    def predict(self, out: EncoderOutputs, mode: str = "base") -> torch.Tensor:
        if mode == "novel":
            return out.logits["main"]
        if self.fusion == "probs":
            return self.alpha * out.logits["main"].softmax(-1) + (1 - self.alpha) * out.logits["rep"].softmax(-1)
        return self.alpha * out.logits["main"] + (1 - self.alpha) * out.logits["rep"]
