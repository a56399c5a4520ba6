"""MMRL (METHODS.md §3.7): shared representation tokens mapped into both towers from layer 6, a second
(representation) head, decoupled inference and a cosine regulariser against the frozen model.

The paper's ablations (Sec. 4.6, Tab. 4; Appendix E, Tab. 9; METHODS §6.5) are options; the defaults are MMRL:

* `towers`: 'both'; 'vision' is "w/o L" and 'text' is "w/o V" ("where only a single modality of representation
  tokens is utilized"). Without vision tokens there is no representation feature f_r, so 'text' trains and
  predicts with the class head alone: loss CE(z_c) + lambda * regulariser (alpha only balances two heads).
* `space`: 'shared' (R mapped by per-layer Linears into both towers); 'separate' is "w/o RS", which "excludes the
  Representation Space, independently initializes textual and visual tokens": per-layer free K x d tokens in
  each tower, N(0, 0.02^2) like R, no mapping; 'text_to_vision' is MMRL-dagger, "text-side tokens are initialized
  randomly and mapped to the visual side" (per-layer free text tokens, per-layer Linear into the vision tower,
  the Linears copies of one, as MMRL's own maps).
* `regularizer`: 'cosine' (Eq. L_cos); 'l1' and 'mse' are Tab. 9's alternatives. The paper does not define them;
  they compare the same L2-normalised features the released code feeds its cosine (the classifier sees only
  directions), averaged over all elements (torch's l1_loss / mse_loss): per image and per class, like L_cos.
* `inference`: 'decoupled' (fuse on base classes, z_c on novel ones); 'class' is "w/o DS1" ("relies only on
  class features"), 'fused' is "w/o DS2" ("using both features for novel class evaluation").
* `fusion`: 'probs' (default) is the paper's "p(y=c|x) = alpha p(y=c|f_c) + (1-alpha) p(y=c|f_r)", returned as
  log-probabilities, log(alpha softmax(z_c) + (1-alpha) softmax(z_r)): a softmax of them is the paper's mixture,
  their argmax its prediction, and a cross-entropy over them its loss, so every consumer of prediction logits
  (evaluation, `predict`, the CLI) reads them unchanged. 'logits' fuses alpha*z_c + (1-alpha)*z_r as the released
  code does (METHODS §9: "Argmax can differ"). The paper by default, the code's variant as an option.
* Towers of unequal depth (ViT-L/14: 24 vision, 12 text layers). The paper uses ViT-B/16 only and integrates the
  tokens "into the higher layers of the image encoder V and the text encoder W, beginning from the J-th layer"
  up to each encoder's last layer L. Followed per tower: layers J..L_text and J..L_vision, one map per layer of
  each (the shared space R feeds both). `first_layer` stays the paper's J = 6 on every backbone (not rescaled to
  depth: the paper gives no rule for that). 'text_to_vision' pairs text layer l with vision layer l, so it needs
  equal depths and says so otherwise.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..method import EncoderOutputs, PromptMethod, cosine_logits
from ..schedule import TowerSchedule
from ..sources import Coupled, FreeTokens
from ._build import BuildContext, cloned_linears

_CHOICES = {
    "fusion": ("logits", "probs"),
    "towers": ("both", "vision", "text"),
    "space": ("shared", "separate", "text_to_vision"),
    "regularizer": ("cosine", "l1", "mse"),
    "inference": ("decoupled", "class", "fused"),
}


def _check_choices(**options) -> None:
    for name, value in options.items():
        if value not in _CHOICES[name]:
            raise ValueError(f"MMRL option {name} must be one of {_CHOICES[name]}, got {value!r}")
    if options["space"] == "text_to_vision" and options["towers"] != "both":
        raise ValueError("MMRL space='text_to_vision' maps text tokens into the vision tower: it needs towers='both'")


def _log_mixture(alpha: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(alpha softmax(a) + (1 - alpha) softmax(b)) over the last dim, in log space (no underflow)."""
    dtype = torch.promote_types(a.dtype, torch.float32)  # at least fp32 (bf16 logits under autocast), fp64 kept
    parts = [t.to(dtype).log_softmax(-1) + math.log(w) for t, w in ((a, alpha), (b, 1 - alpha)) if w > 0]
    return parts[0] if len(parts) == 1 else torch.logaddexp(*parts)


def _regularizer(kind: str, features: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
    """Distance of (rows of) `features` to the frozen model's, as the `regularizer` option names it."""
    f, f0 = F.normalize(features.float(), dim=-1), F.normalize(frozen.float(), dim=-1)
    if kind == "l1":
        return F.l1_loss(f, f0)
    if kind == "mse":
        return F.mse_loss(f, f0)
    return 1 - (f * f0).sum(-1).mean()


class MMRL(PromptMethod):
    """K tokens R (K x d_r) mapped per layer by F^v_l / F^t_l and *inserted* after CLS / SOS at layer
    `first_layer` (text grows by K, EOT index shifts), replaced in later layers. Heads: CLS -> proj (z_c) and
    mean of the K vision outputs -> proj_rep (z_r). Loss alpha*CE(z_c) + (1-alpha)*CE(z_r) +
    lam*(cosine distance of image and text features to the frozen CLIP's). Prediction on training (base)
    classes fuses the heads; on novel classes and other datasets it uses z_c only. The ablation options
    (towers, space, regularizer, inference) are described in the module docstring."""

    name = "mmrl"
    option_choices = _CHOICES

    def __init__(
        self,
        ctx: BuildContext,
        n_tokens: int = 5,
        rep_dim: int = 512,
        first_layer: int = 6,
        alpha: float = 0.7,
        reg_weight: float = 0.5,
        template: str = "a photo of a {}.",
        fusion: str = "probs",
        towers: str = "both",
        space: str = "shared",
        regularizer: str = "cosine",
        inference: str = "decoupled",
    ):
        super().__init__(ctx.info)
        _check_choices(fusion=fusion, towers=towers, space=space, regularizer=regularizer, inference=inference)
        info = ctx.info
        self.template = template
        self.alpha, self.reg_weight, self.fusion = alpha, reg_weight, fusion
        self.towers, self.space, self.regularizer, self.inference = towers, space, regularizer, inference
        # "beginning from the J-th layer" up to each tower's own last layer L: on towers of unequal depth
        # (ViT-L/14: 24 vision, 12 text layers) the text and vision ranges differ in length.
        depths = {"text": info.text.layers, "vision": info.vision.layers}
        for tower in ("text", "vision"):
            if towers in ("both", tower) and not (isinstance(first_layer, int) and 1 <= first_layer <= depths[tower]):
                raise ValueError(f"MMRL option first_layer={first_layer!r} must be between 1 and the {tower} tower's"
                                 f" {depths[tower]} layers")
        text_layers = range(first_layer, depths["text"] + 1)
        vision_layers = range(first_layer, depths["vision"] + 1)
        if space == "text_to_vision" and depths["text"] != depths["vision"]:
            raise ValueError(f"MMRL space='text_to_vision' maps each text layer's tokens into the same vision layer; "
                             f"this backbone has {depths['text']} text and {depths['vision']} vision layers: use "
                             f"space='shared' or 'separate'")
        text, vision = self._sources(text_layers, vision_layers, n_tokens, rep_dim, info.text.width, info.vision.width)
        if towers != "vision":
            self.text_schedule = TowerSchedule.deep("text", depths["text"], n_tokens, depth=depths["text"],
                                                    first=first_layer, mode="insert")
            self.set_sources("text", text)
        if towers != "text":
            self.vision_schedule = TowerSchedule.deep("vision", depths["vision"], n_tokens, depth=depths["vision"],
                                                      first=first_layer, site="head")
            self.set_sources("vision", vision)
            self.proj_rep = nn.Parameter(torch.randn(info.vision.width, info.embed_dim) * info.vision.width**-0.5)

    def _sources(self, text_layers, vision_layers, n_tokens: int, rep_dim: int, d_text: int, d_vision: int):
        """Per-layer token sources of each tower (built for both; `towers` decides which are used)."""
        if self.space == "separate":
            return ({l: FreeTokens(n_tokens, d_text) for l in text_layers},
                    {l: FreeTokens(n_tokens, d_vision) for l in vision_layers})
        if self.space == "text_to_vision":  # equal depths (checked in __init__): the ranges are the same
            text = {l: FreeTokens(n_tokens, d_text) for l in text_layers}
            maps = cloned_linears(d_text, d_vision, len(vision_layers))
            return text, {l: Coupled(text[l], m) for l, m in zip(vision_layers, maps)}
        latent = FreeTokens(n_tokens, rep_dim)
        vision_maps = cloned_linears(rep_dim, d_vision, len(vision_layers))
        vision = {l: Coupled(latent, m) for l, m in zip(vision_layers, vision_maps)}
        text = {l: Coupled(latent, m) for l, m in zip(text_layers, cloned_linears(rep_dim, d_text, len(text_layers)))}
        return text, vision

    @property
    def has_rep_head(self) -> bool:
        return self.towers != "text"

    def uses_frozen_image_features(self) -> bool:
        return bool(self.reg_weight)  # the image-side regulariser's teacher

    def uses_frozen_text_features(self) -> bool:
        return bool(self.reg_weight)  # the text-side regulariser's teacher

    def reads_vision_tokens(self) -> bool:
        return self.has_rep_head  # the representation tokens' final outputs

    def heads(self, out: EncoderOutputs) -> dict[str, torch.Tensor]:
        logits = {"main": cosine_logits(out.image_features, out.text_features, out.logit_scale)}
        if self.has_rep_head:
            start, length = out.vision_segment
            rep = out.vision_tokens[:, start : start + length].mean(dim=1)
            logits["rep"] = cosine_logits(rep @ self.proj_rep.to(rep.dtype), out.text_features, out.logit_scale)
        return logits

    def loss(self, out: EncoderOutputs, labels: torch.Tensor, model=None):
        ce_main = F.cross_entropy(out.logits["main"], labels)
        parts = {"ce": ce_main.detach()}
        if self.has_rep_head:
            ce_rep = F.cross_entropy(out.logits["rep"], labels)
            loss = self.alpha * ce_main + (1 - self.alpha) * ce_rep
            parts["ce_rep"] = ce_rep.detach()
        else:
            loss = ce_main
        if self.reg_weight and model is not None:
            frozen_img = model.frozen_image_features(out.images)
            frozen_txt = model.frozen_text_features((self.template,))
            reg_v = _regularizer(self.regularizer, out.image_features, frozen_img)
            reg_t = _regularizer(self.regularizer, out.text_features, frozen_txt)
            loss = loss + self.reg_weight * (reg_v + reg_t)
            parts.update(reg_image=reg_v.detach(), reg_text=reg_t.detach())
        return loss, parts

    def predict(self, out: EncoderOutputs, mode: str = "base") -> torch.Tensor:
        fuse = self.has_rep_head and self.inference != "class" and (mode == "base" or self.inference == "fused")
        if not fuse:
            return out.logits["main"]
        if self.fusion == "probs":
            return _log_mixture(self.alpha, out.logits["main"], out.logits["rep"])
        return self.alpha * out.logits["main"] + (1 - self.alpha) * out.logits["rep"]
