"""`fastprompt.patch(clip)`: swap one open_clip CLIP instance onto fastprompt's kernels, reversibly.

What it does to the instance (and nothing else: no open_clip module globals change):
- every `ResidualAttentionBlock` of both towers gets a subclass (class swap; no new parameters, same
  state_dict keys and tensors) whose forward runs LayerNorm with fp32 statistics, one qkv GEMM, the
  chosen attention backend without a dense mask (causal when open_clip passes its causal mask), and the
  frozen-weight MLP; any other mask falls back to the original forward, exactly;
- `encode_text` becomes an instance attribute (a callable) that cuts the 77-token rows after the last EOT
  (exact, see fastprompt.model) before running the same modules; while the CLIP's `attn_mask` buffer is the
  causal mask (its values read at patch time and again only when the buffer changes) the blocks run as causal
  without a mask to inspect, each block's residual add fused into the next block's first LayerNorm;
- the vision tower's Transformer gets an instance `forward` that runs its blocks the same way (residual adds
  fused into the next LayerNorm) when no mask is given, and the VisionTransformer an instance `forward` that runs
  its last block on the CLS rows only (the pooled feature reads nothing else), so `encode_image` gains too;
- a `FastPath` object kept on the model (`fastprompt.fast.fast_path(model)`, also `model.fastprompt_patch`)
  records what was patched, with which kernels, and why; the general model asks it, and nothing else, how
  to run the fast path.
`unpatch(model)` restores the original classes and methods (outputs are then bit-identical to a model
never patched). Patching twice only updates the kernel choice. A patched model pickles (pickle, torch.save,
copy.deepcopy) and loads as a patched model; `unpatch` of anything but an open_clip CLIP is an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .. import backbone as bb
from .blocks import BlockKernels, block_forward, block_forward_cls, block_forward_pending, fuses_splices

logger = logging.getLogger(__name__)

_MARK = "_fastprompt_original_class"


@dataclass
class FastPath:
    """The fast path of one patched CLIP: the kernel plan chosen at patch time and the report of what changed."""

    blocks: dict[str, int] = field(default_factory=dict)  # tower -> number of patched blocks
    kernels: BlockKernels = field(default_factory=BlockKernels)
    reasons: list[str] = field(default_factory=list)
    encode_text: bool = False
    # (address, version, shape, dtype, device) of the text tower's mask buffer when it was last found causal: the
    # patched encode_text then runs its blocks as causal without reading the mask's values in a step (reading
    # them is a host sync on a GPU, and impossible while tracing with fake tensors).
    causal_mask_key: tuple | None = field(default=None, repr=False)

    def text_mask_is_causal(self, mask: torch.Tensor | None) -> bool:
        """Whether `mask` (a CLIP's `attn_mask` buffer) is the causal mask, its values read once per version."""
        if mask is None:
            return False
        key = _mask_key(mask)
        if key != self.causal_mask_key:
            self.causal_mask_key = key if _is_causal_mask(mask) else None
        return self.causal_mask_key is not None

    def __str__(self) -> str:
        towers = ", ".join(f"{n} {t} blocks" for t, n in self.blocks.items())
        mlp = self.kernels.norm_mlp + (f" (first GEMM: {self.kernels.mlp_gemm})" if self.kernels.norm_mlp == "triton"
                                       else "")
        image = (" encode_image's last block on the CLS rows only" if "vision" in self.blocks
                 else " the CNN vision tower as open_clip runs it")
        lines = [f"fastprompt.patch: {towers}; LayerNorm/MLP: {mlp}; attention: "
                 f"{self.kernels.attention}; encode_text truncated after the last EOT: {self.encode_text};{image}"]
        lines += [f"  - {r}" for r in self.reasons]
        return "\n".join(lines)

    @property
    def groups_coupling_maps(self) -> bool:
        """Run every prompted layer's coupling map in one grouped launch (worth it with the Triton kernels)."""
        return self.kernels.norm_mlp == "triton"

    def vision_block(self, tower, index: int, x: torch.Tensor, pending: torch.Tensor | None, splice=None):
        """Block `index` of the patched vision tower on x + pending (with `splice`'s rows replaced, see
        fastprompt.fast.blocks.add_layer_norm), the residual add left pending across blocks
        (fastprompt.fast.blocks.block_forward_pending); open_clip's grad_checkpointing flag honoured."""
        block = tower.resblocks[index]
        if tower.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block_forward_pending, block, x, pending, False, self.kernels, splice,
                              use_reentrant=False)
        return block_forward_pending(block, x, pending, False, self.kernels, splice)

    def vision_block_cls(self, tower, index: int, x: torch.Tensor, pending: torch.Tensor | None, splice=None):
        """vision_block's finished output at the CLS rows only, [B, D] (fastprompt.fast.blocks.block_forward_cls):
        the tower's last block when nothing reads the other tokens."""
        block = tower.resblocks[index]
        if tower.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block_forward_cls, block, x, pending, self.kernels, splice, use_reentrant=False)
        return block_forward_cls(block, x, pending, self.kernels, splice)

    @property
    def fuses_splices(self) -> bool:
        """Prompt splices that replace as many rows as they remove run inside the next LayerNorm kernel."""
        return fuses_splices(self.kernels)

    def text_encoder(self, model):
        """The packed text tower for a PromptedCLIP built on this CLIP (fastprompt.fast.packed_text)."""
        from .packed_text import PackedText

        return PackedText(model, kernels=self.kernels)


def _is_causal_mask(mask: torch.Tensor) -> bool:
    """True for open_clip's additive causal mask (0 on/below the diagonal, -inf above) or a bool equivalent."""
    if mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        return False
    upper = torch.ones(mask.shape, dtype=torch.bool, device=mask.device).triu(1)
    if mask.dtype == torch.bool:  # True = masked out (nn.MultiheadAttention convention)
        return torch.equal(mask, upper)
    return bool(torch.isneginf(mask[upper]).all()) and bool((mask[~upper] == 0).all())


def _mask_key(mask: torch.Tensor) -> tuple:
    return (mask.data_ptr(), mask._version, tuple(mask.shape), mask.dtype, mask.device)


class FastResidualAttentionBlock:
    """Mixed into a subclass of the block's own class at patch time (see `_fast_class`)."""

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
        if attn_mask is None:
            causal = False
        else:
            key = _mask_key(attn_mask)
            cache = self.__dict__.setdefault("_fastprompt_mask_cache", {})
            if key not in cache:
                cache.clear()
                cache[key] = _is_causal_mask(attn_mask)
            if not cache[key]:
                # A mask that is not the causal one: keep the original computation, exactly.
                return getattr(self, _MARK).forward(self, q_x, k_x, v_x, attn_mask)
            causal = True
        return block_forward(self, q_x, causal, self._fastprompt_kernels)

    def __reduce_ex__(self, protocol):
        # The subclass is made at patch time, so pickle (torch.save, copy.deepcopy) cannot find it by name: a
        # block is stored as its original (importable) class plus its state, and `_rebuild_fast_block` makes the
        # subclass again on load. The mask cache is keyed by tensor addresses, meaningless in another process.
        state = self.__getstate__()
        state.pop("_fastprompt_mask_cache", None)
        return _rebuild_fast_block, (state[_MARK],), state


_FAST_CLASSES: dict[type, type] = {}


def _fast_class(original: type) -> type:
    if original not in _FAST_CLASSES:
        _FAST_CLASSES[original] = type(f"Fast{original.__name__}", (FastResidualAttentionBlock, original), {})
    return _FAST_CLASSES[original]


def _rebuild_fast_block(original: type):
    """An empty patched block of `original`'s fast subclass; pickle then restores its state (__setstate__)."""
    cls = _fast_class(original)
    return cls.__new__(cls)


def _as_tower_runs(tower: nn.Module, fn, *args):
    """fn(*args), checkpointed whenever the tower's grad_checkpointing flag is set (with or without gradients), as
    open_clip's own loop runs its blocks."""
    return checkpoint(fn, *args, use_reentrant=False) if tower.grad_checkpointing else fn(*args)


def _vision_blocks(tower: nn.Module, blocks, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`blocks` of a patched non-causal tower on x, each block's MLP branch added fused into the next block's first
    LayerNorm (block_forward_pending): (x, the last block's branch, not added)."""
    pending = None
    for block in blocks:
        x, pending = _as_tower_runs(tower, block_forward_pending, block, x, pending, False, block._fastprompt_kernels)
    return x, pending


class _FastVisionTransformer:
    """`forward` of a patched vision tower's Transformer, stored on the instance (so clip.encode_image, the frozen
    image features methods read, and zero-shot use gain too): with no mask, each block's MLP branch is added fused
    into the next block's first LayerNorm (block_forward_pending); with a mask, open_clip's own loop."""

    def __init__(self, tower: nn.Module):
        self.__self__ = tower

    def __call__(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None):
        tower = self.__self__
        if attn_mask is not None:
            return type(tower).forward(tower, x, attn_mask=attn_mask)
        x, pending = _vision_blocks(tower, tower.resblocks, x)
        return x + pending.to(x.dtype)

    def __repr__(self) -> str:
        return f"<fastprompt patched forward of {type(self.__self__).__name__} at {id(self.__self__):#x}>"


class _FastVisionForward(_FastVisionTransformer):
    """`forward` of a patched VisionTransformer, stored on the instance: open_clip's own embedding (`_embeds`, ln_pre
    included), the blocks as the patched Transformer runs them, the last block on the CLS rows only
    (fastprompt.fast.blocks.block_forward_cls), then ln_post and the projection of those rows. Exact: the pooled
    feature of the towers patch accepts (CLS pooling, ln_post before pooling, no token output) reads nothing else.
    open_clip's forward runs instead where the tower's own call matters: hooks on visual.transformer, or an
    open_clip without `_embeds`."""

    def __call__(self, x: torch.Tensor):
        visual = self.__self__
        tower = visual.transformer
        if (visual.output_tokens or not hasattr(visual, "_embeds") or tower._forward_hooks
                or tower._forward_pre_hooks):
            return type(visual).forward(visual, x)
        *blocks, last = tower.resblocks
        x, pending = _vision_blocks(tower, blocks, visual._embeds(x))
        cls = _as_tower_runs(tower, block_forward_cls, last, x, pending, last._fastprompt_kernels)
        pooled = visual.ln_post(cls)
        return pooled @ visual.proj if visual.proj is not None else pooled


class _FastEncodeText:
    """`encode_text` of a patched CLIP, stored on the instance. A callable object rather than a bound method: a
    bound method pickles as getattr(model, name), which on load would find CLIP.encode_text, the unpatched one."""

    def __init__(self, model: nn.Module):
        self.__self__ = model

    def __call__(self, text: torch.Tensor, normalize: bool = False):
        return _fast_encode_text(self.__self__, text, normalize)

    def __repr__(self) -> str:
        return f"<fastprompt patched encode_text of {type(self.__self__).__name__} at {id(self.__self__):#x}>"


def _fast_encode_text(self, text: torch.Tensor, normalize: bool = False):
    """CLIP.encode_text with rows cut after the last EOT: exact for causal towers with EOT pooling."""
    # The cut reads the longest row's EOT position from the host; tokens without values (fake tensors while
    # tracing) keep every position, which is exact too.
    cut = self.text_pool_type == "argmax" and type(text) is torch.Tensor
    length = int(text.argmax(dim=-1).max()) + 1 if cut else text.shape[1]
    text = text[:, :length]
    cast = self.transformer.get_cast_dtype()
    x = self.token_embedding(text).to(cast) + self.positional_embedding[:length].to(cast)
    path = fast_path(self)
    if path is not None and path.text_mask_is_causal(self.attn_mask):
        # The buffer is the causal mask (checked once per version): the blocks run causal without a mask to inspect.
        # Each block's MLP branch is added fused into the next block's first LayerNorm (block_forward_pending).
        tower, pending = self.transformer, None
        for block in tower.resblocks:
            if tower.grad_checkpointing and torch.is_grad_enabled():
                x, pending = checkpoint(block_forward_pending, block, x, pending, True, path.kernels,
                                        use_reentrant=False)
            else:
                x, pending = block_forward_pending(block, x, pending, True, path.kernels)
        x = x + pending.to(x.dtype)
    else:
        x = self.transformer(x, attn_mask=self.attn_mask[:length, :length])
    x = self.ln_final(x)
    from open_clip.transformer import text_global_pool

    x = text_global_pool(x, text, self.text_pool_type, eos_token_id=getattr(self, "text_eos_id", None))
    x = x @ self.text_projection
    return nn.functional.normalize(x, dim=-1) if normalize else x


def _resolve_kernels(model: nn.Module, backend: str, info, mlp_gemm: str = "auto") -> tuple[BlockKernels, list[str]]:
    from ..ops import backends, gemm_plan

    device = next(model.parameters()).device
    reasons = []
    if backend == "auto":
        problem = backends.block_kernels_problem(device)
        norm_mlp = "triton" if problem is None else "torch"
        if problem is not None:
            reasons.append(f"LayerNorm/MLP use PyTorch ops: {problem}")
        attention = "auto"
    else:
        norm_mlp = "triton" if backend == "triton" else "torch"
        attention = backend
        if backend == "triton":
            problem = backends.triton_import_problem()
            if problem:
                raise RuntimeError(f"backend='triton' requested but Triton cannot run: {problem}")
            if device.type != "cuda" and not backends.triton_interpreted():
                raise RuntimeError(
                    "backend='triton' requested on a CPU model: Triton kernels run on CUDA GPUs (or on CPU only"
                    " under TRITON_INTERPRET=1, for tests); use backend='auto' or 'sdpa'"
                )
    gemm, why = gemm_plan.resolve(mlp_gemm, device.type)  # a bad value is refused whatever runs the MLP
    if norm_mlp == "triton":
        reasons.append(why)
    else:
        gemm = "triton"  # no first-GEMM plan: the MLP runs as PyTorch ops
    # The attention backend must be able to serve both towers' head dims at the model's dtype.
    dtype = bb.compute_dtype(model)
    towers = (("vision", info.vision, False), ("text", info.text, True))
    for name, tower, causal in towers[info.vision_tower == "cnn":]:  # a CNN vision tower has no attention to patch
        choice = backends.explain_backend("attention", device=device, dtype=dtype, head_dim=tower.head_dim,
                                          causal=causal, backend=attention)
        if choice.chosen is None:
            raise RuntimeError(f"cannot patch the {name} tower's attention: {choice}")
        reasons.append(f"{name} attention: {str(choice).splitlines()[0]}")
    return BlockKernels(norm_mlp=norm_mlp, attention=attention, mlp_gemm=gemm), reasons


def _is_built_model(model) -> bool:
    """A PromptedCLIP (fastprompt.build's model): the patch belongs on its CLIP. By its attributes, since
    fastprompt.model imports this module."""
    return hasattr(model, "clip") and hasattr(model, "method")


def patch(model: nn.Module, backend: str = "auto", verbose: bool = False, mlp_gemm: str = "auto") -> nn.Module:
    """Patch `model` (an open_clip CLIP) in place onto fastprompt's kernels and return it; exact, reversible.

    The explanation is here rather than only in the module docstring: `help(fastprompt.patch)` shows this
    text, and the module cannot be reached by name (`fastprompt.fast.patch` is this function).

    What it changes on this instance (and nothing else: no open_clip module globals change):
    - every `ResidualAttentionBlock` of both towers gets a subclass (a class swap: no new parameters, the
      same state_dict keys and tensors, load_state_dict(strict=True) still works) whose forward runs
      LayerNorm with fp32 statistics, one qkv GEMM, the chosen attention backend without a dense mask
      (causal when open_clip passes its causal mask) and the frozen-weight MLP; any other mask falls back
      to the original forward, exactly;
    - `encode_text` cuts the 77-token rows after the last EOT (exact: causal mask + EOT pooling) before
      running the same modules, so zero-shot use gains too; it and the vision tower's Transformer (an
      instance `forward`) add each block's residual inside the next block's first LayerNorm, and the vision
      tower (an instance `forward`) runs its last block on the CLS rows only, the rows its pooled output reads;
    - a `FastPath` kept on the model (`model.fastprompt_patch`, `fastprompt.fast.fast_path(model)`) records
      what was patched, with which kernels, and why. A PromptedCLIP built on a patched model asks it how to
      run: the packed text path (the shared prompt prefix once, the class suffixes in one varlen stream)
      and, with the Triton kernels, every layer's coupling map in one grouped launch.

    backend: 'auto' (Triton kernels for LayerNorm/MLP on CUDA, PyTorch ops elsewhere; attention from the
    first backend that can run it in the measured order of fastprompt.ops.backends: on CUDA sdpa first for dense
    attention and triton first for the packed text; sdpa, eager on CPU), 'triton',
    'xformers', 'sdpa' or 'eager'. An explicitly requested backend that cannot run raises an error saying
    why; `fastprompt info` shows what each op runs on, per device.
    verbose: print the FastPath report (otherwise it is logged at INFO level).
    mlp_gemm: with the Triton kernels, the frozen MLP's first GEMM: 'triton' (bias and activation in a Triton
    GEMM's epilogue), 'cublas' (torch.addmm, then the activation in place) or 'auto' (the plan measured faster on
    this device type, fastprompt.ops.gemm_plan; 'triton' where nothing was measured).

    `fastprompt.unpatch(model)` restores the original classes and methods (outputs are then bit-identical
    to a never-patched model). Patching twice only updates the kernel choice. Scripted models,
    CustomTextCLIP and towers with other block types raise fastprompt.UnsupportedModelError before
    anything is changed.
    """
    if _is_built_model(model):
        raise TypeError(f"patch takes the open_clip CLIP, not the {type(model).__name__} built on it: pass model.clip"
                        " (before or after build: the model asks its CLIP how to run at every call)")
    info = bb.inspect_clip(model)  # raises before any change
    kernels, reasons = _resolve_kernels(model, backend, info, mlp_gemm)
    report = FastPath(kernels=kernels, reasons=reasons)
    cnn = info.vision_tower == "cnn"
    towers = [("text", model.transformer)]
    if not cnn:
        towers.insert(0, ("vision", model.visual.transformer))
    for tower_name, tower in towers:
        for blk in tower.resblocks:
            original = getattr(blk, _MARK, type(blk))
            if not hasattr(blk, _MARK):
                blk.__dict__[_MARK] = original
            blk.__class__ = _fast_class(original)
            blk.__dict__["_fastprompt_kernels"] = kernels
        report.blocks[tower_name] = len(tower.resblocks)
    if cnn:
        report.reasons.append(f"vision tower: a {type(model.visual).__name__} (CNN), left as open_clip runs it")
    else:
        model.visual.transformer.forward = _FastVisionTransformer(model.visual.transformer)
        model.visual.forward = _FastVisionForward(model.visual)
    if info.text_pool == "argmax":
        model.encode_text = _FastEncodeText(model)
        report.encode_text = True
    else:
        report.reasons.append(f"encode_text kept: pooling {info.text_pool!r} is not argmax")
    report.text_mask_is_causal(getattr(model, "attn_mask", None))  # read once here, outside any step
    model.__dict__["fastprompt_patch"] = report
    (logger.info if not verbose else print)(str(report))
    return model


def fast_path(model: nn.Module) -> FastPath | None:
    """The FastPath of a patched model, None for a model that is not patched."""
    return model.__dict__.get("fastprompt_patch")


def is_patched(model: nn.Module) -> bool:
    return fast_path(model) is not None


def unpatch(model: nn.Module) -> nn.Module:
    """Undo `patch`: original block classes and methods; a no-op on a model that is not patched."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unpatch takes an open_clip CLIP module, not {type(model).__name__}")
    if _is_built_model(model):
        raise TypeError(f"unpatch takes the open_clip CLIP, not the {type(model).__name__} on it: pass model.clip")
    cnn = bb.is_cnn_tower(getattr(model, "visual", None))  # patch left its vision tower alone
    for where in ("visual.transformer.resblocks", "transformer.resblocks")[cnn:]:
        owner = model
        for attr in where.split("."):
            if not hasattr(owner, attr):
                raise bb.UnsupportedModelError(
                    f"unpatch: {type(model).__name__} has no {where}; it is not an open_clip CLIP (nothing of it"
                    " was patched)"
                )
            owner = getattr(owner, attr)
    for tower in (model.transformer,) if cnn else (model.visual.transformer, model.transformer):
        for blk in tower.resblocks:
            if hasattr(blk, _MARK):
                blk.__class__ = blk.__dict__.pop(_MARK)
                blk.__dict__.pop("_fastprompt_kernels", None)
                blk.__dict__.pop("_fastprompt_mask_cache", None)
    model.__dict__.pop("encode_text", None)
    if not cnn:
        model.visual.transformer.__dict__.pop("forward", None)
    model.visual.__dict__.pop("forward", None)
    model.__dict__.pop("fastprompt_patch", None)
    return model
