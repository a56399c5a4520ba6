"""How much memory one training step needs, from the activation arithmetic (PERFORMANCE.md §6).

    estimate = predict_for("maple", imagenet_classnames, batch=32, patched=False)       # no weights needed
    print(estimate)                       # total and the parts it is made of
    print(estimate.suggest(16 * 2**30))   # which option makes it fit in 16 GiB
    predict_peak_memory(model, 32, options_for_model(model, torch.bfloat16))           # a built PromptedCLIP

Three layers:
- `step_geometry(model, batch, options)`: what one step computes, read from the built model (schedules, class
  prompt lengths, widths): per pass (prompted vision, frozen vision, text, MCPL's decoder) and per layer, the
  token rows, the attention sequences, and whether backward runs through the layer. The FLOP count of the
  benchmark (bench/flops.py) reads the same geometry.
- `saved_layer_bytes`: what a trained-through layer keeps for backward, per token and per dtype, for the
  implementation the options describe (open_clip's blocks under autocast, fastprompt's PyTorch-op blocks, or its
  Triton blocks that save only their inputs; SDPA-style attention saving q, k, v, out and the log-sum-exp, or
  math attention saving the probabilities). Checked against `saved_tensor_bytes`, which counts what autograd
  really saved (torch.autograd.graph.saved_tensors_hooks, no CUDA needed).
- `predict_peak_memory`: saved activations + weights + trainable parameters, their gradients and optimizer state
  + run-long caches + inputs + a workspace term for the largest layer's backward temporaries + cuBLAS's workspaces,
  or, when larger, the first step's one-off forward of the frozen text (constant text features, frozen teachers).
  The layer workspace is an estimate, not an exact count; the rest are counts. Checked against the peaks measured
  on an H200 (tests/test_memory.py): all 32 cases within 8.1 %.

What the measured peaks taught (H200, commit e536e88, bench/results/nvidia-h200-2026-11-27.json):
- `torch.cuda.max_memory_allocated` counts cuBLAS's workspaces: PyTorch allocates one per (cuBLAS handle, stream)
  from the caching allocator and keeps it for the life of the process, 32 MiB each on Hopper. Handles are per
  thread, and backward runs on autograd's own device thread, so a step on one stream holds two. A TrainStep with a
  CUDA graph warms up on a fresh side stream per warm-up step and captures on a third, so one graphed case holds
  six and every later case of the same process adds four (its two new side streams): the benchmark's fastprompt
  cases at B = 4 ran last in their process and carried up to 1.1 GiB of them, which was the "-55 %".
- A method without text prompts (VPT) computes its text features once, in the first step, by a no-grad pass over
  every class; its cache keeps those features and, on the reference text path, the layer-1 input embeddings
  (C x 77 x d). That first pass, not the training step, is the eager contender's peak at B = 4.
  When that pass runs matters: at the measured commit it ran after the image tower, with the step's saved
  activations alive (VPT's eager contender peaked 0.86 GiB above the step at B = 32 for it); since f32fb42 the
  cache is built before the image tower, on nothing saved. `StepGeometry.frozen_text_in_loss` says which, and a
  test observes it in a real first step.

`structural_model(method, classnames, backbone)` builds a PromptedCLIP with uninitialised weights in about a
second (no random init of 150 M parameters): enough for the arithmetic, useless for computing.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field

import torch

_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2, torch.float64: 8}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STATS = 8  # LayerNorm saves fp32 mean and rstd per row
MiB = 2**20
# PyTorch's default cuBLAS workspace per (handle, stream) when CUBLAS_WORKSPACE_CONFIG is unset (aten's
# CublasHandlePool): ":4096:8" = 32 MiB on compute capability 9.x, cuBLAS's recommendation for Hopper, and
# ":4096:2:16:8" = 8 MiB + 128 KiB on other GPUs. cuBLASLt GEMMs use the same workspace (PyTorch unifies them).
BLAS_WORKSPACE_HOPPER = 32 * MiB
BLAS_WORKSPACE_OTHER = 2 * 4096 * 1024 + 8 * 16 * 1024
OPTIMIZER_STATE = {"sgd": 1, "sgd-plain": 0, "adamw": 2}  # fp32 tensors per trainable parameter
GiB = 2**30


def _dtype(value) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if value not in _DTYPES:
        raise ValueError(f"dtype must be a torch dtype or one of {sorted(_DTYPES)}, got {value!r}")
    return _DTYPES[value]


# --- options -----------------------------------------------------------------------------------------------
ATTENTION = ("sdpa", "triton", "xformers", "eager")


@dataclass(frozen=True)
class StepOptions:
    """What a step computes and how: a configuration's (`options_for`, `options_for_model`) or hypothetical ones
    for `suggest`."""

    packed_text: bool = True  # shared prefix once per group, class suffixes packed (else one row per sequence)
    full_context: bool = False  # reference rows padded to the context length (77) instead of cut after EOT
    cache_frozen_layers: bool = True  # packed text: layers below the first prompted one computed once per run
    frozen_weight_ops: bool = False  # Triton LayerNorm/MLP that save only their inputs (CUDA)
    patched: bool = True  # fastprompt blocks (no dense mask); False: open_clip's own blocks
    attention: str = "sdpa"  # dense attention backend: 'sdpa' | 'triton' | 'xformers' | 'eager' (saves probabilities)
    prefix_attention: str | None = None  # packed text's prefix-varlen attention backend; None: as `attention`
    recompute: bool = False  # checkpoint each trained block (saves its input only, recomputes in backward)
    weights_dtype: torch.dtype = torch.bfloat16  # frozen CLIP weights
    amp_dtype: torch.dtype | None = torch.bfloat16  # autocast dtype; None = compute in the weights' dtype
    optimizer: str = "sgd"  # 'sgd' (momentum), 'sgd-plain', 'adamw'
    accumulate: int = 1  # micro-batches per step (TrainStep(accumulate=...)): autograd keeps one micro-batch
    # Each tower's last block on its pooled rows only (PromptedCLIP.last_layer): the vision CLS rows unless the
    # method reads the vision tokens, the EOT rows of packed text.
    pooled_last_layer: bool = False
    # cuBLAS workspaces alive at the peak: one per (thread, CUDA stream) pair that has run a GEMM in this process
    # (`train_step_blas_workspaces`); 0 on CPU. Each is `blas_workspace_size` bytes (`blas_workspace_bytes`).
    blas_workspaces: int = 0
    blas_workspace_size: int = BLAS_WORKSPACE_HOPPER
    device_type: str = "cuda"  # where the step runs: `suggest` offers the CUDA-only savings on CUDA only

    def __post_init__(self):
        if isinstance(self.accumulate, bool) or not isinstance(self.accumulate, int) or self.accumulate < 1:
            raise ValueError(f"accumulate must be an int >= 1, got {self.accumulate!r}")
        for name in ("blas_workspaces", "blas_workspace_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        object.__setattr__(self, "weights_dtype", _dtype(self.weights_dtype))
        if self.amp_dtype is not None:
            object.__setattr__(self, "amp_dtype", _dtype(self.amp_dtype))
        if self.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {self.attention!r}")
        if self.prefix_attention is not None and self.prefix_attention not in ATTENTION:
            raise ValueError(f"prefix_attention must be one of {ATTENTION} or None, got {self.prefix_attention!r}")
        if self.optimizer not in OPTIMIZER_STATE:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_STATE)}, got {self.optimizer!r}")
        if self.packed_text and self.full_context:
            raise ValueError("packed text computes SOS..EOT only; it cannot use the full context")
        if self.packed_text and not self.patched:
            raise ValueError("packed text runs on a fastprompt-patched CLIP (patched=True)")
        if not isinstance(self.pooled_last_layer, bool):
            raise ValueError(f"pooled_last_layer must be a bool, got {self.pooled_last_layer!r}")

    @property
    def packed_attention(self) -> str:
        """The backend of the packed text's prefix-varlen attention."""
        return self.prefix_attention or self.attention

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.amp_dtype or self.weights_dtype


def blas_workspace_bytes(device: str | torch.device = "cuda") -> int:
    """Bytes of one cuBLAS workspace on `device` (0 off CUDA): CUBLAS_WORKSPACE_CONFIG's ':KiB:count' pairs when
    set, else PyTorch's default for the GPU's compute capability; Hopper's 32 MiB when no GPU can be asked."""
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    config = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if config:
        pairs = re.findall(r":(\d+):(\d+)", config)
        if pairs:
            return sum(int(kib) * 1024 * int(count) for kib, count in pairs)
    if not torch.cuda.is_available():
        return BLAS_WORKSPACE_HOPPER
    major, _ = torch.cuda.get_device_capability(device)
    return BLAS_WORKSPACE_HOPPER if major == 9 else BLAS_WORKSPACE_OTHER


def train_step_blas_workspaces(cuda_graph: bool) -> int:
    """cuBLAS workspaces a fastprompt.training.TrainStep leaves alive in a process that ran no GEMM before: on every
    stream it runs on, one for the calling thread's handle (forward) and one for autograd's device thread
    (backward). With a CUDA graph it warms up and captures on the process's one side stream; without, it runs on
    the current stream: one stream either way. Workspaces outlive their step, but later steps and later TrainSteps
    reuse the same streams (an eager step beside a graphed one, such as a last partial batch, adds the current
    stream's two). History: until commit ca41d7a each warm-up step took a fresh side stream, two more workspaces
    each (the H200 peaks of 2026-11-27 were measured then, see tests/test_memory.py); until this function said one
    stream, the capture ran on torch.cuda.graph's own stream, two more."""
    return 2


def options_for(patched: bool = True, truncate_text: bool = True, device: str | torch.device = "cuda",
                amp_dtype: torch.dtype | None = torch.bfloat16, weights_dtype: torch.dtype | None = None,
                optimizer: str = "sgd", recompute: bool = False, blas_workspaces: int | None = None) -> StepOptions:
    """The options a model built this way runs with, without building it (what `options_for_model` reads from a
    built one): `patched` = fastprompt.fast.patch with its default backend (on CUDA Triton LayerNorm/MLP and
    attention as auto's measured order picks it: SDPA for dense attention, Triton for the packed text; PyTorch
    ops + SDPA elsewhere) and packed text; unpatched = open_clip's blocks with one text row per class,
    cut after the longest EOT (`truncate_text`) or padded to the full context; patched models run each tower's last
    block on its pooled rows (PromptedCLIP.last_layer 'auto'). Frozen weights in `weights_dtype`
    (default: the autocast dtype, fp32 without autocast). `blas_workspaces`: see StepOptions; default on CUDA the
    two of a step on one stream (`train_step_blas_workspaces` counts a graphed TrainStep's)."""
    cuda = torch.device(device).type == "cuda"
    weights = weights_dtype or amp_dtype or torch.float32
    common = dict(weights_dtype=weights, amp_dtype=amp_dtype, optimizer=optimizer, recompute=recompute,
                  device_type=torch.device(device).type, **_blas(device, blas_workspaces))
    if not patched:
        return StepOptions(packed_text=False, full_context=not truncate_text, cache_frozen_layers=False,
                           frozen_weight_ops=False, patched=False, attention="sdpa", **common)
    from .ops import backends

    device_type = torch.device(device).type
    dense, packed = (backends.get_backend_order(op, device_type)[0] for op in backends.OPS)
    return StepOptions(packed_text=True, full_context=False, cache_frozen_layers=True, frozen_weight_ops=cuda,
                       patched=True, attention=dense, prefix_attention=packed, pooled_last_layer=True, **common)


def _blas(device, workspaces: int | None) -> dict:
    size = blas_workspace_bytes(device)
    if workspaces is None:
        workspaces = train_step_blas_workspaces(cuda_graph=False) if size else 0
    return dict(blas_workspaces=workspaces, blas_workspace_size=size)


def options_for_model(model, amp_dtype: torch.dtype | None = None, optimizer: str = "sgd",
                      recompute: bool = False, blas_workspaces: int | None = None) -> StepOptions:
    """The options a built PromptedCLIP actually runs with: patched or not (and with which kernels), its text
    path, its frozen weights' dtype, the cuBLAS workspaces of its device (see `options_for`)."""
    from .ops import backends

    clip = model.clip
    weight = clip.transformer.resblocks[0].mlp.c_fc.weight
    from .fast import fast_path

    report = fast_path(clip)
    common = dict(weights_dtype=weight.dtype, amp_dtype=amp_dtype, optimizer=optimizer, recompute=recompute,
                  device_type=weight.device.type, **_blas(weight.device, blas_workspaces))
    pooled = model.pools_last_layer()
    if report is None:
        return StepOptions(packed_text=False, full_context=not model.truncate_text, cache_frozen_layers=False,
                           frozen_weight_ops=False, patched=False, attention="sdpa", pooled_last_layer=pooled,
                           **common)
    def chosen(op: str, head_dim: int, causal: bool) -> str:
        if report.kernels.attention != "auto":
            return report.kernels.attention
        request = backends.AttentionRequest(op, weight.device, amp_dtype or weight.dtype, head_dim, causal)
        return backends.select_backend(request, "auto")

    packed = model.uses_packed_text()
    return StepOptions(packed_text=packed, full_context=not packed and not model.truncate_text,
                       cache_frozen_layers=packed, frozen_weight_ops=report.kernels.norm_mlp == "triton",
                       patched=True, attention=chosen("attention", model.info.vision.head_dim, False),
                       prefix_attention=chosen("prefix_varlen_attention", model.info.text.head_dim, True),
                       pooled_last_layer=pooled, **common)


# --- geometry ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PackedWork:
    """The packed suffix stream of a text layer: `tokens` rows in `sequences` sequences of at most `max_len`,
    each also attending to its group's `prefix_len` prefix tokens."""

    tokens: int
    sequences: int
    max_len: int
    prefix_len: int
    square_sum: int  # sum over sequences of length^2 (attention pairs within the suffixes)


@dataclass(frozen=True)
class LayerWork:
    """One layer of one pass: dense self-attention sequences (count, length), an optional packed suffix stream,
    an optional cross-attention (count, queries, keys) and whether backward runs through it."""

    dense: tuple[tuple[int, int], ...]
    grad: bool
    packed: PackedWork | None = None
    cross: tuple[int, int, int] | None = None
    # A tower's last block finished at its pooled rows only (PromptedCLIP.last_layer): every row's LN1 and qkv
    # GEMM, then one row per sequence through the output projection, LN2 and MLP; dense sequences attend with
    # that row's query alone (the vision CLS), the packed stream's attention stays whole.
    pooled: bool = False

    @property
    def rows(self) -> int:
        return sum(n * length for n, length in self.dense) + (self.packed.tokens if self.packed else 0)

    @property
    def finished_rows(self) -> int:
        """Rows through the output projection, LN2 and the MLP: every row, or one per sequence when pooled."""
        if not self.pooled:
            return self.rows
        return self.packed.sequences if self.packed else sum(n for n, _ in self.dense)

    @property
    def attention_pairs(self) -> int:
        """Query-key pairs of the self-attention (full squares for dense sequences, the PERFORMANCE.md §1
        convention; a packed suffix token of a length-n sequence sees the prefix plus n keys; a pooled dense
        sequence one query)."""
        pairs = sum(n * (1 if self.pooled and not self.packed else length) * length for n, length in self.dense)
        if self.packed:
            pairs += self.packed.tokens * self.packed.prefix_len + self.packed.square_sum
        return pairs


@dataclass(frozen=True)
class Pass:
    """A stack of transformer layers run once per step (a tower, a frozen tower, a decoder)."""

    name: str
    width: int
    heads: int
    mlp_hidden: int
    gelu: str
    layers: tuple[LayerWork, ...]
    recomputable: bool = True  # honours tower.grad_checkpointing
    trained_weights: bool = False  # its weights train (MCPL's decoder): weight gradients are computed too
    embed_flops: int = 0  # forward FLOPs outside the layers (patch embedding)
    cached_rows: int = 0  # rows held across steps (text below the first prompted layer)
    head_rows: int = 0  # output rows that reach the head (pooled / final tokens) when backward runs


@dataclass(frozen=True)
class StepGeometry:
    batch: int
    classes: int
    passes: tuple[Pass, ...]
    frozen_parameters: int
    trainable_parameters: int
    image_bytes: int  # one fp32 input batch
    embed_dim: int
    constant_text_rows: int = 0  # text features computed once per run (no text prompts; frozen teachers)
    # The text tower's one no-grad forward per run (first step): its token rows, the layer-1 input embedding rows
    # the constant-text cache keeps (reference text path), and whether it runs inside the loss (frozen teachers,
    # while the step's saved activations are alive) rather than before the forward (constant text features).
    frozen_text_rows: int = 0
    frozen_text_embed_rows: int = 0
    frozen_text_in_loss: bool = False

    def pass_named(self, name: str) -> Pass | None:
        return next((p for p in self.passes if p.name == name), None)


def _vision_passes(model, batch: int, options: StepOptions) -> list[Pass]:
    info, method, visual = model.info.vision, model.method, model.clip.visual
    pooled = options.pooled_last_layer and not method.reads_vision_tokens()
    sched = method.vision_schedule
    base = model.info.vision_tokens
    lengths = sched.sequence_lengths(base)
    first = sched.first_prompted_layer
    conv = visual.conv1.weight
    patches = base - 1
    embed = 2 * batch * patches * conv[0].numel() * conv.shape[0]
    common = dict(width=info.width, heads=info.heads, mlp_hidden=info.mlp_hidden, gelu=info.gelu)
    prompted = Pass(
        "vision",
        layers=tuple(LayerWork(((batch, n),), grad=first is not None and layer >= first,
                               pooled=pooled and layer == len(lengths))
                     for layer, n in enumerate(lengths, start=1)),
        embed_flops=embed,
        head_rows=(batch if pooled else batch * lengths[-1]) if first is not None else 0,
        **common,
    )
    # Frozen (no-grad) vision passes besides the prompted one, each as the number of its layers it takes from the
    # prompted pass: instance conditioning runs first, whole (none when the vision tower is unprompted: its one
    # pass is the frozen feature); on a patched CLIP the teachers' pass continues from the prompted pass's state
    # below its first prompted layer (PromptedCLIP.frozen_image_features; an unprompted tower's output is the
    # teacher's). The passes are the CLIP's own encode_image, whose last block a patch runs on the CLS rows only.
    shared_layers = {"conditioning": 0} if method.needs_image_features() and sched.prompted else {}
    if method.uses_frozen_image_features():
        shared_layers["teacher"] = (len(lengths) if first is None else first - 1) if options.patched else 0
    frozen = [
        Pass(f"vision (frozen, {role})",
             layers=tuple(LayerWork(((batch, base),), grad=False, pooled=options.patched and layer == len(lengths))
                          for layer in range(shared + 1, len(lengths) + 1)),
             embed_flops=0 if shared else embed, **common)
        for role, shared in shared_layers.items() if shared < len(lengths)
    ]
    return [prompted, *frozen]


def _group_count(scopes, classes: int, images: int) -> int:
    kinds = set(scopes) - {"shared"}
    if not kinds:
        return 1
    if kinds <= {"class"}:
        return classes
    if kinds <= {"image"}:
        return images
    return classes * images


def _text_pass(model, batch: int, options: StepOptions) -> Pass | None:
    method, info, prompts = model.method, model.info.text, model.prompts
    if not method.text_sources:
        return None  # the text features are constants of the run
    sched = method.text_schedule
    classes = len(prompts.classnames)
    images = batch if method.per_image_text() else 1
    sequences = classes * images
    first = sched.first_prompted_layer
    common = dict(width=info.width, heads=info.heads, mlp_hidden=info.mlp_hidden, gelu=info.gelu)
    if not options.packed_text:
        base = model.info.context_length if options.full_context else prompts.max_length
        layers = tuple(LayerWork(((sequences, n),), grad=layer >= first)
                       for layer, n in enumerate(sched.sequence_lengths(base), start=1))
        return Pass("text", layers=layers, head_rows=sequences, **common)
    prefix = prompts.prefix_len
    suffix = prompts.lengths - prefix
    tokens = int(suffix.sum()) * images
    groups = _group_count([s.scope for s in method.text_sources.values()], classes, images)
    insert = sched.mode == "insert"
    segments = sched.segment_lengths()
    layers = []
    for layer in range(1, sched.layers + 1):
        if layer < first and options.cache_frozen_layers:
            continue  # computed once per run, held in the cache
        p = prefix + (segments[layer - 1] if insert else 0)
        packed = PackedWork(tokens, sequences, int(suffix.max()), p, int((suffix**2).sum()) * images)
        layers.append(LayerWork(((groups, p),), grad=layer >= first, packed=packed,
                                pooled=options.pooled_last_layer and layer == sched.layers))
    cached = prefix + int(suffix.sum()) if first > 1 and options.cache_frozen_layers else 0
    # The packed text loop honours the text tower's grad_checkpointing like the reference loop does.
    return Pass("text", layers=tuple(layers), recomputable=True, cached_rows=cached, head_rows=sequences, **common)


def _decoder_pass(model, batch: int) -> Pass | None:
    """MCPL's VAIPL decoder: B x C class queries, self-attention over classes, cross-attention to image tokens."""
    decoder = getattr(model.method, "decoder", None)
    if decoder is None:
        return None
    classes = len(model.prompts.classnames)
    width = model.info.embed_dim
    image_tokens = model.method.vision_schedule.sequence_lengths(model.info.vision_tokens)[-1]
    layers = tuple(LayerWork(((batch, classes),), grad=True, cross=(batch, classes, image_tokens))
                   for _ in decoder.layers)
    return Pass("vaipl decoder", width=width, heads=max(1, width // 64), mlp_hidden=4 * width, gelu="gelu",
                layers=layers, recomputable=False, trained_weights=True)


class NotPredictedError(ValueError):
    """A model this predictor does not cover (a CNN vision tower)."""


def step_geometry(model, batch: int, options: StepOptions | None = None) -> StepGeometry:
    """What one training step of `model` (a PromptedCLIP) computes at batch size `batch` under `options`."""
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if model.info.vision_tower != "transformer":
        raise NotPredictedError(f"no memory prediction for a {type(model.clip.visual).__name__} (CNN) vision tower:"
                                " the model covers transformer towers only")
    options = options or StepOptions()
    passes = _vision_passes(model, batch, options)
    text = _text_pass(model, batch, options)
    if text is not None:
        passes.append(text)
    decoder = _decoder_pass(model, batch)
    if decoder is not None:
        passes.append(decoder)
    height, width = model.info.image_size
    classes = len(model.prompts.classnames)
    constant = classes if not model.method.text_sources else 0
    frozen_rows, embed_rows, in_loss = _frozen_text(model, options)
    return StepGeometry(
        batch=batch,
        classes=classes,
        passes=tuple(passes),
        frozen_parameters=sum(p.numel() for p in model.clip.parameters()),
        trainable_parameters=sum(p.numel() for p in model.trainable_parameters()),
        image_bytes=batch * 3 * height * width * 4,
        embed_dim=model.info.embed_dim,
        constant_text_rows=constant,
        frozen_text_rows=frozen_rows,
        frozen_text_embed_rows=embed_rows,
        frozen_text_in_loss=in_loss,
    )


def _frozen_text(model, options: StepOptions) -> tuple[int, int, bool]:
    """(rows, kept embedding rows, inside the loss) of the text tower's no-grad forward a run computes once."""
    method, prompts = model.method, model.prompts
    classes = len(prompts.classnames)
    if not method.text_sources:  # constant text features: PromptedCLIP's cache, built by the first forward
        if options.packed_text:
            return prompts.prefix_len + int((prompts.lengths - prompts.prefix_len).sum()), 0, False
        length = model.info.context_length if options.full_context else prompts.max_length
        return classes * length, classes * length, False
    if method.uses_frozen_text_features():  # PromptedCLIP.frozen_text_features: clip.encode_text, EOT-cut if patched
        length = prompts.max_length if options.patched else model.info.context_length
        return classes * length, 0, True
    return 0, 0, False


# --- what a layer saves for backward -----------------------------------------------------------------------
def _token_bytes(p: Pass, o: StepOptions, kv_len: int) -> float:
    """Bytes one token of a trained-through block saves (dense attention over `kv_len` keys)."""
    return sum(_token_parts(p, o, kv_len))


def _token_parts(p: Pass, o: StepOptions, kv_len: int) -> tuple[float, float, float]:
    """_token_bytes in three parts: (LN1 + the qkv output, which every row of a block saves; its attention query's
    saves; LN2 + the MLP's, which only finished rows save: see LayerWork.pooled)."""
    d, m, h = p.width, p.mlp_hidden, p.heads
    c = _BYTES[o.compute_dtype]
    residual = _BYTES[o.weights_dtype]
    # LayerNorm x2: PyTorch paths save an fp32 copy of the input (or the fp32 input itself) + mean/rstd;
    # the Triton LayerNorm saves its input in the residual dtype.
    ln = (residual if o.frozen_weight_ops else 4) * d + STATS  # each of the two
    qkv = 3 * d * c  # one in-projection output; q, k and v are views of it
    if o.attention == "eager":
        attn = h * kv_len * c  # softmax probabilities (q, k, v counted above)
    else:
        attn = d * c + 4 * h  # output + fp32 log-sum-exp
    if o.frozen_weight_ops:
        mlp = d * c  # the fused MLP keeps its input and recomputes the hidden in backward
    else:
        mlp = (2 if p.gelu == "quick_gelu" else 1) * m * c  # GELU input; QuickGELU also its sigmoid
    return ln + qkv, attn, ln + mlp


def _layer_constant_bytes(p: Pass, o: StepOptions, layer: LayerWork) -> int:
    """Per-layer (not per-token) saves: weight casts under autocast on higher-precision weights, and the dense
    additive mask open_clip's blocks cast per layer."""
    out = 0
    c = _BYTES[o.compute_dtype]
    if o.amp_dtype is not None and o.weights_dtype != o.amp_dtype:
        d, m = p.width, p.mlp_hidden
        out += (4 * d * d + 2 * d * m) * c
    if not o.patched and o.amp_dtype is not None and p.name == "text":
        out += sum(length * length * c for _, length in layer.dense)
    return out


def _packed_attention_bytes(p: Pass, o: StepOptions, work: PackedWork) -> int:
    d, h = p.width, p.heads
    c = _BYTES[o.compute_dtype]
    if o.packed_attention in ("triton", "xformers"):
        return work.tokens * (d * c + 4 * h)  # varlen kernel: output + log-sum-exp
    # SDPA/eager on padded sequences: padded q and output, per-sequence [prefix; suffix] keys and values,
    # boolean mask, fp32 log-sum-exp (probabilities for eager) and the token index.
    s, n, pre = work.sequences, work.max_len, work.prefix_len
    padded = s * n * d * c * 2 + 2 * s * (pre + n) * d * c + s * n * (pre + n) + 8 * work.tokens
    padded += s * n * (h * (pre + n) * c if o.packed_attention == "eager" else 4 * h)
    return padded


def saved_layer_bytes(p: Pass, layer: LayerWork, o: StepOptions) -> int:
    """Bytes a layer keeps for backward (0 when backward does not reach it)."""
    if not layer.grad:
        return 0
    if o.recompute and p.recomputable:
        return layer.rows * _BYTES[o.weights_dtype] * p.width  # the block input only
    if p.trained_weights:
        return _decoder_layer_bytes(p, layer, o)
    total = _layer_constant_bytes(p, o, layer)
    for count, length in layer.dense:
        every, query, finished = _token_parts(p, o, length)
        if not layer.pooled:
            total += count * length * (every + query + finished)
        elif layer.packed:  # the packed text's prefix rows: in the stream's attention, never finished
            total += count * length * (every + query)
        else:  # one query (the CLS row) per sequence, finished
            total += count * length * every + count * (query + finished)
    if layer.packed:
        # Per-token LayerNorm/qkv/MLP terms on the suffix stream (LN2/MLP on the EOT rows alone when pooled),
        # attention output from the packed kernel.
        every, _, finished = _token_parts(p, o, 0)
        work = layer.packed
        total += work.tokens * every + (work.sequences if layer.pooled else work.tokens) * finished
        total += _packed_attention_bytes(p, o, work)
    return int(total)


def _decoder_layer_bytes(p: Pass, layer: LayerWork, o: StepOptions) -> int:
    """MCPL's decoder layer (trained Linears keep their inputs): self-attention, cross-attention, MLP."""
    e, h = p.width, p.heads
    c = _BYTES[o.compute_dtype]
    rows = layer.rows
    ln = 4 * e + STATS
    # per query row: 3 LayerNorms; self-attn input, qkv, output, out-proj input; cross q input, q, output,
    # out-proj input; MLP input, GELU input (4e), fc2 input (4e); two log-sum-exps
    per_row = 3 * ln + c * e * (1 + 3 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 4 + 4) + 2 * 4 * h
    count, _, keys = layer.cross
    per_key = ln + 3 * e * c  # LayerNorm of the image tokens, k/v projection input, k and v
    return int(rows * per_row + count * keys * per_key)


def _frozen_text_row_bytes(info, o: StepOptions) -> int:
    """Bytes per token row alive at the peak of a no-grad text layer (its MLP): the layer's input, still held by
    the caller's loop variable until the block returns, and the residual after attention (weights' dtype, fp32 when
    autocast adds bf16 branches to fp32 weights' stream: the weights' dtype either way); the LayerNorm output, held
    by the caller's expression during the MLP (fp32 under autocast on open_clip's blocks, whose LayerNorm autocast
    runs in fp32; the compute dtype on fastprompt's) and its cast to the compute dtype; the MLP hidden and its
    activation (QuickGELU: x * sigmoid(1.702 x) keeps one more), or one activated hidden from the fused Triton MLP."""
    d, m = info.width, info.mlp_hidden
    c, r = _BYTES[o.compute_dtype], _BYTES[o.weights_dtype]
    ln = 4 if o.amp_dtype is not None and not o.patched else c
    cast = c if ln != c else 0
    if o.frozen_weight_ops:
        act = c * m
    else:
        act = (3 if info.gelu == "quick_gelu" else 2) * c * m
    return 2 * r * d + ln * d + cast * d + act


def _head_bytes(g: StepGeometry, o: StepOptions) -> int:
    """Saves outside the blocks: ln_pre/ln_post/ln_final inputs (fp32), normalised features, logits."""
    out = 0
    e = g.embed_dim
    for p in g.passes:
        if p.trained_weights or not p.head_rows:
            continue
        out += p.head_rows * (4 * p.width + STATS + 3 * 4 * e)
        if p.name == "vision" and p.layers[0].grad:
            out += sum(n * length for n, length in p.layers[0].dense) * (4 * p.width + STATS)  # ln_pre
    return out + 2 * 4 * g.batch * g.classes  # logits and log-softmax


def _workspace_bytes(g: StepGeometry, o: StepOptions) -> int:
    """Largest single-layer temporaries: the MLP hidden and its gradient, q/k/v gradients, the residual stream
    and its gradient (an estimate: allocator timing decides the exact overlap)."""
    c, r = _BYTES[o.compute_dtype], _BYTES[o.weights_dtype]
    worst = 0
    for p in g.passes:
        for layer in p.layers:
            need = layer.rows * (2 * p.mlp_hidden * c + 4 * p.width * c + 2 * p.width * r)
            if o.attention == "eager":
                need += sum(n * p.heads * length * length * 4 for n, length in layer.dense)
            if o.recompute and p.recomputable and layer.grad:
                need += saved_layer_bytes(p, layer, dataclasses.replace(o, recompute=False))
            worst = max(worst, need)
    return worst


# --- the estimate ------------------------------------------------------------------------------------------
@dataclass
class MemoryEstimate:
    total_bytes: int
    parts: dict[str, int]
    options: StepOptions
    batch: int
    saved_bytes: int  # what autograd keeps for backward (parts 'saved: ...'), comparable to saved_tensor_bytes
    _model: object = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        micro = f", {self.options.accumulate} micro-batches" if self.options.accumulate > 1 else ""
        lines = [f"predicted peak {self.total_bytes / GiB:.2f} GiB (batch {self.batch}{micro})"]
        lines += [f"  {name}: {value / GiB:.3f} GiB" for name, value in self.parts.items() if value]
        return "\n".join(lines)

    def suggest(self, budget_bytes: int) -> "Suggestion":
        return suggest(self._model, self.batch, budget_bytes, self.options, cuda=self.options.device_type == "cuda")


def predict_peak_memory(model, batch: int, options: StepOptions | None = None) -> MemoryEstimate:
    """Predicted peak allocated bytes of one training step of `model` at `batch` under `options`.

    With `options.accumulate` = k the step runs micro-batches of ceil(batch / k) images one after another: the
    activations, heads and workspace are those of one micro-batch; the whole batch's images are on the device."""
    o = options or StepOptions()
    micro = -(-batch // o.accumulate) if batch else batch
    g = step_geometry(model, micro, o)
    parts: dict[str, int] = {}
    for p in g.passes:
        saved = sum(saved_layer_bytes(p, layer, o) for layer in p.layers)
        if saved:
            parts[f"saved: {p.name}"] = saved
    parts["saved: heads and loss"] = _head_bytes(g, o)
    if o.amp_dtype is not None or o.frozen_weight_ops:
        # The method's Linears (couplings, maps) run on copies of their weights kept for backward: autocast
        # casts, or the stacked weights of the grouped coupling op on the Triton path.
        parts["saved: trainable weight copies"] = g.trainable_parameters * _BYTES[o.compute_dtype]
    saved_total = sum(v for k, v in parts.items() if k.startswith("saved"))
    c = _BYTES[o.compute_dtype]
    parts["frozen weights"] = g.frozen_parameters * _BYTES[o.weights_dtype]
    parts["trainable parameters, gradients, optimizer state"] = g.trainable_parameters * 4 * (
        2 + OPTIMIZER_STATE[o.optimizer])
    text = g.pass_named("text")
    cached = (text.cached_rows * text.width * c) if text else 0
    # The constant-text cache: the features, and on the reference text path the layer-1 input embeddings
    # (C x L x d, in the weights' dtype: open_clip's cast dtype) that PromptedCLIP.encode_text returns with them.
    embeds = g.frozen_text_embed_rows * model.info.text.width * _BYTES[o.weights_dtype]
    parts["run-long caches"] = cached + g.constant_text_rows * g.embed_dim * c + embeds
    per_image = g.image_bytes // g.batch if g.batch else 0
    parts["inputs"] = (per_image + 8) * batch
    parts["workspace (estimate)"] = _workspace_bytes(g, o)
    # Allocated by PyTorch for the life of the process, counted by torch.cuda.max_memory_allocated.
    parts["cuBLAS workspaces"] = o.blas_workspaces * o.blas_workspace_size
    step = sum(parts.values())
    if g.frozen_text_rows:
        # The first step's no-grad text pass: before the forward (nothing saved yet) or inside the loss (all saved
        # activations alive); no backward temporaries either way. Counted where it exceeds the step's own peak.
        alive = step - parts["workspace (estimate)"] - (0 if g.frozen_text_in_loss else saved_total)
        once = alive + g.frozen_text_rows * _frozen_text_row_bytes(model.info.text, o)
        parts["first step's frozen text pass, above the step"] = max(0, once - step)
    return MemoryEstimate(sum(parts.values()), parts, o, batch, saved_total, _model=model)


def predict_for(method: str, classnames, batch: int, backbone: str = "ViT-B-16", *, patched: bool = True,
                truncate_text: bool = True, device: str = "cuda", amp_dtype=torch.bfloat16, weights_dtype=None,
                method_options: dict | None = None, **overrides) -> MemoryEstimate:
    """The estimate for a configuration without building its weights: method x backbone x batch x classes, patched
    or not (see `options_for`), with any StepOptions field overridden (e.g. recompute=True, optimizer='adamw')."""
    model = structural_model(method, classnames, backbone, **(method_options or {}))
    options = dataclasses.replace(options_for(patched, truncate_text, device, amp_dtype, weights_dtype), **overrides)
    return predict_peak_memory(model, batch, options)


# --- suggestions -------------------------------------------------------------------------------------------
@dataclass
class Suggestion:
    budget_bytes: int
    fits: bool  # the first option set in `tried` that fits, if any
    advice: str
    tried: list[tuple[str, int]]  # (what was changed, predicted bytes)
    options: StepOptions | None = None  # with every change tried so far, `accumulate` included when it is needed
    batch: int | None = None  # the batch `options` are for
    smaller_batch: int | None = None  # when accumulation was needed: the largest batch that fits without it

    def __str__(self) -> str:
        lines = [self.advice] + [f"  {what}: {value / GiB:.2f} GiB" for what, value in self.tried]
        return "\n".join(lines)


def _largest(upper: int, fits) -> int:
    """The largest n in 1..upper with fits(n), 0 if none; `fits` must hold below any n where it holds (predicted
    memory grows with the batch and with the micro-batch)."""
    best, lo, hi = 0, 1, upper
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(mid):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def fewest_micro_batches(model, batch: int, options: StepOptions, budget_bytes: int) -> int | None:
    """The fewest micro-batches (`accumulate`) with which a step of `batch` images under `options` is predicted to
    fit in `budget_bytes`, or None when not even one image per micro-batch fits: the largest micro-batch size m
    that fits gives accumulate = ceil(batch / m)."""
    def fits(micro: int) -> bool:
        trial = dataclasses.replace(options, accumulate=-(-batch // micro))
        return predict_peak_memory(model, batch, trial).total_bytes <= budget_bytes

    micro = _largest(batch, fits)
    return -(-batch // micro) if micro else None


def suggest(model, batch: int, budget_bytes: int, options: StepOptions | None = None, cuda: bool = True) -> Suggestion:
    """Which option makes the step fit in `budget_bytes`: cumulative changes in order of cost (packed text and
    caching are exact and free; Triton's input-only saving needs CUDA; recompute costs a forward), then gradient
    accumulation (the same update as the whole batch, with the text tower run once per micro-batch): the fewest
    micro-batches that fit. The largest batch that fits without accumulation is given too (a different recipe)."""
    o = options or StepOptions()
    steps = [("as configured", o)]
    if not o.packed_text:
        o = dataclasses.replace(o, packed_text=True, full_context=False, patched=True, cache_frozen_layers=True)
        steps.append(("fastprompt.patch + packed text (exact)", o))
    if o.weights_dtype == torch.float32 and o.amp_dtype is not None:
        o = dataclasses.replace(o, weights_dtype=o.amp_dtype)
        steps.append((f"frozen weights in {str(o.amp_dtype).replace('torch.', '')}", o))
    if cuda and not o.frozen_weight_ops:
        # auto's CUDA choices (measured): SDPA for dense attention, the Triton varlen kernel for the packed text.
        o = dataclasses.replace(o, frozen_weight_ops=True, attention="sdpa", prefix_attention="triton")
        steps.append(("Triton frozen-weight LayerNorm/MLP + packed-text attention (CUDA)", o))
    if not o.recompute:
        o = dataclasses.replace(o, recompute=True)
        steps.append(("block recompute (fastprompt.memory.enable_block_recompute)", o))
    tried = []
    for what, opts in steps:
        total = predict_peak_memory(model, batch, opts).total_bytes
        tried.append((what, total))
        if total <= budget_bytes:
            advice = "fits as configured" if what == "as configured" else f"fits with: {what}"
            return Suggestion(budget_bytes, True, advice, tried, opts, batch)
    accumulate = fewest_micro_batches(model, batch, o, budget_bytes)
    smaller = _largest(batch - 1, lambda b: predict_peak_memory(model, b, o).total_bytes <= budget_bytes) or None
    if accumulate is not None:
        opts = dataclasses.replace(o, accumulate=accumulate)
        tried.append((f"gradient accumulation {opts.accumulate}", predict_peak_memory(model, batch, opts).total_bytes))
        advice = (f"fits with every option above and gradient accumulation {opts.accumulate} (micro-batches of "
                  f"<= {-(-batch // opts.accumulate)} images; the update equals batch {batch}'s)")
        if smaller:
            advice += f"; or batch {smaller} without accumulation"
        return Suggestion(budget_bytes, True, advice, tried, opts, batch, smaller)
    if smaller:  # accumulation keeps the whole batch's images on the device; a smaller batch need not
        tried.append((f"batch {smaller}", predict_peak_memory(model, smaller, o).total_bytes))
        advice = (f"fits with every option above and batch {smaller} (batch {batch} does not fit even with one image"
                  " per micro-batch: its images alone stay on the device)")
        return Suggestion(budget_bytes, True, advice, tried, o, smaller, smaller)
    return Suggestion(budget_bytes, False, "does not fit even with one image per micro-batch and every option",
                      tried, o, None)


# --- measurement and recompute -----------------------------------------------------------------------------
def saved_tensor_bytes(fn, exclude=()) -> tuple[int, object]:
    """Run `fn()` and count the bytes autograd saves for backward, once per storage, leaving out the storages
    of `exclude` (parameters: they exist anyway). Returns (bytes, fn's result). Works on any device."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in skip and key not in seen:
            seen[key] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return sum(seen.values()), result


def enable_block_recompute(model, enable: bool = True) -> dict[str, bool]:
    """Turn per-block recompute (torch.utils.checkpoint, non-reentrant) on or off for a PromptedCLIP's towers.

    Returns which towers recompute. Both the reference layer loop (fastprompt.backbone.run_block) and the packed
    text loop (fastprompt.packed_text) honour the towers' `grad_checkpointing`.
    """
    clip = model.clip
    clip.set_grad_checkpointing(enable)
    return {"vision": enable, "text": enable}


def structural_model(method: str, classnames, backbone: str = "ViT-B-16", **options):
    """A PromptedCLIP over an open_clip backbone with uninitialised weights (fast to build), for the arithmetic
    in this module only: its outputs are meaningless."""
    import open_clip

    from .backbones import TINY_CONFIGS
    from .methods import build

    config = TINY_CONFIGS.get(backbone) or open_clip.get_model_config(backbone)
    if config is None:
        raise ValueError(f"unknown backbone {backbone!r}")
    with torch.device("meta"):
        clip = open_clip.CLIP(**config)
    clip = clip.to_empty(device="cpu").eval()
    length = clip.attn_mask.shape[0]
    clip.attn_mask.copy_(torch.full((length, length), float("-inf")).triu_(1))
    with torch.no_grad():
        clip.token_embedding.weight.zero_()  # the prompt initialisation reads it
    return build(method, clip, list(classnames), **options)


def memory_line(model, batch: int, options: StepOptions, budget_bytes: int) -> str:
    """One line for a run's log: the predicted peak of a step against `budget_bytes` (the GPU's memory), and, when it
    does not fit, the fewest micro-batches (`accumulate=k`, same update) that do, or that nothing does."""
    try:
        estimate = predict_peak_memory(model, batch, options)
    except NotPredictedError as exc:
        return f"{exc} ({budget_bytes / GiB:.1f} GiB on this GPU)"
    head = f"predicted peak {estimate.total_bytes / GiB:.2f} GiB of {budget_bytes / GiB:.1f} GiB"
    if estimate.total_bytes <= budget_bytes:
        return head
    accumulate = fewest_micro_batches(model, batch, options, budget_bytes)
    if accumulate is not None:
        return (f"{head}: likely out of memory; accumulate={accumulate} (micro-batches of "
                f"{-(-batch // accumulate)} images, the same update) is predicted to fit")
    return f"{head}: likely out of memory even with one image per micro-batch; lower the batch or the class count"

