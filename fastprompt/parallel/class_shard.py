"""Class-sharded text for large class sets (issue 12, item 2).

With N ranks in a torch.distributed process group, rank r runs the prompted text tower over its contiguous slice
of the C classes only, through the same path as the unsharded model (packed on a patched CLIP or with
text_path='packed', the reference loop otherwise), and the full [C, E] text features are assembled by a
differentiable all-gather. The text pass, its FLOPs and its saved activations shrink about N-fold; every rank
still holds the [C, E] features and the logits of its own images against all C classes.

Turned on with `PromptedCLIP(..., shard_text_classes=True)` or `model.shard_text_classes()`.

Gradient convention (the data-parallel one): rank r's loss covers its own images and all C classes; after
backward the training step averages the trainable gradients over ranks (mean all_reduce). That average equals
the single-process gradient of the mean loss over the global batch only if rank s backpropagates into its slice
the SUM over ranks r of d loss_r / d text_s (reduce-scatter semantics). The gather's backward does it with a sum
all_reduce of the [C, E] gradient, then keeps its own rows. It uses all_reduce rather than reduce_scatter
because all_reduce runs on gloo in every torch this package supports (gloo gained reduce_scatter late) as well
as on nccl. The cost is one C x E tensor per step: 43 MB in fp32 for 21k classes, about twice a
reduce_scatter's traffic. The local batches must all be the same size, so that the mean of the ranks' mean
losses is the global mean. The gather is a collective, so every rank must run the same forwards. In eval, the
text is gathered once, when the inference cache is built: when ranks may run different numbers of evaluation
batches, call model.inference_cache() on every rank (eval mode, no grad) before the loop.

When it pays (bench/class_shard_cost.py). On this CPU, MaPLe with the ViT-B/16 text tower over the 1000 ImageNet
classes, rank 0's text rows go 4170 / 2211 / 1163 / 563 and its saved activations 2351 / 1202 / 518 / 255 MiB
(fp32) for N = 1 / 2 / 4 / 8. On a GPU (an expectation from PERFORMANCE.md's figures, not a measurement), the
prefix-shared text pass costs about 0.63 TFLOP per 1000 classes (0.8 ms at the H200 floor), against 2.9 ms for
32 images. Without sharding, every data-parallel rank runs it in full. Sharding saves (1 - 1/N) of it and adds
two collectives of C x E (3 MB of bf16 features and fp32 gradient per 1000 classes: tens of microseconds on
NVLink). So it is worth turning on from about C = 1000 for time, and it is the main lever at ImageNet-21k
size (21k classes: about 17 ms of text per rank, against 2.1 ms over 8 ranks). For memory, the packed bf16
text saves about 1.1 GB per 1000 classes, so it is needed once C reaches the tens of thousands on one GPU.
Below a few hundred classes per rank, the text pass is bound by launches and latency, and sharding gains little.

Decisions. No paper shards anything: each trains on one GPU ("all experiments executed on a single NVIDIA
RTX 4090 GPU", MMRL; MCPL "was trained only on the NVIDIA 3090 GPU platform" "due to the high memory usage
during the training phase"). So every point below is our choice, made so that the papers' computation is
unchanged:
- Gather the features, not partial logits. Every image is scored against all C classes, as in
  "p(y=c|f) = exp(sim(f,w_c)/tau) / sum_{i=1..C} exp(sim(f,w_i)/tau)" (MMRL), and so is every loss that reads
  the text features (MMRL's "L_cos^t = 1 - 1/C sum_c ...", PromptSRC's L1): heads and losses run unchanged.
- Slices are balanced, so their sizes differ by at most one; the first C mod N ranks hold one class more.
  Ceil-sized slices would leave ranks empty (5 classes over 4 ranks: 2, 2, 1, 0). Fewer classes than ranks
  is an error.
- With one rank the model's own text pass runs unchanged: a one-GPU torchrun equals the plain run exactly.
- Supported: every method whose text prompts depend on the parameters and the class only (token-source scopes
  'shared' and 'class'), i.e. zero-shot, CoOp (with class_specific each rank slices its classes' context),
  IVLP, deep language prompting, VPT, MaPLe, MPL, MuDPT, PromptSRC, MMRL, and MCPL with integration='post'.
  MCPL's VAIPL and CMPP heads read every class's layer-1 input embeddings. Those are an embedding lookup with
  no transformer pass, so every rank computes them for all classes, as the unsharded model does; only the
  transformer pass is sharded.
- Refused with an error naming the method: text prompts that depend on the image (CoCoOp, scope 'image';
  MCPL with integration='input', scope 'pair'). Their text pass is per image and class. Sharding its classes
  would need every rank's images on every rank (an all-to-all of image features), a different algorithm.
- The frozen-CLIP text features of PromptSRC's and MMRL's regularisers (PromptedCLIP.frozen_text_features)
  stay unsharded. They need no gradient and are computed once per run and cached.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist


def class_slices(classes: int, ranks: int) -> list[tuple[int, int]]:
    """The contiguous [start, stop) class range of each rank, balanced (sizes differ by at most one)."""
    if ranks < 1:
        raise ValueError(f"class sharding needs at least one rank, got {ranks}")
    if classes < ranks:
        raise ValueError(
            f"class-sharded text needs at least one class per rank: {classes} classes over {ranks} ranks;"
            " turn sharding off (shard_text_classes=False) for so few classes"
        )
    base, extra = divmod(classes, ranks)
    bounds, start = [], 0
    for rank in range(ranks):
        stop = start + base + (1 if rank < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


class _GatherClassSlices(torch.autograd.Function):
    """Forward: every rank's [c_r, E] slice -> the full [C, E] (equal-size all_gather of zero-padded slices, which
    every backend supports). Backward: the sum over ranks of the [C, E] gradient, restricted to this rank's rows."""

    @staticmethod
    def forward(ctx, local, bounds, rank, group):
        rows = max(stop - start for start, stop in bounds)
        padded = local.new_zeros((rows, *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in bounds]
        dist.all_gather(parts, padded, group=group)
        ctx.bounds, ctx.rank, ctx.group = bounds, rank, group
        return torch.cat([part[: stop - start] for part, (start, stop) in zip(parts, bounds)])

    @staticmethod
    def backward(ctx, grad):
        # A copy: all_reduce writes in place, and the incoming gradient may be shared. The sum runs in fp32 at
        # least, so that N half-precision gradients are not rounded at every hop.
        total = grad.to(torch.promote_types(grad.dtype, torch.float32), copy=True).contiguous()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        start, stop = ctx.bounds[ctx.rank]
        return total[start:stop].to(grad.dtype), None, None, None


def check_method(method) -> None:
    """Refuse, naming the method, text prompts that depend on the image (see the module docstring)."""
    if method.per_image_text():
        raise ValueError(
            f"class-sharded text does not support method {method.name!r}: its text prompts depend on the image"
            " (one text pass per image and class), so each rank would need every rank's images; shard the"
            " images only (data parallel) for this method"
        )


class ClassShardedText:
    """The text pass of a PromptedCLIP sharded over the ranks of `group` (None: the default process group).

    The rank's slice is encoded by a second PromptedCLIP over the slice's class names that shares the frozen
    CLIP and the method (not registered as a submodule: no parameter or state-dict entry appears twice). It is
    rebuilt when the model's class set changes (set_classnames, a new template)."""

    def __init__(self, method, group=None):
        check_method(method)
        self.group = group
        self._built_for = None  # the ClassPrompts the slice model was built for
        self._slice_model = None
        self.bounds: list[tuple[int, int]] = []
        self.rank = 0

    def _prepare(self, model) -> None:
        if self._built_for is model.prompts:
            return
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "shard_text_classes needs an initialised torch.distributed process group (run under torchrun and"
                " call torch.distributed.init_process_group first), or turn it off"
            )
        ranks, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        self.bounds = class_slices(len(model.classnames), ranks)
        self._slice_model = None
        if ranks > 1:
            from ..model import PromptedCLIP

            start, stop = self.bounds[self.rank]
            with warnings.catch_warnings():  # duplicate class names: the full model warned about them already
                warnings.simplefilter("ignore", UserWarning)
                self._slice_model = PromptedCLIP(model.clip, model.method, model.classnames[start:stop],
                                                 tokenizer=model.tokenizer, truncate_text=model.truncate_text,
                                                 text_path=model.text_path)
        self._built_for = model.prompts

    @property
    def slice_model(self):
        """The PromptedCLIP over this rank's classes (None before the first pass, or with one rank)."""
        return self._slice_model

    def encode(self, model, tokens_by_layer: dict):
        """(features [C, E] of all classes, layer-1 input embeddings or None), as model.encode_text returns."""
        self._prepare(model)
        if self._slice_model is None:  # one rank: the model's own pass, unchanged
            return model.encode_text_tokens(tokens_by_layer)
        start, stop = self.bounds[self.rank]
        local_tokens = {layer: (value[start:stop] if scope == "class" else value, scope)
                        for layer, (value, scope) in tokens_by_layer.items()}
        self._slice_model.trace = model.trace
        local, _ = self._slice_model.encode_text_tokens(local_tokens)
        features = _GatherClassSlices.apply(local, self.bounds, self.rank, self.group)
        return features, model.text_input_embeds(tokens_by_layer)
