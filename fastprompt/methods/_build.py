"""What a method needs while it builds itself: backbone facts, the tokenizer, word embeddings."""

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
