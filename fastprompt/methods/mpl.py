"""MPL, modular prompt learning (METHODS.md §3.5): add / carry / remove vision prompts per layer."""

from __future__ import annotations

from ..method import PromptMethod
from ..schedule import LayerEdit, TowerSchedule
from ..sources import Concat, Coupled, FreeTokens
from ._build import BuildContext, cloned_linears


class MPL(PromptMethod):
    """Text: one slot ("X" in "X a photo of a {}.") replaced per layer 1..J (MaPLe rule).
    Vision: layer 1 appends F_1(ctx_1); layers 2..J remove the last `n_remove` prompt outputs and add
    `n_add` tokens G_l^k(P_l); everything else is carried. With the defaults the first token added at each
    layer is carried to the end and the second is removed after one layer (sequence 198, 199, ..., 206)."""

    name = "mpl"
    template = "X a photo of a {}."

    def __init__(self, ctx: BuildContext, n_ctx: int = 1, n_add: int = 2, n_remove: int = 1, depth: int = 9):
        super().__init__(ctx.info)
        info = ctx.info
        self.template = " ".join(["X"] * n_ctx) + " a photo of a {}."
        self.text_slots = n_ctx
        dt, dv = info.text.width, info.vision.width
        text = {1: FreeTokens(n_ctx, dt, init=ctx.word_embeddings(self.template, n_ctx))}
        text.update({l: FreeTokens(n_ctx, dt) for l in range(2, depth + 1)})
        # F_1 and the (depth-1) * n_add G maps: all deep copies of one initial Linear.
        maps = cloned_linears(dt, dv, 1 + (depth - 1) * n_add)
        vision = {1: Coupled(text[1], maps[0])}
        for l in range(2, depth + 1):
            first = 1 + (l - 2) * n_add
            vision[l] = Concat(*(Coupled(text[l], maps[first + k]) for k in range(n_add)))
        edits = [LayerEdit(0, n_ctx)] + [LayerEdit(n_remove, n_add * n_ctx)] * (depth - 1)
        edits += [LayerEdit()] * (info.vision.layers - depth)
        self.text_schedule = TowerSchedule.deep("text", info.text.layers, n_ctx, depth=depth)
        self.vision_schedule = TowerSchedule("vision", tuple(edits), site="tail")
        self.set_sources("text", text)
        self.set_sources("vision", vision)
