"""MuDPT (METHODS.md §3.6): deep text and vision prompts fused both ways by an "Injection Model".

Every prompted layer l = 1..J has free text prompts T_l [n, d_t] and free vision prompts V_l [n, d_v]. The
Injection Model turns them into cross-modal prompts, and each tower splices its own prompts plus the
cross-modal ones. Decisions, each against the paper (Sec. II-B, Fig. 4) or the released trainer [C]:

injection (how the cross-modal prompts are computed)
  "cross_attention" (default, the paper). The Injection Model is built "to establish the cross-modality
  attention between the textual and visual prompts": Eq. 6 takes "textual prompts and visual prompts as
  inputs into the Injection Model and obtain[s] cross-modality prompts". So, per layer, the text prompts
  attend to that layer's vision prompts and the vision prompts to the text prompts:
      T~_l = Attn_t(query T_l, keys/values V_l),   V~_l = Attn_v(query V_l, keys/values T_l).
  Widths (512 vs 768): each direction works in its query's width, because its output is added to the
  prompts of that width (Eq. 7); only the key and value projections change width (768 -> 512 for the
  text side, 512 -> 768 for the vision side), the same place where [C]'s linear maps change it. The
  paper names no common latent width, so none is introduced. Heads: width / 64, CLIP's own head width.
  No LayerNorm: the paper names none, and without one the cross-modal term starts at the scale of the
  linear maps' output (the prompts are N(0, 0.02^2)) instead of unit scale. It acts at every prompted
  layer, layer 1 included: Eq. 6 takes the whole T in R^{J x n x 512} and V in R^{J x n x 768}.
  "linear" ([C]'s trainer): text 1: T_1; text l >= 2: T_l + E_vt(V_l); vision 1: V_1 + E_0(T_1); vision
  l >= 2: V_l + E_tv(T_l), with E_0 a map of its own.
  "self_attention" ([C]'s UMuDPT variant): as "linear" with each map replaced by LN -> one residual
  attention block over the layer's n prompts of the *source* modality -> LN -> Linear. It attends within
  one modality only; it is not the paper's cross-modality attention.

combination (Eq. 7): the spliced prompts are the sum of the original and the cross-modal prompts. The
  paper: the prompts "are now composed of original prompts and cross-modality prompts"; [C] sums.

maps (one Injection Model for all layers, or one per layer)
  "shared" (default, the paper): "a light modality-agnostic transformative network", "a tiny transformative
  block, called Injection Model" - one network that takes all J layers' prompts (Eq. 6). With "linear" and
  "self_attention", layer 1's text-to-vision map E_0 stays a map of its own, as in [C].
  "per_layer" ([C]'s trainer: a ModuleList of deep copies): one map (or one cross-attention pair) per layer,
  all starting identical; with "linear"/"self_attention", E_0 keeps its own initialisation.

depth: the default J = 12 is the paper's ("prompt tuning depth of 12", few-shot); the runner's few-shot preset
  uses it, the B2N and cross-dataset presets keep the released configs' J = 9 (the paper gives none there).

Fig. 4 (the Injection Model's hidden layers) is not in our copy of the paper, so the layer structure above is
our reading of the text. Parameter counts (ViT-B/16, n = 4, J = 12; tested from their arithmetic in
tests/test_method_mudpt.py): cross_attention shared 3,343,360, per_layer 39,444,480; linear shared 1,243,136
(METHODS.md §4), per_layer 9,120,256.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock

from ..method import PromptMethod
from ..schedule import TowerSchedule
from ..sources import Coupled, FreeTokens, SourceContext, Sum, TokenSource
from ._build import BuildContext

INJECTIONS = ("cross_attention", "linear", "self_attention")
MAPS = ("shared", "per_layer")


class SelfAttentionInjection(nn.Module):
    """UMuDPT's map: LN -> residual attention block over the n prompt tokens -> LN -> Linear(d_in -> d_out)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.norm_in = nn.LayerNorm(d_in)
        self.block = ResidualAttentionBlock(d_in, max(1, d_in // 64), batch_first=True)
        self.norm_out = nn.LayerNorm(d_in)
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.block(self.norm_in(tokens).unsqueeze(0)).squeeze(0)
        return self.proj(self.norm_out(x))


class CrossAttention(nn.Module):
    """Multi-head attention of `query` tokens [n, d_query] over `context` tokens [m, d_context] of the other
    modality; the result has the query's width (see the module docstring for why)."""

    def __init__(self, d_query: int, d_context: int):
        super().__init__()
        self.heads = max(1, d_query // 64)
        if d_query % self.heads:
            raise ValueError(f"width {d_query} does not split into {self.heads} heads of 64")
        self.query = nn.Linear(d_query, d_query)
        self.key = nn.Linear(d_context, d_query)
        self.value = nn.Linear(d_context, d_query)
        self.out = nn.Linear(d_query, d_query)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        # [..., tokens, d] -> [..., heads, tokens, d / heads]; leading dims (layers) batch through unchanged.
        return x.unflatten(-1, (self.heads, -1)).transpose(-3, -2)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = self._split_heads(self.query(query))
        k = self._split_heads(self.key(context))
        v = self._split_heads(self.value(context))
        mixed = F.scaled_dot_product_attention(q, k, v)
        return self.out(mixed.transpose(-3, -2).flatten(-2))


class CrossModalInjection(nn.Module):
    """Eq. 6 for one layer: (T~, V~) from (T, V), each modality attending to the other."""

    def __init__(self, d_text: int, d_vision: int):
        super().__init__()
        self.text_from_vision = CrossAttention(d_text, d_vision)
        self.vision_from_text = CrossAttention(d_vision, d_text)

    def forward(self, text: torch.Tensor, vision: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text_from_vision(text, vision), self.vision_from_text(vision, text)


class CrossModalLayer(nn.Module):
    """One layer's prompts of both towers through the injection. Both towers read the pair; it is computed once
    per forward and kept in the forward's memo (the vision pass and the text pass share one SourceContext).

    With one injection shared by every layer (maps='shared'), the layers of a `SharedInjectionBatch` are computed
    together: one batched attention per direction for all J layers instead of J small ones (the same arithmetic;
    ~100 fewer kernel launches per forward at J = 12)."""

    def __init__(self, text: TokenSource, vision: TokenSource, injection: CrossModalInjection):
        super().__init__()
        self.text = text
        self.vision = vision
        self.injection = injection
        self.__dict__["batch"] = None  # a SharedInjectionBatch (not a submodule: it holds no parameters of its own)

    def pair(self, ctx: SourceContext | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(T~_l, V~_l)."""
        if self.batch is not None:
            return self.batch.pair(self, ctx)[0]
        return self._single(ctx)[0]

    def prompts(self, ctx: SourceContext | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(T_l + T~_l, V_l + V~_l): Eq. 7, what the towers read."""
        if self.batch is not None:
            return self.batch.pair(self, ctx)[1]
        return self._single(ctx)[1]

    def _single(self, ctx):
        key = ("mudpt_cross_modal", id(self))
        if ctx is not None and key in ctx.memo:
            return ctx.memo[key]
        text, vision = self.text(ctx), self.vision(ctx)
        injected = self.injection(text, vision)
        result = (injected, (text + injected[0], vision + injected[1]))
        if ctx is not None:
            ctx.memo[key] = result
        return result


class SharedInjectionBatch:
    """Every layer's cross-modal pair from one shared injection, computed in one batched call per forward."""

    def __init__(self, layers: list[CrossModalLayer]):
        self.layers = layers
        for layer in layers:
            layer.__dict__["batch"] = self

    def pair(self, layer: CrossModalLayer, ctx: SourceContext | None):
        """((T~_l, V~_l), (T_l + T~_l, V_l + V~_l)) of `layer`, every layer's computed in one go per forward: the
        injection batched over layers, and Eq. 7's sums as one add per tower (bit-identical to per-layer adds; the
        free tokens' two gradients also meet once per tower, at the stack, instead of once per layer)."""
        key = ("mudpt_cross_modal_all", id(self))
        pairs = ctx.memo.get(key) if ctx is not None else None
        if pairs is None:
            text = torch.stack([l.text(ctx) for l in self.layers])  # [J, n, d_text]
            vision = torch.stack([l.vision(ctx) for l in self.layers])  # [J, n, d_vision]
            text_out, vision_out = self.layers[0].injection(text, vision)
            # unbind, not indexing: its backward is one stack, an index's a zero fill and a copy per layer.
            parts = [t.unbind(0) for t in (text_out, vision_out, text + text_out, vision + vision_out)]
            pairs = {id(l): ((t_out, v_out), (t_sum, v_sum)) for l, t_out, v_out, t_sum, v_sum in zip(self.layers, *parts)}
            if ctx is not None:
                ctx.memo[key] = pairs
        return pairs[id(layer)]


class CrossModalPrompts(TokenSource):
    """One tower's half of a layer's cross-modal prompts: T~_l (`side` 'text') or V~_l ('vision').

    It holds no Coupled source, so the grouped coupling launch (fastprompt.fast.grouped) and the inference
    cache's precomputed couplings pass it by; every path evaluates it through forward, the same way."""

    def __init__(self, layer: CrossModalLayer, side: str):
        super().__init__()
        self.layer = layer
        self.index = ("text", "vision").index(side)

    def forward(self, ctx: SourceContext) -> torch.Tensor:
        return self.layer.pair(ctx)[self.index]


class CrossModalSum(Sum):
    """Eq. 7, T_l + T~_l (or V_l + V~_l): the Sum of the layer's free tokens and its CrossModalPrompts (the same
    modules, so checkpoints keep their names), its value taken from the layer's computation, where with a shared
    injection every layer's sum is one add per tower."""

    def forward(self, ctx: SourceContext) -> torch.Tensor:
        return self.second.layer.prompts(ctx)[self.second.index]


def _one_or_copies(module: nn.Module, count: int, per_layer: bool) -> list[nn.Module]:
    """`count` references to `module` (shared), or `count` deep copies of it (per layer, starting identical)."""
    return [copy.deepcopy(module) for _ in range(count)] if per_layer else [module] * count


class MuDPT(PromptMethod):
    name = "mudpt"
    option_choices = {"injection": INJECTIONS, "maps": MAPS}

    def __init__(
        self,
        ctx: BuildContext,
        n_ctx: int = 4,
        depth: int = 12,
        ctx_init: str = "a photo of a",
        injection: str = "cross_attention",
        maps: str = "shared",
    ):
        super().__init__(ctx.info)
        if injection not in INJECTIONS:
            # "attention" was this option's name for the UMuDPT map before the cross-modal one existed.
            hint = " (the UMuDPT map is now 'self_attention')" if injection == "attention" else ""
            raise ValueError(f"injection must be one of {', '.join(INJECTIONS)}; got {injection!r}{hint}")
        if maps not in MAPS:
            raise ValueError(f"maps must be one of {', '.join(MAPS)}; got {maps!r}")
        info = ctx.info
        ctx.check_depth(self.name, "depth", depth)
        dt, dv = info.text.width, info.vision.width
        words = ctx_init.split()
        if n_ctx > len(words):
            raise ValueError(f"n_ctx={n_ctx} needs at least {n_ctx} init words, {ctx_init!r} has {len(words)}")
        # The released code keeps only the first n init words in the template ("a photo {}." for n = 2).
        self.template = " ".join(words[:n_ctx]) + " {}."
        self.text_slots = n_ctx
        self.text_schedule = TowerSchedule.deep("text", info.text.layers, n_ctx, depth=depth)
        self.vision_schedule = TowerSchedule.deep("vision", info.vision.layers, n_ctx, depth=depth)
        t = {1: FreeTokens(n_ctx, dt, init=ctx.word_embeddings(ctx_init, n_ctx))}
        t.update({l: FreeTokens(n_ctx, dt) for l in range(2, depth + 1)})
        v = {l: FreeTokens(n_ctx, dv) for l in range(1, depth + 1)}
        per_layer = maps == "per_layer"
        if injection == "cross_attention":
            text, vision = self._cross_modal(t, v, _one_or_copies(CrossModalInjection(dt, dv), depth, per_layer))
        else:
            make = nn.Linear if injection == "linear" else SelfAttentionInjection
            deep = depth - 1
            to_vision = _one_or_copies(make(dt, dv), deep, per_layer)
            to_text = _one_or_copies(make(dv, dt), deep, per_layer)
            text = {1: t[1]}
            text.update({l: Sum(t[l], Coupled(v[l], to_text[l - 2])) for l in range(2, depth + 1)})
            vision = {1: Sum(v[1], Coupled(t[1], make(dt, dv)))}
            vision.update({l: Sum(v[l], Coupled(t[l], to_vision[l - 2])) for l in range(2, depth + 1)})
        self.set_sources("text", text)
        self.set_sources("vision", vision)

    @staticmethod
    def _cross_modal(t: dict, v: dict, injections: list) -> tuple[dict, dict]:
        """Eq. 7 at every layer: T_l + T~_l and V_l + V~_l."""
        text, vision, layers = {}, {}, []
        for l in t:
            layer = CrossModalLayer(t[l], v[l], injections[l - 1])
            layers.append(layer)
            text[l] = CrossModalSum(t[l], CrossModalPrompts(layer, "text"))
            vision[l] = CrossModalSum(v[l], CrossModalPrompts(layer, "vision"))
        if all(layer.injection is injections[0] for layer in layers):
            SharedInjectionBatch(layers)
        return text, vision
