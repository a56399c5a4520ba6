"""The general deep-prompt model (METHODS.md §1), eager reference path.

`PromptedCLIP(clip, method, classnames)` runs a frozen open_clip CLIP layer by layer, splicing the
method's prompt tokens into each tower per its schedule, and hands the encoders' outputs to the
method for logits and loss. It drives open_clip's own blocks (no copied source), so it runs on an
unpatched model and, unchanged, on a patched one. This path is the oracle the fast path is checked
against, so it favours clarity: straightforward torch.cat splices, a causal mask per length.

The one exact trim it makes by default is cutting text rows after the last EOT (causal mask + EOT
pooling make later tokens irrelevant; tests prove equality with the full context). On a patched CLIP (or with
last_layer='pooled') each tower's last block also runs on its pooled rows only (the vision CLS rows, the packed
text's EOT rows): the rows nothing reads are not computed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import backbone as bb
from .method import EncoderOutputs, PromptMethod
from .fast import fast_path
from .sources import SourceContext, shared_couplings
from .text import ClassPrompts, tokenize_classes


@dataclass
class InferenceCache:
    """What an inference forward reuses while `key` (PromptedCLIP._cache_key) is unchanged."""

    key: tuple
    memo: dict  # SourceContext.memo entries: every shared coupled source's tokens (both towers' prompts)
    text: tuple | None  # encode_text's (features, input embeddings); None when text prompts depend on the image
    class_state: object = None  # the method's class_state


_SHARED_VISION_TOKENS = "_shared_vision_tokens"  # InferenceCache.memo: {layer: tokens} of the image-independent
# vision sources, computed when the cache is built


@dataclass
class _VisionStem:
    """What a prompted vision pass shares with the frozen teacher pass of the same batch: the state entering its
    first prompted layer (`x`, and the MLP branch not yet added on the fused path), or, for an unprompted tower,
    its pooled output itself. Valid for the same input tensor, unchanged, under the same autocast."""

    images: torch.Tensor
    key: tuple  # (images._version, autocast on, autocast dtype)
    layer: int = 0
    x: torch.Tensor | None = None
    pending: torch.Tensor | None = None
    pooled: torch.Tensor | None = None


def _stem_key(images: torch.Tensor) -> tuple:
    device = images.device.type
    return (images._version, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))


def _bump_fused_versions(optimizer, args, kwargs) -> None:
    params = [p for group in optimizer.param_groups if group.get("fused") for p in group["params"]]
    if params:
        torch.autograd.graph.increment_version(params)


_step_hook = None


def _track_fused_optimizer_steps() -> None:
    """torch's fused SGD/AdamW kernels update parameters in place without bumping their version counters (measured
    on torch 2.13), so the inference cache's key would miss their steps. One process-wide optimizer post-step hook
    bumps the counters of fused groups' parameters (torch.autograd.graph.increment_version, the call meant for such
    kernels). Steps replayed from a CUDA graph run no Python: whoever replays one bumps the versions itself."""
    global _step_hook
    if _step_hook is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _step_hook = register_optimizer_step_post_hook(_bump_fused_versions)


def _default_tokenizer(info: bb.BackboneInfo | None = None):
    """The CLIP tokenizer; padded to `info`'s text context when given (fastprompt.backbone.default_tokenizer)."""
    if info is not None:
        return bb.default_tokenizer(info)
    import open_clip

    return open_clip.get_tokenizer("ViT-B-16")


class PromptedCLIP(nn.Module):
    def __init__(
        self,
        clip: nn.Module,
        method: PromptMethod,
        classnames,
        tokenizer=None,
        truncate_text: bool = True,
        text_path: str = "auto",
        shard_text_classes: bool = False,
        last_layer: str = "auto",
    ):
        super().__init__()
        if text_path not in ("auto", "packed", "reference"):
            raise ValueError(f"text_path must be 'auto', 'packed' or 'reference', got {text_path!r}")
        if text_path == "packed" and not truncate_text:
            raise ValueError("text_path='packed' computes only SOS..EOT; it cannot run with truncate_text=False")
        self.text_path = text_path
        self.last_layer = last_layer
        self.info = bb.inspect_clip(clip)
        if not isinstance(method, PromptMethod):
            raise TypeError(
                f"method must be a PromptMethod (e.g. from fastprompt.build), not {type(method).__name__}"
            )
        self.clip = clip
        # Frozen in place, the caller's flags included (documented in fastprompt.build): a CLIP weight that
        # requires grad would get a gradient computed and kept every step, and the fused MLP keeps its memory
        # saving only for weights that do not.
        for p in clip.parameters():
            p.requires_grad_(False)
        self.method = method
        if last_layer == "pooled" and method.reads_vision_tokens():
            raise ValueError(f"last_layer='pooled': method {method.name!r} reads every final vision token"
                             " (EncoderOutputs.vision_tokens) with these options; use last_layer='auto' or 'full'")
        self.tokenizer = tokenizer or _default_tokenizer(self.info)
        bb.check_tokenizer(self.info, self.tokenizer)
        self.truncate_text = truncate_text
        if self.info.vision_tower == "cnn" and (method.vision_schedule.prompted or method.reads_vision_tokens()):
            raise bb.UnsupportedModelError(bb.cnn_refusal(method.name, type(clip.visual).__name__))
        method.text_schedule.check_layers(self.info.text.layers)
        method.vision_schedule.check_layers(self.info.vision.layers)
        self._check_sources()
        self.trace: list | None = None  # set to [] to record (tower, layer, sequence length)
        self.use_grouped_maps: bool | None = None  # None: grouped coupling maps when the Triton kernels run
        self._grouped = None
        self._inference_caches: dict[bool, InferenceCache] = {}  # by `full` (see inference_cache)
        self._key_modules: list | None = None  # the method's modules with parameters or buffers, for _cache_key
        self._held_cache: InferenceCache | None = None  # see holding_inference_cache
        self._frozen_text_cache: dict = {}
        self._vision_stem: _VisionStem | None = None  # see encode_image and frozen_image_features
        self.text_sharding = None  # a ClassShardedText while shard_text_classes is on
        _track_fused_optimizer_steps()
        self.set_classnames(classnames)
        if shard_text_classes:
            self.shard_text_classes()

    # --- set-up -----------------------------------------------------------------------------------
    @property
    def last_layer(self) -> str:
        """How each tower's last block runs: 'pooled' on the rows its output is pooled from only (the vision CLS
        rows; the EOT rows on the packed text path), 'full' on every row (open_clip's computation; what
        EncoderOutputs.vision_tokens needs), 'auto' pooled on a fastprompt-patched CLIP. Either way the vision
        tower runs full for a method that reads its tokens (PromptMethod.reads_vision_tokens). Exact: after the last
        block nothing mixes rows; the pooled rows' outputs differ from the full block's by GEMM rounding only."""
        return self._last_layer

    @last_layer.setter
    def last_layer(self, value: str) -> None:
        if value not in ("auto", "pooled", "full"):
            raise ValueError(f"last_layer must be 'auto', 'pooled' or 'full', got {value!r}")
        self._last_layer = value

    def pools_last_layer(self, tower: str | None = None) -> bool:
        """Whether `tower`'s ('vision' or 'text') last block runs on its pooled rows only now (see last_layer);
        without a tower, what the last_layer setting asks for before each tower's exceptions (a method reading the
        vision tokens, the reference text path): fastprompt.memory.StepOptions.pooled_last_layer."""
        if self._last_layer == "full":
            return False
        if tower == "vision" and self.method.reads_vision_tokens():
            return False
        if tower == "text" and not self.uses_packed_text():
            return False  # the reference text path computes every row, as the research code does
        return self._last_layer == "pooled" or fast_path(self.clip) is not None

    def _check_sources(self) -> None:
        for tower, sched, sources in (
            ("text", self.method.text_schedule, self.method.text_sources),
            ("vision", self.method.vision_schedule, self.method.vision_sources),
        ):
            for layer, edit in enumerate(sched.edits, start=1):
                has = str(layer) in sources
                if edit.add and not has:
                    raise ValueError(f"{tower} layer {layer} adds {edit.add} tokens but the method gives no source")
                if has and not edit.add:
                    raise ValueError(f"{tower} layer {layer} has a token source but the schedule adds nothing there")
            if tower == "vision" and any(s.scope == "class" for s in sources.values()):
                raise ValueError("vision prompts cannot be class-specific")

    def set_classnames(self, classnames) -> None:
        """(Re)build the class prompts, e.g. to evaluate the same prompts on novel classes. Class-specific prompts
        (CoOp class_specific=True) have one context per class position: another class count is an error, other
        names for as many classes a warning (each context stays with its position)."""
        class_specific = any(s.scope == "class" for s in self.method.text_sources.values())
        prompts = tokenize_classes(self.tokenizer, self.method.template, classnames, self.info.context_length,
                                   self.method.text_slots, warn_duplicates=not class_specific)
        previous = getattr(self, "prompts", None)
        if previous is not None and class_specific:
            old, new = list(previous.classnames), list(prompts.classnames)
            if len(new) != len(old):
                raise ValueError(f"this model's prompts are class-specific (one context for each of its {len(old)}"
                                 f" classes): it cannot take {len(new)} classes; build a model for them and train it")
            if new != old:
                import warnings

                warnings.warn("class-specific prompts follow position: the context trained for "
                              f"{old[0]!r} now scores {new[0]!r}, and so on; pass the training classes in their order"
                              " unless this renaming is meant", UserWarning, stacklevel=2)
        self.prompts: ClassPrompts = prompts
        sched = self.method.text_schedule
        if sched.mode == "replace" and sched.prompted and sched.edits[0].add != self.method.text_slots:
            raise ValueError(
                f"text schedule fills {sched.edits[0].add} slots at layer 1 but the method declares"
                f" {self.method.text_slots}"
            )
        self._inference_caches = {}
        self._key_modules = None
        self._packed = None
        # Counts class sets: a captured training graph reads this set's buffers by address, so TrainStep
        # re-captures when it changes (the buffers above are rebuilt and the old ones freed).
        self.class_set_version = getattr(self, "class_set_version", -1) + 1
        self._device_copies = {}
        # The longest prompt, read from the host here once per class set: a step slices with it and reads nothing.
        self._max_length = self.prompts.max_length

    def _on(self, name: str, device) -> torch.Tensor:
        """A class-prompt tensor (tokens, eot, lengths) on `device`, copied once: no host-to-device copy per
        step (a CUDA graph cannot capture one)."""
        key = (name, torch.device(device))
        if key not in self._device_copies:
            self._device_copies[key] = getattr(self.prompts, name).to(device)
        return self._device_copies[key]

    def shard_text_classes(self, enabled: bool = True, group=None) -> None:
        """Class-sharded text for large class sets (fastprompt.parallel.class_shard): each rank of `group` (None:
        the default process group) encodes its slice of the classes and the text features are all-gathered, with
        gradients for data-parallel training (mean all_reduce of the trainable gradients). Methods whose text
        depends on the image are refused. Every rank must run the same forwards: the gather is a collective."""
        if enabled:
            from .parallel.class_shard import ClassShardedText

            self.text_sharding = ClassShardedText(self.method, group)
        else:
            self.text_sharding = None
        # Same values either way, but a cache built on some ranks only would leave the others in a collective.
        self._inference_caches = {}

    @property
    def classnames(self) -> tuple[str, ...]:
        return self.prompts.classnames

    def train(self, mode: bool = True):
        if mode:  # training computes its prompts with gradients: free the eval-only entry
            self._inference_caches.pop(True, None)
        super().train(mode)
        self.clip.eval()  # frozen backbone: no dropout / batch-norm statistics
        return self

    def trainable_parameters(self):
        return [p for p in self.method.parameters() if p.requires_grad]

    # --- frozen references (teachers, CoCoOp conditioning) -----------------------------------------
    @torch.no_grad()
    def frozen_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen CLIP's image features of `images` (clip.encode_image). For the batch the last forward ran
        on, the layers below the first prompted one are not run again: they are the prompted pass's (the same
        modules on the same input), kept by encode_image for methods whose loss reads this (the teachers)."""
        stem, self._vision_stem = self._vision_stem, None
        if stem is not None and stem.images is images and stem.key == _stem_key(images):
            return self._frozen_from_stem(stem)
        return self.clip.encode_image(images.to(self.clip.visual.conv1.weight.dtype))

    def _frozen_from_stem(self, stem: _VisionStem) -> torch.Tensor:
        """clip.encode_image continued from a prompted pass's stem: the unprompted remaining layers as the CLIP runs
        them (on a patched CLIP the fused blocks and the pooled last block, as its encode_image)."""
        if stem.pooled is not None:
            return stem.pooled
        tower, path = self.clip.visual.transformer, fast_path(self.clip)
        x, pending, last = stem.x, stem.pending, self.info.vision.layers
        for index in range(stem.layer - 1, last):
            if path is None:
                x = bb.run_block(tower, index, x, None)
            elif index == last - 1:
                return bb.vision_pool(self.clip, path.vision_block_cls(tower, index, x, pending))
            else:
                x, pending = path.vision_block(tower, index, x, pending)
        return bb.vision_head(self.clip, x)[0]

    def _keeps_vision_stem(self) -> bool:
        """Whether encode_image keeps its stem for the loss's frozen teacher pass (see frozen_image_features): on a
        patched CLIP (an unpatched one computes what the research code computes: a whole second pass)."""
        visual = self.clip.visual
        return (fast_path(self.clip) is not None and self.method.uses_frozen_image_features()
                and self.info.vision_tower == "transformer"
                and torch.is_grad_enabled()
                and isinstance(visual.patch_dropout, nn.Identity)  # patch dropout draws anew per pass
                and (self.method.vision_schedule.first_prompted_layer or 2) > 1)

    @torch.no_grad()
    def frozen_text_features(self, templates: tuple[str, ...]) -> torch.Tensor:
        """Mean over templates of normalised frozen CLIP text features per class, renormalised."""
        key = (templates, self.prompts.classnames, *self._frozen_key())
        if key not in self._frozen_text_cache:
            dev = self.clip.positional_embedding.device
            feats = []
            for t in templates:
                tok = self.tokenizer([t.format(c) for c in self.prompts.classnames]).to(dev)
                feats.append(nn.functional.normalize(self.clip.encode_text(tok).float(), dim=-1))
            if len(self._frozen_text_cache) >= 4:  # a few entries: a training graph may still read an older one
                self._frozen_text_cache.pop(next(iter(self._frozen_text_cache)))
            self._frozen_text_cache[key] = nn.functional.normalize(torch.stack(feats).mean(0), dim=-1)
        return self._frozen_text_cache[key]

    # --- towers -------------------------------------------------------------------------------------
    def grouped_maps(self):
        """Coupling maps grouped into one launch: on when the patch runs the Triton kernels (or when asked
        for with `model.use_grouped_maps = True`)."""
        path = fast_path(self.clip)
        wanted = self.use_grouped_maps if self.use_grouped_maps is not None else (
            path is not None and path.groups_coupling_maps)
        if not wanted:
            return None
        if self._grouped is None:
            from .fast.grouped import GroupedMaps

            sources = list(self.method.text_sources.values()) + list(self.method.vision_sources.values())
            self._grouped = GroupedMaps(shared_couplings(sources))
        return self._grouped or None

    def _layer_tokens(self, tower: str, ctx: SourceContext) -> dict[int, torch.Tensor]:
        grouped = self.grouped_maps()
        if grouped is not None and not ctx.memo.get("_grouped_done"):
            grouped.run(ctx)
            ctx.memo["_grouped_done"] = True
        sources = self.method.text_sources if tower == "text" else self.method.vision_sources
        cached = ctx.memo.get(_SHARED_VISION_TOKENS, {}) if tower == "vision" else {}
        return {int(k): (cached[int(k)] if int(k) in cached else src(ctx), src.scope) for k, src in sources.items()}

    def _record(self, tower: str, layer: int, length: int) -> None:
        if self.trace is not None:
            self.trace.append((tower, layer, length))

    def encode_image(self, images: torch.Tensor, ctx: SourceContext | None = None):
        """Prompted vision tower. Returns (pooled features [B, E], tokens after ln_post, segment (start, len)); the
        tokens are None when the last block ran on the CLS rows only (pools_last_layer)."""
        ctx = ctx or SourceContext()
        bb.check_images(self.clip, images)
        visual = self.clip.visual
        if self.info.vision_tower == "cnn":  # a frozen feature extractor: no prompts, no tokens (inspect_clip)
            self._vision_stem = None
            return visual(images.to(visual.conv1.weight.dtype)), None, (0, 0)
        sched = self.method.vision_schedule
        tokens = self._layer_tokens("vision", ctx)
        x = bb.vision_embed(self.clip, images)
        batch = x.shape[0]
        start = 1 if sched.site == "head" else x.shape[1]
        seg = 0
        # On a patched CLIP each block's MLP branch stays pending and is added fused into the next block's first
        # LayerNorm (fastprompt.fast.blocks.block_forward_pending); a splice needs the finished sum first.
        path, pending = fast_path(self.clip), None
        last = len(sched.edits) if self.pools_last_layer("vision") else 0
        self._vision_stem = stem = _VisionStem(images, _stem_key(images)) if self._keeps_vision_stem() else None
        for layer, edit in enumerate(sched.edits, start=1):
            if stem is not None and layer == sched.first_prompted_layer:
                stem.layer, stem.x, stem.pending = layer, x, pending  # the frozen teacher continues from here
            splice = None
            if pending is not None and edit.add == edit.drop > 0 and path.fuses_splices:
                # Prompts replacing as many tokens: spliced inside the next block's first LayerNorm kernel, with
                # the pending add (no finished sum, no cat, one pass backward).
                new, scope = tokens[layer]
                new = new.to(x.dtype)
                new = new.unsqueeze(0).expand(batch, -1, -1) if scope == "shared" else new
                splice = (new, x.shape[1], start + seg - edit.drop)
            elif edit.add or edit.drop:
                if pending is not None:
                    x, pending = x + pending.to(x.dtype), None
                # One split rather than two slices: its backward is one cat, a slice's a zero fill and a copy.
                keep, _, rest = x.split([start + seg - edit.drop, edit.drop, x.shape[1] - start - seg], dim=1)
                parts = [keep]
                if edit.add:
                    new, scope = tokens[layer]
                    new = new.to(x.dtype)
                    new = new.unsqueeze(0).expand(batch, -1, -1) if scope == "shared" else new
                    parts.append(new)
                parts.append(rest)
                x = torch.cat(parts, dim=1)
                seg += edit.add - edit.drop
            if layer == 1:
                # First-layer prompts pass through ln_pre with the patches (MaPLe/IVLP semantics).
                x = visual.ln_pre(x)
            self._record("vision", layer, x.shape[1])
            if layer == last:  # the CLS rows alone are read from here on
                if path is not None:
                    cls = path.vision_block_cls(visual.transformer, layer - 1, x, pending, splice)
                else:
                    cls = bb.run_block_cls(visual.transformer, layer - 1, x)
                pooled = bb.vision_pool(self.clip, cls)
                if stem is not None and not sched.prompted:
                    stem.pooled = pooled.detach()  # an unprompted tower's output is the frozen feature
                return pooled, None, (start, seg)
            if path is not None:
                x, pending = path.vision_block(visual.transformer, layer - 1, x, pending, splice)
            else:
                x = bb.run_block(visual.transformer, layer - 1, x, None)
        if pending is not None:
            x = x + pending.to(x.dtype)
        pooled, normed = bb.vision_head(self.clip, x)
        if stem is not None and not sched.prompted:
            stem.pooled = pooled.detach()
        return pooled, normed, (start, seg)

    def _text_rows(self, value: torch.Tensor, scope: str, classes: int, images: int) -> torch.Tensor:
        """Bring a token block to one row per text sequence (rows are image-major: b * C + c)."""
        rows = classes * images
        if scope == "shared":
            return value.unsqueeze(0).expand(rows, -1, -1)
        if scope == "class":
            return value.repeat(images, 1, 1) if images > 1 else value
        if scope == "pair":
            return value.reshape(rows, *value.shape[2:])
        return value.repeat_interleave(classes, dim=0)  # scope == 'image'

    def encode_text(self, ctx: SourceContext | None = None, images: int = 1):
        """Prompted text tower over all classes. Returns (features [R, E], layer-1 input embeddings [C, L, d]).

        R = C, or B*C (image-major) when text prompts depend on the image; `images` is B then.
        """
        ctx = ctx or SourceContext()
        tokens_by_layer = self._layer_tokens("text", ctx)
        if self.text_sharding is not None:  # this rank's classes, all-gathered (per-image text is refused there)
            return self.text_sharding.encode(self, tokens_by_layer)
        return self.encode_text_tokens(tokens_by_layer, images)

    def encode_text_tokens(self, tokens_by_layer: dict, images: int = 1):
        """encode_text from the prompt tokens already computed ({layer: (tokens, scope)}), over this model's
        classes, never sharded."""
        clip = self.clip
        sched = self.method.text_schedule
        if self.uses_packed_text():
            return self._encode_text_packed(tokens_by_layer, images)
        if not any(scope in ("image", "pair") for _, scope in tokens_by_layer.values()):
            images = 1
        dev = clip.positional_embedding.device
        cast = bb.compute_dtype(clip)
        classes = len(self.prompts.classnames)
        length = self._max_length if self.truncate_text else self.info.context_length
        ids = self._on("tokens", dev)[:, :length]
        emb = clip.token_embedding(ids).to(cast)  # [C, L, d]
        x = emb.repeat(images, 1, 1) if images > 1 else emb
        insert = sched.mode == "insert"
        n_slots = self.method.text_slots
        if not insert and sched.prompted:
            first, scope = tokens_by_layer[1]
            slots = self._text_rows(first.to(cast), scope, classes, images)
            # Layer-1 slots are part of the input: they receive the positional embeddings of positions 1..n.
            x = torch.cat([x[:, :1], slots, x[:, 1 + n_slots :]], dim=1)
        input_embeds = x[:classes]
        x = x + clip.positional_embedding[:length].to(cast)
        seg = n_slots if not insert else 0
        for layer, edit in enumerate(sched.edits, start=1):
            if (edit.add or edit.drop) and (insert or layer > 1):
                parts = [x[:, : 1 + seg - edit.drop]]
                if edit.add:
                    new, scope = tokens_by_layer[layer]
                    parts.append(self._text_rows(new.to(cast), scope, classes, images))
                parts.append(x[:, 1 + seg :])
                x = torch.cat(parts, dim=1)
                seg += edit.add - edit.drop
            mask = self._causal_mask(x.shape[1], x.device, x.dtype)
            self._record("text", layer, x.shape[1])
            x = bb.run_block(clip.transformer, layer - 1, x, mask)
        eot = self._on("eot", dev).repeat(images)
        if insert:
            eot = eot + seg
        return bb.text_head(clip, x, eot), input_embeds

    def uses_packed_text(self) -> bool:
        """Packed text runs when asked for, or by default on a fastprompt-patched CLIP."""
        if self.text_path == "auto":
            return self.truncate_text and fast_path(self.clip) is not None
        return self.text_path == "packed"

    def packed_text(self):
        """The packed text tower of this class set (built once per class set: its packing metadata is read from
        the host here, never in a step)."""
        if self._packed is None:
            path = fast_path(self.clip)
            if path is not None:
                self._packed = path.text_encoder(self)
            else:  # text_path='packed' on an unpatched CLIP: the packed tower with PyTorch ops
                from .fast.packed_text import PackedText

                self._packed = PackedText(self)
        return self._packed

    def _encode_text_packed(self, tokens_by_layer, images: int):
        return self.packed_text().encode(tokens_by_layer, images), self.text_input_embeds(tokens_by_layer)

    def text_input_embeds(self, tokens_by_layer) -> torch.Tensor | None:
        """Layer-1 text input embeddings [C, L, d] of all classes for methods that read them (MCPL), else None: an
        embedding lookup, no transformer pass."""
        if not self.method.uses_text_input_embeds:
            return None
        first = tokens_by_layer.get(1)
        if first is not None and self.method.text_schedule.mode == "replace" and first[1] == "shared":
            return self.class_input_embeds(first[0])
        ids = self._on("tokens", self.clip.positional_embedding.device)[:, : self._max_length]
        return self.clip.token_embedding(ids)

    def _causal_mask(self, length: int, device, dtype) -> torch.Tensor:
        cache = self.__dict__.setdefault("_mask_cache", {})
        key = (length, device, dtype)
        if key not in cache:
            cache[key] = bb.causal_mask(length, device, dtype)
        return cache[key]

    # --- the inference cache ----------------------------------------------------------------------------
    # In eval mode without gradients, every value derived only from the parameters and the class set is computed
    # once and reused until the key changes: the text features (unless text prompts depend on the image), the
    # tokens of every coupled prompt source of either tower, and the method's class_state. The key is checked on
    # every forward (~15 us for MaPLe's 27 tensors, ~30 us for MCPL's 101 on a CPU host), so a stale value is
    # never served: see _cache_key for what it covers.
    def clear_cache(self) -> None:
        """Drop the cached text features and prompt tokens; needed only after editing the frozen CLIP's weights in
        place other than through load_state_dict, .to() or the embeddings (which the key sees)."""
        self._inference_caches = {}
        self._frozen_text_cache = {}

    def _frozen_key(self) -> tuple:
        """The frozen text tower's state: where and in which precision it runs, and its weights' identities. A
        load_state_dict (copy_) bumps each weight's version counter; a move or cast gives new storage."""
        clip = self.clip
        device = clip.positional_embedding.device
        weights = (clip.token_embedding.weight, clip.positional_embedding, clip.ln_final.weight)
        return (device, torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type),
                *[(t.data_ptr(), t._version) for t in weights])

    def _cache_key(self, full: bool) -> tuple:
        """Everything the cached values depend on. `full` (eval, no gradients) adds the method's parameters and
        buffers by (storage address, version counter): an optimizer step (fused or not), load_state_dict and any
        in-place edit bump the version; assigning new data or a new Parameter changes the address. A new class set
        or template goes through set_classnames, which empties the cache."""
        key = (full, *self._frozen_key())
        if not full:
            return key
        if self._key_modules is None:
            self._key_modules = [m for m in self.method.modules() if m._parameters or m._buffers]
        # Each module's dicts read at call time: a replaced Parameter shows, and so does a replaced dict (a
        # non-strict torch.export of a module holding this model swaps them and leaves new ones behind).
        tensors = [t for m in self._key_modules for d in (m._parameters, m._buffers) for t in d.values()
                   if t is not None]
        return key + tuple([(t.data_ptr(), t._version) for t in tensors])

    def inference_cache(self) -> InferenceCache | None:
        """The cache a forward would use now (built on a miss), or None when it computes its prompts (training or
        gradients, with text prompts). Without text prompts (zero-shot, VPT) the text features are constants: always
        cached. A CUDA graph of the forward reads the entry's tensors: it is valid while this returns the same entry
        (the eval entry and the training one are kept apart: evaluating does not free what a training graph reads)."""
        if self._held_cache is not None:
            return self._held_cache
        full = not self.training and not torch.is_grad_enabled()
        if not full and self.method.text_sources:
            return None
        key = self._cache_key(full)
        entry = self._inference_caches.get(full)
        if entry is None or entry.key != key:
            self._inference_caches.pop(full, None)  # free the old entry before building the new one
            entry = self._inference_caches[full] = self._build_cache(key, full)
        return entry

    @contextlib.contextmanager
    def holding_inference_cache(self):
        """Within: every forward takes the evaluation cache built (or found) on entry, without checking its key.
        The key reads storage addresses, which a tracer's fake tensors do not have: this is how torch.export
        traces a trained model as a fixed predictor (fastprompt.export.export_program), the class set's text and
        every image-independent prompt becoming constants of the program. Eval mode and no gradients only, since
        only such forwards use the cache; a change to the prompts inside the block is not seen."""
        if self.training or torch.is_grad_enabled():
            raise RuntimeError("holding_inference_cache needs model.eval() and torch.no_grad(): the cache is the"
                               " evaluation one")
        if self._held_cache is not None:
            raise RuntimeError("holding_inference_cache is already active on this model")
        self._held_cache = self.inference_cache()
        try:
            yield self._held_cache
        finally:
            self._held_cache = None

    @torch.no_grad()
    def _build_cache(self, key: tuple, full: bool) -> InferenceCache:
        ctx = SourceContext()
        if full:
            grouped = self.grouped_maps()
            if grouped is not None:  # the same grouped launch as an uncached forward: identical values
                grouped.run(ctx)
            sources = list(self.method.text_sources.values()) + list(self.method.vision_sources.values())
            for coupling in shared_couplings(sources):
                if id(coupling) not in ctx.memo:
                    ctx.memo[id(coupling)] = coupling(ctx)
            ctx.memo["_grouped_done"] = True
            # Every vision layer's tokens that no image changes (scope 'shared'), whatever computes them: MuDPT's
            # cross-modal injection otherwise runs again in each forward (its sources are no Coupled ones).
            ctx.memo[_SHARED_VISION_TOKENS] = {int(k): src(ctx) for k, src in self.method.vision_sources.items()
                                               if src.scope == "shared"}
        memo = dict(ctx.memo)
        text = state = None
        if not self.method.per_image_text():
            text = self.encode_text(ctx)
            if full:
                lengths = self._on("lengths", self.clip.positional_embedding.device)
                state = self.method.class_state(text[0], text[1], lengths)
        return InferenceCache(key=key, memo=memo if full else {}, text=text, class_state=state)

    # --- forward ------------------------------------------------------------------------------------
    def class_input_embeds(self, slots: torch.Tensor) -> torch.Tensor:
        """Layer-1 text input embeddings [C, L, d] of the class prompts with `slots` [n, d] in the learnable
        positions (no positional embedding): what VAIPL pools its queries from."""
        dev = self.clip.positional_embedding.device
        ids = self._on("tokens", dev)[:, : self._max_length]
        emb = self.clip.token_embedding(ids)
        n = self.method.text_slots
        rows = slots.to(emb.dtype).unsqueeze(0).expand(emb.shape[0], -1, -1)
        return torch.cat([emb[:, :1], rows, emb[:, 1 + n :]], dim=1)

    def forward(self, images: torch.Tensor) -> EncoderOutputs:
        method = self.method
        if method.template != self.prompts.template:  # the template was changed: the class prompts follow it
            self.set_classnames(self.prompts.classnames)
        if method.needs_image_features() and not method.vision_schedule.prompted:
            # CoCoOp: the vision tower carries no prompt, so its output *is* the frozen feature: one pass.
            image_features, vision_tokens, segment = self.encode_image(images, SourceContext())
            frozen = image_features.detach()
        else:
            frozen = self.frozen_image_features(images) if method.needs_image_features() else None
            image_features = None
        ctx = SourceContext(image_features=frozen)
        cache = self.inference_cache()
        if cache is not None:
            ctx.memo.update(cache.memo)  # prompt tokens of both towers, computed once
        if image_features is None:
            image_features, vision_tokens, segment = self.encode_image(images, ctx)
        vision_proj = getattr(self.clip.visual, "proj", None)  # None on a CNN tower (its attention pool projects)
        if method.per_image_text():
            ctx.vision_tokens, ctx.vision_proj = vision_tokens, vision_proj
            ctx.class_lengths = self._on("lengths", images.device)
            ctx.class_input_embeds = self.class_input_embeds
            text, input_embeds = self.encode_text(ctx, images=images.shape[0])
            text = text.view(images.shape[0], len(self.classnames), -1)
        else:
            text, input_embeds = cache.text if cache is not None else self.encode_text(ctx)
        out = EncoderOutputs(
            image_features=image_features,
            text_features=text,
            vision_tokens=vision_tokens,
            vision_segment=segment,
            logit_scale=self.clip.logit_scale.exp().float(),
            vision_proj=vision_proj,
            images=images,
            frozen_image_features=frozen,
            text_input_embeds=input_embeds,
            text_lengths=self._on("lengths", images.device),
            class_state=cache.class_state if cache is not None else None,
        )
        out.logits = method.heads(out)
        return out

    def loss(self, out: EncoderOutputs, labels: torch.Tensor):
        """(loss, parts) per the method; `parts` holds detached components for logging."""
        return self.method.loss(out, labels, model=self)

    def predict(self, out: EncoderOutputs, mode: str = "base") -> torch.Tensor:
        if mode not in ("base", "novel"):
            raise ValueError(f"mode must be 'base' or 'novel', got {mode!r}")
        return self.method.predict(out, mode)
