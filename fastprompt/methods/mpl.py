"""MPL, modular prompt learning (METHODS.md §3.5): add / carry / remove vision prompts per layer.

Decisions against the paper (Modular Prompt Learning, Sec. IV and "Implementation Details"):

* Tokens layer 1 adds. Paper: "The number of inserted prompts for each transformer layer of the text encoder
  is 1 and that for the image encoder is 2" -- every layer, the first included. The released trainer adds one
  (F_1(ctx_1)). Default: the paper (layer 1 adds `n_add` groups); `n_first=1` is the released code. Only the
  paper's reading makes "When [add = remove], it is the same as the traditional deep visual prompt" hold for
  every add = remove: with one token at layer 1, add = remove = 2 would drop two tokens from a segment of one.
* Layer-1 maps. The released trainer gives F_1 its own initialisation (METHODS §3.5), separate from the G maps
  (which are deep copies of one Linear, as released). Kept: each layer-1 map is a fresh Linear of its own.
* Units. Each map G_l^k turns the layer's n_ctx text tokens into n_ctx vision tokens, so `n_add` / `n_remove`
  / `n_first` count groups of n_ctx tokens; with the paper's M = 1 ("[ ] a photo of a [class]") they count
  tokens. Remove acts on what the layer inserted ("the remaining continuous prompts whose number is equal to
  the number of inserted prompts by A minus the number of removed prompts by R"), so n_remove <= n_add.
* Which prompts are carried is given only by the released code: the last `n_remove` segment tokens are dropped
  before each layer 2..J (with the defaults the second token added at a layer lives one layer, the first is
  carried to the end). After layer J the segment is carried unchanged, as released.
"""

from __future__ import annotations

import torch.nn as nn

from ..method import PromptMethod
from ..schedule import LayerEdit, TowerSchedule
from ..sources import Concat, Coupled, FreeTokens
from ._build import BuildContext, cloned_linears


def _check_counts(n_ctx: int, n_add: int, n_remove: int, n_first: int, depth: int, layers: int) -> None:
    for name, value, low in (("n_ctx", n_ctx, 1), ("n_add", n_add, 1), ("n_remove", n_remove, 0),
                             ("n_first", n_first, 1), ("depth", depth, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"MPL option {name} must be an int >= {low}, got {value!r}")
    if depth > layers:
        raise ValueError(f"MPL option depth={depth} exceeds the vision tower's {layers} layers")
    if n_remove > n_add:
        raise ValueError(f"MPL removes what a layer inserted: n_remove={n_remove} must not exceed n_add={n_add}")
    if depth > 1 and n_remove > n_first:
        raise ValueError(f"MPL layer 2 removes n_remove={n_remove} groups but layer 1 added n_first={n_first}")


class MPL(PromptMethod):
    """Text: n_ctx slots ("X" in "X a photo of a {}.") replaced per layer 1..J (MaPLe rule).
    Vision: layer 1 appends F_1^k(ctx_1), k = 1..n_first; before layers 2..J the last `n_remove` groups are
    dropped and G_l^k(P_l), k = 1..n_add, appended; everything else is carried. Defaults (paper): 2 added per
    layer, 1 removed, so the vision sequence is 199, 200, ..., 207 over layers 1..9, then 207."""

    name = "mpl"
    template = "X a photo of a {}."

    def __init__(
        self,
        ctx: BuildContext,
        n_ctx: int = 1,
        n_add: int = 2,
        n_remove: int = 1,
        depth: int = 9,
        n_first: int | None = None,
    ):
        super().__init__(ctx.info)
        info = ctx.info
        n_first = n_add if n_first is None else n_first  # None: the paper's "2 for the image encoder" at layer 1 too
        _check_counts(n_ctx, n_add, n_remove, n_first, depth, info.vision.layers)
        ctx.check_depth(self.name, "depth", depth, ("text",))
        self.template = " ".join(["X"] * n_ctx) + " a photo of a {}."
        self.text_slots = n_ctx
        dt, dv = info.text.width, info.vision.width
        text = {1: FreeTokens(n_ctx, dt, init=ctx.word_embeddings(self.template, n_ctx))}
        text.update({l: FreeTokens(n_ctx, dt) for l in range(2, depth + 1)})
        # Layer-1 maps: each its own fresh Linear. Deep maps: deep copies of one Linear, as released.
        first_maps = [nn.Linear(dt, dv) for _ in range(n_first)]
        deep_maps = cloned_linears(dt, dv, (depth - 1) * n_add)
        vision = {1: Concat(*(Coupled(text[1], m) for m in first_maps))}
        for l in range(2, depth + 1):
            maps = deep_maps[(l - 2) * n_add : (l - 1) * n_add]
            vision[l] = Concat(*(Coupled(text[l], m) for m in maps))
        edits = [LayerEdit(0, n_first * n_ctx)] + [LayerEdit(n_remove * n_ctx, n_add * n_ctx)] * (depth - 1)
        edits += [LayerEdit()] * (info.vision.layers - depth)
        self.text_schedule = TowerSchedule.deep("text", info.text.layers, n_ctx, depth=depth)
        self.vision_schedule = TowerSchedule("vision", tuple(edits), site="tail")
        self.set_sources("text", text)
        self.set_sources("vision", vision)
