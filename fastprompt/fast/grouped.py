"""All prompted layers' coupling maps in one launch (DESIGN.md §3.5).

MaPLe and MPL map each layer's text prompt into the vision tower with a Linear of its own; MCPL-CLIP's PMS
is a Linear-ReLU-Linear per layer, fed by one prompt self-attention block S applied to each layer's tokens
(a module with a `batched` forward: all layers in one pass); MuDPT and MMRL map with per-layer or shared maps. Run one at a
time that is 9-17 tiny launches each way per step, which dominates at batch 4. `GroupedMaps` finds every
`Coupled` source whose mapping is an nn.Linear (or a Linear-ReLU-Linear) of one shape, stacks their inputs
and weights, runs the grouped op once, and leaves each result in the forward's memo, where
`Coupled.forward` picks it up. Weights are stacked per forward (a copy of a few MB), so gradients reach
each layer's own parameters through the ordinary autograd of `torch.stack`. Stacking once per parameter
version would save nothing in training (every optimizer step makes a new version, and each forward needs
its own autograd graph of the stack to route gradients; 2 of MaPLe's ~430 launches per step), and in
evaluation the inference cache already keeps the grouped results while the parameters are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def _kind(mapping: nn.Module):
    if callable(getattr(mapping, "batched", None)):
        # One module applied to several layers' tokens (MCPL's shared prompt self-attention S): its own batched
        # forward over a leading layer axis, no weights to stack.
        return ("batched", id(mapping))
    if isinstance(mapping, nn.Linear) and mapping.bias is not None:
        return ("linear", mapping.in_features, mapping.out_features)
    if (
        isinstance(mapping, nn.Sequential)
        and len(mapping) == 3
        and isinstance(mapping[0], nn.Linear)
        and isinstance(mapping[1], nn.ReLU)
        and isinstance(mapping[2], nn.Linear)
        and mapping[0].bias is not None
        and mapping[2].bias is not None
    ):
        return ("bottleneck", mapping[0].in_features, mapping[0].out_features, mapping[2].out_features)
    return None


def _nesting(coupling) -> int:
    """How many coupled sources lie below this one (0: its input is plain tokens)."""
    from ..sources import Coupled, _children

    below, stack = 0, list(_children(coupling))
    while stack:
        src = stack.pop()
        below += isinstance(src, Coupled)
        stack.extend(_children(src))
    return below


class GroupedMaps:
    def __init__(self, couplings):
        """`couplings`: the model's coupled sources whose input is shared by every image and class (see
        fastprompt.sources.shared_couplings); each has `.mapping`, `.source(ctx)`, and reads its grouped
        result from `ctx.memo[id(coupling)]`."""
        groups = {}
        for src in couplings:
            kind = _kind(src.mapping)
            if kind is not None:
                groups.setdefault(kind, []).append(src)
        # A group of one gains nothing; distinct mappings only (MuDPT shares one map across layers: still fine).
        # Groups whose members feed other groups' inputs run first (MCPL: S, then the PMS that maps S's output),
        # so each input is read from the memo rather than computed one layer at a time.
        groups = {k: v for k, v in groups.items() if len(v) > 1}
        self.groups = dict(sorted(groups.items(), key=lambda item: max(_nesting(m) for m in item[1])))

    def __bool__(self) -> bool:
        return bool(self.groups)

    def run(self, ctx) -> None:
        from ..ops.grouped_mlp import grouped_bottleneck_mlp, grouped_linear

        for kind, members in self.groups.items():
            inputs = [m.source(ctx) for m in members]
            by_tokens: dict[int, list[int]] = {}
            for i, x in enumerate(inputs):
                by_tokens.setdefault(x.shape[0], []).append(i)
            for indices in by_tokens.values():
                if len(indices) < 2:
                    continue
                group = [members[i] for i in indices]
                x = torch.stack([inputs[i] for i in indices])
                dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
                if kind[0] == "batched":
                    out = group[0].mapping.batched(x)
                elif kind[0] == "linear":
                    w = torch.stack([m.mapping.weight for m in group]).to(dtype)
                    b = torch.stack([m.mapping.bias for m in group]).to(dtype)
                    out = grouped_linear(x.to(dtype), w, b)
                else:
                    first, last = [m.mapping[0] for m in group], [m.mapping[2] for m in group]
                    out = grouped_bottleneck_mlp(
                        x.to(dtype),
                        torch.stack([l.weight for l in first]).to(dtype),
                        torch.stack([l.bias for l in first]).to(dtype),
                        torch.stack([l.weight for l in last]).to(dtype),
                        torch.stack([l.bias for l in last]).to(dtype),
                    )
                for member, value in zip(group, out.unbind(0)):
                    ctx.memo[id(member)] = value
