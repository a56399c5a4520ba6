"""MCPL-CLIP (METHODS.md §3.9, a reconstruction: the paper's equations were lost).

THIPL: n text prompts per layer 1..J (MaPLe rule); a shared self-attention block S over each layer's prompt
tokens, spliced into the text tower, and a per-layer PMS bottleneck MLP mapping them into the vision tower
(V_l = PMS_l(S(P_l))). VAIPL: a small transformer decoder whose queries are the max-pooled text input embeddings
of each class and whose keys/values are the projected vision output tokens of each image; its projected output
u_{b,c} is added to the class text feature after the encoder (default), or to the layer-1 text slots with a text
pass per (image, class) (`integration="input"`).

Options beyond METHODS.md's brackets (`n_ctx`, `depth`, `sa_scope`, `pms` sizes, `decoder_layers`,
`integration`, `fusion`), and the defaults chosen from the paper's prose ("..." quotes the paper):

* `sa_to_text=True`: the text slots hold S(P_l), the same tokens the PMS maps. "Inspired by Maple, we add
  self-attention to the text encoder and project features to the visual encoder, enriching text and guiding
  visual learning": S is part of the text encoder and enriches the text; False gives the text tower raw P_l.
* `free_visual_prompts=False`: V_l = PMS_l(S(P_l)) only; True adds a free block, V_l = F_l + PMS_l(S(P_l)).
  The ablation says that without the PMS "the text prompt vectors are the same as the visual prompt
  vectors", which leaves no room for a free visual part; the Fig. 1 "add" is the word-embedding addition
  (Fig. 3: "Point-wise adding represents the word embedding method").
* `per_class_decoding=False`: the decoder's self-attention runs over the C class queries ("VAIPL consists of
  multiple transformer decoder layers", whose self-attention runs over the query set), so a class's logit
  depends on which other classes are evaluated (base-to-novel and cross-dataset numbers with it). True
  decodes every class alone (its self-attention sees only itself): logits independent of the class set.
* `pms="none"`: the ablation "removing PMS and directly adding the text prompt vectors to the visual encoder";
  with a vision tower wider than the text tower the text prompt fills the first coordinates and the rest are
  zero (no parameters: a learned bridge would be a PMS again); narrower vision towers are refused.
* `cmpp_mean="per_class"` (for `fusion="cmpp"`): "CMPP averages the input embedding features of the text
  description and directly adds them point-wise to the output features of the visual encoder": each class's
  description is averaged and added to the image feature, which is then compared with that class's text
  feature. It replaces VAIPL, whose pooling is per class too; "all_classes" (one mean of every class's tokens
  added to every image feature) carries no class-specific text.
* `shared_pms=False`: one PMS per prompted layer (Fig. 3 lists "PMSs"); True shares one across layers, the
  paper's future work "parameter-shared lightweight prompt mapping networks combined with gradient
  accumulation strategies to reduce training memory requirements below 18 GB".
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...method import EncoderOutputs, PromptMethod, cosine_logits
from ...schedule import TowerSchedule
from ...sources import Coupled, FreeTokens, Sum
from .._build import BuildContext, template_slots
from .thipl import PMS_CHOICES, PMS_SIZES, AttendedPrompts, JointAttended, PromptSelfAttention, ZeroPadWidth, pms_mlp
from .vaipl import (
    VAIPLDecoder,
    VAIPLInputShift,
    _attend,
    _multihead,
    _project_queries,
    max_pooled_queries,
    mean_text_embeddings,
)


class MCPLCLIP(PromptMethod):
    name = "mcpl"
    uses_text_input_embeds = True
    option_choices = {
        "sa_scope": ("layer", "joint"),
        "integration": ("post", "input"),
        "fusion": ("vaipl", "cmpp"),
        "pms": PMS_CHOICES,
        "cmpp_mean": ("per_class", "all_classes"),
    }

    def __init__(
        self,
        ctx: BuildContext,
        n_ctx: int = 2,
        depth: int = 9,
        ctx_init: str = "a photo of a",
        pms: str = "standard",
        sa_scope: str = "layer",
        sa_to_text: bool = True,
        decoder_layers: int = 2,
        integration: str = "post",
        fusion: str = "vaipl",
        free_visual_prompts: bool = False,
        per_class_decoding: bool = False,
        cmpp_mean: str = "per_class",
        shared_pms: bool = False,
    ):
        super().__init__(ctx.info)
        chosen = {"sa_scope": sa_scope, "integration": integration, "fusion": fusion, "pms": pms,
                  "cmpp_mean": cmpp_mean}
        for name, value in chosen.items():
            if value not in self.option_choices[name]:
                raise ValueError(f"{name} must be one of {list(self.option_choices[name])}, got {value!r}")
        if integration == "input" and fusion != "vaipl":
            raise ValueError("integration='input' applies to VAIPL only")
        if per_class_decoding and fusion != "vaipl":
            raise ValueError("per_class_decoding applies to VAIPL's decoder; fusion='cmpp' has none")
        if cmpp_mean != "per_class" and fusion != "cmpp":
            raise ValueError("cmpp_mean applies to fusion='cmpp' only")
        if shared_pms and pms == "none":
            raise ValueError("shared_pms shares the PMS across layers; pms='none' has no PMS to share")
        info = ctx.info
        ctx.check_depth(self.name, "depth", depth)
        dt, dv, embed = info.text.width, info.vision.width, info.embed_dim
        self.template, from_words = template_slots(ctx_init, n_ctx)
        self.text_slots = n_ctx
        self.integration, self.fusion, self.cmpp_mean = integration, fusion, cmpp_mean
        prompts = {1: FreeTokens(n_ctx, dt, init=ctx.word_embeddings(ctx_init, n_ctx) if from_words else None)}
        prompts.update({l: FreeTokens(n_ctx, dt) for l in range(2, depth + 1)})
        self.attention = PromptSelfAttention(dt)
        layers = list(range(1, depth + 1))
        if sa_scope == "layer":
            attended = {l: AttendedPrompts(prompts[l], self.attention) for l in layers}
        else:
            attended = {l: JointAttended(self.attention, [prompts[k] for k in layers], l - 1) for l in layers}
            # JointAttended keeps its inputs in a plain list: registered here so that they train whichever
            # tower's sources hold them (with sa_to_text, neither does).
            self.joint_prompts = nn.ModuleList(prompts[l] for l in layers)
        if pms == "none":
            maps = [ZeroPadWidth(dt, dv)] * depth
        elif shared_pms:
            self.pms = pms_mlp(dt, dv, pms)
            maps = [self.pms] * depth
        else:
            self.pms = nn.ModuleList(pms_mlp(dt, dv, pms) for _ in layers)
            maps = list(self.pms)
        vision = {l: Coupled(attended[l], maps[l - 1]) for l in layers}
        if free_visual_prompts:  # N(0, 0.02^2) like VPT's free vision prompts
            vision = {l: Sum(FreeTokens(n_ctx, dv), vision[l]) for l in layers}
        text = dict(attended) if sa_to_text else dict(prompts)
        if integration == "input":
            text[1] = VAIPLInputShift(text[1], self)
        self.text_schedule = TowerSchedule.deep("text", info.text.layers, n_ctx, depth=depth)
        self.vision_schedule = TowerSchedule.deep("vision", info.vision.layers, n_ctx, depth=depth)
        self.set_sources("text", text)
        self.set_sources("vision", vision)
        self.query_proj = nn.Linear(dt, embed) if dt != embed else nn.Identity()
        if fusion == "vaipl":
            out_dim = dt if integration == "input" else embed
            self.decoder = VAIPLDecoder(embed, decoder_layers, out_dim=out_dim, per_class=per_class_decoding)

    def reads_vision_tokens(self) -> bool:
        return self.fusion == "vaipl"  # VAIPL cross-attends to every final image token (CMPP reads none)

    def _trained_dtype(self) -> torch.dtype:
        """The dtype of the trained parts (fp32): VAIPL and CMPP compute in it."""
        return self.attention.block.ln_1.weight.dtype

    def vaipl_classes(self, input_embeds, lengths):
        """The class-only part of VAIPL (queries and the decoder's `prepare`), in the decoder's dtype (fp32)."""
        dtype = self._trained_dtype()
        return self.decoder.prepare(self.query_proj(max_pooled_queries(input_embeds.to(dtype), lengths)))

    def vaipl_features(self, input_embeds, lengths, vision_tokens, vision_proj, classes=None) -> torch.Tensor:
        """u [B, C, d_out]; `classes` is vaipl_classes(input_embeds, lengths) when already computed."""
        dtype = self._trained_dtype()  # the decoder trains in its parameters' dtype (fp32)
        if classes is None:
            classes = self.vaipl_classes(input_embeds, lengths)
        image_tokens = vision_tokens.to(dtype) @ vision_proj.to(dtype)
        return self.decoder(None, image_tokens, prepared=classes)

    def cmpp_shift(self, input_embeds, lengths) -> torch.Tensor:
        """CMPP's vector added to the image features: [C, E] per class, or [E] (`cmpp_mean='all_classes'`)."""
        mean = mean_text_embeddings(input_embeds, lengths, per_class=self.cmpp_mean == "per_class")
        return self.query_proj(mean.to(self._trained_dtype()))

    def class_state(self, text_features, text_input_embeds, text_lengths):
        if self.integration != "post":
            return None
        if self.fusion == "vaipl":
            return self.vaipl_classes(text_input_embeds, text_lengths)
        return self.cmpp_shift(text_input_embeds, text_lengths)

    def heads(self, out: EncoderOutputs) -> dict[str, torch.Tensor]:
        image, text = out.image_features, out.text_features
        if self.integration == "post":
            if self.fusion == "vaipl":
                u = self.vaipl_features(out.text_input_embeds, out.text_lengths, out.vision_tokens, out.vision_proj,
                                        classes=out.class_state)
                text = text.to(u.dtype)[None] + u  # w_{b,c} = w_c + u_{b,c}; cosine_logits normalises
            else:
                shift = out.class_state
                if shift is None:
                    shift = self.cmpp_shift(out.text_input_embeds, out.text_lengths)
                if shift.dim() == 1:  # one vector for every class: f_b + m
                    image = image.to(shift.dtype) + shift
                else:  # f_{b,c} = f_b + m_c, compared with w_c
                    f = F.normalize(image.to(shift.dtype)[:, None] + shift[None], dim=-1).float()
                    w = F.normalize(text.float(), dim=-1)
                    return {"main": out.logit_scale * (f * w[None]).sum(-1)}
        return {"main": cosine_logits(image, text, out.logit_scale)}


__all__ = [
    "MCPLCLIP",
    "PMS_SIZES",
    "VAIPLDecoder",
    "max_pooled_queries",
    "pms_mlp",
    "_attend",
    "_multihead",
    "_project_queries",
]
