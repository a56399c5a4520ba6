"""Where new prompt tokens come from (METHODS.md §1.2).

A source is a small module whose forward returns the block of tokens a layer adds:
  [a, d]        shared by every image and class (most methods),
  [C, a, d]     one block per class (CoOp class-specific context), text tower only,
  [B, a, d]     one block per image (instance-conditioned: CoCoOp),
  [B, C, a, d]  one block per image and class ('pair'; MCPL's input-level VAIPL), text tower only.
Sources compose: a coupled source maps another source's tokens, a sum adds two sources, a shared
latent is one free block mapped per layer into either tower. A source that several layers or both
towers use is one module, so its parameters are counted and updated once.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class SourceContext:
    """Per-forward inputs a source may read.

    image_features: frozen image features (instance-conditioned prompts such as CoCoOp's);
    vision_tokens / vision_proj: the prompted vision output, for text sources that run after the
    vision pass (MCPL's input-level VAIPL); class_lengths and class_input_embeds(slots): the class
    prompts' input embeddings with given layer-1 slots; memo: results shared within one forward.
    """

    def __init__(self, image_features: torch.Tensor | None = None):
        self.image_features = image_features
        self.vision_tokens: torch.Tensor | None = None
        self.vision_proj: torch.Tensor | None = None
        self.class_lengths: torch.Tensor | None = None
        self.class_input_embeds = None
        self.memo: dict = {}


class TokenSource(nn.Module):
    """Base of all sources: subclasses define `forward(ctx) -> tokens` and set `scope`."""

    #: 'shared', 'class' or 'image': how the returned tokens vary (see the module docstring).
    scope = "shared"


class FreeTokens(TokenSource):
    """A free parameter block [n, d] (or [C, n, d] when `per_class`), from `init` or N(0, std^2)."""

    def __init__(self, n: int, width: int, init: torch.Tensor | None = None, std: float = 0.02, classes: int = 0):
        super().__init__()
        shape = (classes, n, width) if classes else (n, width)
        if init is not None:
            if tuple(init.shape[-2:]) != (n, width):
                raise ValueError(f"init has shape {tuple(init.shape)}, expected (..., {n}, {width})")
            value = init.detach().float().expand(shape).clone()
        else:
            value = torch.randn(shape) * std
        self.tokens = nn.Parameter(value)
        self.scope = "class" if classes else "shared"

    def forward(self, ctx: SourceContext) -> torch.Tensor:
        return self.tokens

    def extra_repr(self) -> str:
        return f"shape={tuple(self.tokens.shape)}"


class Coupled(TokenSource):
    """`mapping(source(ctx))`: a Linear, a bottleneck MLP, or an attention block then a map (MaPLe, MPL, PMS)."""

    def __init__(self, source: TokenSource, mapping: nn.Module):
        super().__init__()
        self.source = source
        self.mapping = mapping
        self.scope = source.scope

    def forward(self, ctx: SourceContext) -> torch.Tensor:
        grouped = ctx.memo.get(id(self)) if ctx is not None else None  # computed with its peers (grouped.py)
        return grouped if grouped is not None else self.mapping(self.source(ctx))


class Sum(TokenSource):
    """Elementwise sum of two sources (MuDPT: free tokens plus the other tower's mapped tokens)."""

    def __init__(self, first: TokenSource, second: TokenSource):
        super().__init__()
        self.first = first
        self.second = second
        scopes = {first.scope, second.scope} - {"shared"}
        if len(scopes) > 1:
            raise ValueError(f"cannot sum sources of scopes {sorted(scopes)}")
        self.scope = scopes.pop() if scopes else "shared"

    def forward(self, ctx: SourceContext) -> torch.Tensor:
        return self.first(ctx) + self.second(ctx)


class Concat(TokenSource):
    """Several sources' tokens stacked along the token axis (MPL adds two coupled tokens per layer)."""

    def __init__(self, *sources: TokenSource):
        super().__init__()
        self.parts = nn.ModuleList(sources)
        scopes = {s.scope for s in sources}
        if len(scopes) != 1:
            raise ValueError(f"cannot concatenate sources of scopes {sorted(scopes)}")
        self.scope = scopes.pop()

    def forward(self, ctx: SourceContext) -> torch.Tensor:
        return torch.cat([p(ctx) for p in self.parts], dim=-2)


class InstanceShift(TokenSource):
    """`base + net(f_b)` on every token: a per-image shift of shared tokens (CoCoOp's meta-net).

    f_b is the frozen image feature, L2-normalised first when `normalize` (CoCoOp feeds the normalised one).
    """

    scope = "image"

    def __init__(self, base: TokenSource, net: nn.Module, normalize: bool = True):
        super().__init__()
        if base.scope != "shared":
            raise ValueError("InstanceShift needs a shared base source")
        self.base = base
        self.net = net
        self.normalize = normalize

    def forward(self, ctx: SourceContext) -> torch.Tensor:
        if ctx.image_features is None:
            raise RuntimeError("an instance-conditioned source needs image features")
        base = self.base(ctx)
        features = ctx.image_features.to(base.dtype)
        if self.normalize:
            features = torch.nn.functional.normalize(features, dim=-1)
        shift = self.net(features)  # [B, d]
        return base.unsqueeze(0) + shift.unsqueeze(1)


def bottleneck_mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    """Linear -> ReLU -> Linear (CoCoOp meta-net, MCPL PMS)."""
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(inplace=False), nn.Linear(hidden, d_out))


def _children(src: TokenSource):
    if isinstance(src, Coupled):
        yield src.source
    elif isinstance(src, Sum):
        yield from (src.first, src.second)
    elif isinstance(src, Concat):
        yield from src.parts
    elif isinstance(src, InstanceShift):
        yield src.base


def shared_couplings(sources) -> list[Coupled]:
    """Every Coupled source reachable from `sources` whose input is shared by all images and classes, each
    once: what fastprompt.fast.grouped can run as one grouped launch."""
    seen, found, stack = set(), [], list(sources)
    while stack:
        src = stack.pop()
        if id(src) in seen:
            continue
        seen.add(id(src))
        stack.extend(_children(src))
        if isinstance(src, Coupled) and src.source.scope == "shared":
            found.append(src)
    return found
