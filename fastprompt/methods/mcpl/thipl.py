"""THIPL's parts: the prompt self-attention S, the prompt mapping structure (PMS) and its parameter-free stand-in
for the paper's ablation without PMS (METHODS.md §3.9)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.transformer import QuickGELU, ResidualAttentionBlock

from ...sources import Coupled, SourceContext, TokenSource

#: PMS scales of the paper's "Analysis of PMS Scale": (hidden width, number of Linear layers).
PMS_SIZES = {"standard": (128, 2), "large": (128, 4), "xlarge": (256, 4)}
PMS_CHOICES = (*PMS_SIZES, "none")


def pms_mlp(d_in: int, d_out: int, size: str) -> nn.Sequential:
    """Bottleneck MLP: Linear -> ReLU -> ... -> Linear with `linears` Linear layers of the given hidden width."""
    if size not in PMS_SIZES:
        raise ValueError(f"pms must be one of {list(PMS_CHOICES)}, got {size!r}")
    hidden, linears = PMS_SIZES[size]
    dims = [d_in] + [hidden] * (linears - 1) + [d_out]
    layers: list[nn.Module] = []
    for i in range(linears):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < linears - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ZeroPadWidth(nn.Module):
    """`pms='none'`: the text prompt vectors themselves in a wider vision tower, [.., d_in] -> [.., d_out] with
    zeros in the extra coordinates. No parameters, so the ablation removes every learned text-to-vision map;
    the first d_in coordinates of each visual prompt are exactly the text prompt ("the text prompt vectors are
    the same as the visual prompt vectors")."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        if d_in > d_out:
            raise ValueError(
                f"pms='none' uses the text prompts unchanged as visual prompts, which needs the vision width "
                f"({d_out}) to be at least the text width ({d_in}); choose a PMS size instead"
            )
        self.extra = d_out - d_in

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.pad(tokens, (0, self.extra)) if self.extra else tokens

    def extra_repr(self) -> str:
        return f"zeros appended={self.extra}"


class PromptSelfAttention(nn.Module):
    """S: one pre-LN residual attention block (QuickGELU MLP) over a set of prompt tokens [n, d] -> [n, d]."""

    def __init__(self, width: int):
        super().__init__()
        self.block = ResidualAttentionBlock(width, max(1, width // 64), act_layer=QuickGELU, batch_first=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.block(tokens.unsqueeze(0)).squeeze(0)

    def batched(self, tokens: torch.Tensor) -> torch.Tensor:
        """[k, n, d] -> [k, n, d]: k token sets (one per layer) at once, each attending only within itself: what
        `forward` gives each set, in one pass instead of k (fastprompt.fast.grouped)."""
        return self.block(tokens)


class AttendedPrompts(Coupled):
    """S(P_l), computed once per forward even when both towers read it (`sa_to_text`: the text slots and the
    PMS input are the same tokens). The value sits in the forward's memo under this source's id, where
    Coupled.forward and the inference cache look for coupled results."""

    def forward(self, ctx: SourceContext | None) -> torch.Tensor:
        if ctx is None:
            return self.mapping(self.source(ctx))
        value = ctx.memo.get(id(self))
        if value is None:
            value = ctx.memo[id(self)] = self.mapping(self.source(ctx))
        return value


class JointAttended(TokenSource):
    """Layer l's slice of S applied jointly to all layers' prompt tokens (computed once per forward)."""

    def __init__(self, attention: PromptSelfAttention, sources: list[TokenSource], index: int):
        super().__init__()
        self.attention = attention
        self.sources = sources  # plain list: the sources are registered as the text tower's sources
        self.index = index

    def forward(self, ctx: SourceContext | None) -> torch.Tensor:
        memo = ctx.memo if ctx is not None else {}
        joint = memo.get(id(self.attention))
        if joint is None:
            joint = memo[id(self.attention)] = self.attention(torch.cat([s(ctx) for s in self.sources], dim=0))
        n = self.sources[self.index](ctx).shape[0]
        return joint[self.index * n : (self.index + 1) * n]
