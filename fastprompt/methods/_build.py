"""What a method needs while it builds itself: backbone facts, the tokenizer, word embeddings.

Other backbones: widths and depths always come from `info` (never ViT-B/16's 512 / 768 / 12). Paper depths are
layer counts on ViT-B/16's 12-layer towers (MaPLe "depth 9", IVLP/VPT 12, MMRL "J = 6"); they are kept as
given on deeper towers (ViT-L/14's 24 vision layers: the papers give no rule to rescale them) and refused with
one error naming the option on shallower ones (`check_depth`), never silently clipped.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..backbone import BackboneInfo


class BuildContext:
    def __init__(self, clip: nn.Module, info: BackboneInfo, tokenizer):
        self.clip = clip
        self.info = info
        self.tokenizer = tokenizer

    @torch.no_grad()
    def word_embeddings(self, text: str, n: int) -> torch.Tensor:
        """Token embeddings [n, d_text] of the first n tokens of `text` (prompt initialisation)."""
        ids = self.tokenizer.encode(text)
        if len(ids) < n:
            raise ValueError(f"{text!r} has {len(ids)} tokens, {n} are needed to initialise the prompt")
        weight = self.clip.token_embedding.weight
        return weight[torch.tensor(ids[:n], device=weight.device)].float().cpu()

    def check_depth(self, method: str, option: str, depth, towers=("text", "vision")) -> None:
        """Prompts in layers 1..`depth` of each of `towers` need that many layers: the paper defaults (MaPLe 9,
        IVLP 12) count ViT-B/16's 12, so a shallower backbone gets one error naming the option, not a schedule
        error from inside."""
        for tower in towers:
            layers = getattr(self.info, tower).layers
            if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= layers:
                raise ValueError(
                    f"{method} option {option}={depth!r} must be between 1 and the {tower} tower's {layers} layers"
                    f" (this backbone: {self.info.text.layers} text, {self.info.vision.layers} vision layers)"
                )


def cloned_linears(d_in: int, d_out: int, count: int) -> nn.ModuleList:
    """`count` Linears that start identical: deep copies of one freshly initialised Linear (MaPLe, MPL, MMRL)."""
    base = nn.Linear(d_in, d_out)
    return nn.ModuleList(copy.deepcopy(base) for _ in range(count))


def template_slots(init: str | None, n: int) -> tuple[str, bool]:
    """Template for n leading learnable slots: the init words when given ("a photo of a {}." with the first n
    tokens learnable, MaPLe/CoCoOp/IVLP), else n placeholder tokens ("X X X X {}.", CoOp random init)."""
    if init:
        return init.strip() + " {}.", True
    return " ".join(["X"] * n) + " {}.", False
