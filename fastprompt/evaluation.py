"""Evaluation: `EvalStep`, the forward-only twin of training's TrainStep, and `evaluate` on it; never trains.

    step = EvalStep(model, mode="base")                  # bf16 autocast on CUDA, fp32 on CPU; cuda_graph="auto"
    for images, labels in loader:
        step(images.to(device), labels.to(device))        # logits [B, C]; nothing waits for the device
    totals = step.totals()                                # one host synchronisation: accuracy, macro-F1, loss

Why it looks like this (DESIGN.md §10): at inference the image tower is the whole cost. The model reuses its cached
text features and prompt tokens (PromptedCLIP.inference_cache) in eval mode under no_grad, so a batch is the vision
tower plus the heads; the metrics accumulate on the device (per-class true positives, predictions and labels: the
confusion matrix's diagonal and marginals, all macro-F1 needs) and are read once at the end. On CUDA with static
shapes the forward, the prediction and the accumulation are captured once in a CUDA graph after `warmup_steps`
eager batches (the warm-up fills the cache) and replayed with the batch copied into static buffers; a batch of
another shape (the last partial one) runs eagerly, CPU tensors run eagerly, a failed capture logs its reason and
runs eagerly. A captured graph reads the cache entry's tensors: before every replay the step asks the model for
its entry (the cheap key check) and re-captures when it is a different one (new class names, changed parameters).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .training import _capturing, _side_stream, note_capture_failure, note_no_graph

logger = logging.getLogger(__name__)

AUTO = "auto"


def default_amp_dtype(device) -> torch.dtype | None:
    """bf16 autocast on a GPU that computes bf16 natively, fp16 autocast on an older one (V100, T4: the dtype CLIP
    was released in), none (fp32) elsewhere: what evaluate and predict use unless told."""
    from .ops.backends import computes_bf16

    if torch.device(device).type != "cuda":
        return None
    return torch.bfloat16 if computes_bf16(device) else torch.float16


def _resolve_amp(amp_dtype, device) -> torch.dtype | None:
    amp_dtype = default_amp_dtype(device) if amp_dtype == AUTO else amp_dtype
    if amp_dtype not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"amp_dtype must be 'auto', torch.bfloat16, torch.float16 or None, got {amp_dtype!r}")
    return amp_dtype


def _autocast(device_type: str, dtype: torch.dtype | None):
    # No cast cache: PyTorch's CUDA-graph notes ask for cache_enabled=False under capture; eager batches use the
    # same setting so that graphed and eager batches run the same casts.
    return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None, cache_enabled=False)


def class_counts(pred: torch.Tensor, target: torch.Tensor, classes: int) -> torch.Tensor:
    """[3, classes] int64 on pred's device: per class the true positives, the predictions and the labels.

    Built from a [B, classes] comparison rather than bincount or index_add_: no host synchronisation (bincount's
    size depends on the data), deterministic, and capturable in a CUDA graph."""
    ids = torch.arange(classes, device=pred.device)
    is_target = target[:, None] == ids
    is_pred = pred[:, None] == ids
    return torch.stack([(is_target & is_pred).sum(0), is_pred.sum(0), is_target.sum(0)])


def macro_f1_from_counts(counts: torch.Tensor) -> float:
    """Mean over the classes present in the labels or the predictions of F1 = 2 TP / (predicted + actual)."""
    tp, predicted, actual = counts.double().cpu()
    present = (predicted + actual) > 0
    if not bool(present.any()):
        return float("nan")
    return float((2 * tp[present] / (predicted + actual)[present]).mean())


def macro_f1(pred: torch.Tensor, target: torch.Tensor, classes: int) -> float:
    """Macro-F1 of predicted vs target class indices (classes absent from both are left out of the mean)."""
    return macro_f1_from_counts(class_counts(pred, target, classes))


@dataclass(frozen=True)
class EvalTotals:
    images: int
    correct: int
    loss_sum: float
    counts: torch.Tensor  # [3, C] on the CPU: true positives, predictions, labels per class

    @property
    def accuracy(self) -> float:
        return self.correct / self.images if self.images else float("nan")

    @property
    def macro_f1(self) -> float:
        return macro_f1_from_counts(self.counts)

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.images if self.images else float("nan")


def prompted_logits(model, images: torch.Tensor, mode: str) -> torch.Tensor:
    """A PromptedCLIP's prediction logits: its forward, then the method's predict for `mode`."""
    return model.predict(model(images), mode)


class EvalStep:
    """Forward + prediction + on-device metrics for one batch; see the module docstring.

    Args:
        model: a PromptedCLIP (or anything `logits_fn` understands); put in eval mode.
        mode: prediction mode, 'base' or 'novel'.
        classes: the number of classes the metrics count (default: len(model.classnames)).
        amp_dtype: 'auto' (default_amp_dtype: bf16 on CUDA, fp16 before Ampere, none on CPU), torch.bfloat16,
            torch.float16 or None.
        cuda_graph: 'auto' (capture on CUDA, fall back with a logged reason), True (capture or raise), False.
        warmup_steps: eager batches before the capture (at least 1: it fills the model's cache).
        logits_fn: (model, images, mode) -> logits [B, C]; default `prompted_logits`.
    """

    def __init__(self, model, *, mode: str = "base", classes: int | None = None, amp_dtype=AUTO,
                 cuda_graph: bool | str = AUTO, warmup_steps: int = 1, logits_fn=prompted_logits, device=None):
        if cuda_graph not in (AUTO, True, False):
            raise ValueError(f"cuda_graph must be 'auto', True or False, got {cuda_graph!r}")
        if not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"warmup_steps must be an int >= 1, got {warmup_steps!r}")
        if mode not in ("base", "novel"):
            raise ValueError(f"mode must be 'base' or 'novel', got {mode!r}")
        self.model, self.mode, self.logits_fn = model, mode, logits_fn
        self.classes = int(classes if classes is not None else len(model.classnames))
        if device is None:
            device = next(iter(model.parameters())).device
        self.device = torch.device(device)
        self.amp_dtype = _resolve_amp(amp_dtype, self.device)
        self.cuda_graph, self.warmup_steps = cuda_graph, warmup_steps
        self.graph_reason: str | None = None
        self._counts = torch.zeros(3, self.classes, dtype=torch.int64, device=self.device)
        self._loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self._graph = None
        self._graph_failed = False
        self._signature = None
        self._static = None
        self._entry = None  # the model's cache entry the graph reads
        self._warm = 0
        self._logged: set[str] = set()
        model.eval()

    @property
    def mode_name(self) -> str:
        return "cuda_graph" if self._graph is not None else "eager"

    def totals(self) -> EvalTotals:
        """Everything accumulated since the last reset (one host synchronisation)."""
        packed = torch.cat([self._loss.reshape(1), self._counts.double().flatten()]).cpu()  # exact below 2**53
        counts = packed[1:].long().view(3, self.classes)
        return EvalTotals(images=int(counts[2].sum()), correct=int(counts[0].sum()), loss_sum=float(packed[0]),
                          counts=counts)

    def reset(self) -> None:
        self._counts.zero_()
        self._loss.zero_()

    # --- one batch ------------------------------------------------------------------------------------
    def _body(self, images, labels) -> torch.Tensor:
        with _autocast(images.device.type, self.amp_dtype):
            logits = self.logits_fn(self.model, images, self.mode)
        if labels is not None:
            self._counts.add_(class_counts(logits.argmax(-1), labels, self.classes))
            self._loss.add_(F.cross_entropy(logits.float(), labels, reduction="sum").double())
        return logits

    def _cache_entry(self):
        """The model's cache entry under this step's autocast (None for a model without one)."""
        lookup = getattr(self.model, "inference_cache", None)
        if lookup is None:
            return None
        with _autocast(self.device.type, self.amp_dtype):
            return lookup()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, C] of the batch (on the device); with `labels`, the batch also counts in `totals()`."""
        if self.cuda_graph is False or self._graph_failed:
            return self._body(images, labels)
        if images.device.type != "cuda":
            return self._eager(f"CUDA graphs need CUDA tensors; the batch is on {images.device}", images, labels)
        signature = tuple(None if t is None else (tuple(t.shape), t.dtype, t.device) for t in (images, labels))
        if self._signature is not None and signature != self._signature:
            return self._eager("a batch of another shape than the captured one runs eagerly", images, labels,
                               permanent=False)
        if self._graph is not None and self._cache_entry() is not self._entry:
            logger.info("EvalStep: the model's cached prompts changed; re-capturing the CUDA graph")
            self._graph, self._entry, self._warm = None, None, 0
        if self._graph is None:
            if self._warm < self.warmup_steps:
                self._warm += 1
                with _side_stream(images.device):
                    return self._body(images, labels)
            try:
                self._capture(images, labels)
            except Exception as error:  # noqa: BLE001 - any capture failure means: run eagerly
                note_capture_failure(self, error, images.device, logger)
                return self._body(images, labels)
            self._signature = signature
        static_images, static_labels, static_logits = self._static
        static_images.copy_(images)
        if labels is not None:
            static_labels.copy_(labels)
        self._graph.replay()
        return static_logits.clone()

    def _eager(self, reason: str, images, labels, permanent: bool = True) -> torch.Tensor:
        note_no_graph(self, reason, logger, permanent)
        return self._body(images, labels)

    def _capture(self, images, labels) -> None:
        static_images = images.clone()
        static_labels = None if labels is None else labels.clone()
        entry = self._cache_entry()  # filled by the warm-up; the graph reads its tensors
        torch.cuda.synchronize(images.device)
        graph = torch.cuda.CUDAGraph()
        with _capturing(graph, images.device):
            static_logits = self._body(static_images, static_labels)
        if self._cache_entry() is not entry:
            raise RuntimeError("the model's cache entry changed during the capture")
        self._graph, self._entry = graph, entry
        self._static = (static_images, static_labels, static_logits)
        self.graph_reason = None
        logger.info("EvalStep: captured the forward in a CUDA graph for images %s", tuple(images.shape))


def evaluate(model, loader, device, mode: str = "base", amp_dtype=AUTO, input_dtype: torch.dtype | None = None,
             progress=None, cuda_graph: bool | str = AUTO, reduce=None) -> dict:
    """Accuracy (%), macro-F1 (%), mean cross-entropy and image count of `model` over `loader` of (images, labels).

    Never updates anything and never waits for the device per batch (one read at the end). `amp_dtype` 'auto' is
    bf16 on CUDA and fp32 on CPU; the runner passes its precision's. `input_dtype` casts the images (fp16-parity).
    `progress(n)` is called after each batch with its size. `reduce(tensor)` sums a tensor in place over the
    processes of a data-parallel evaluation (fastprompt.parallel.data_parallel.all_reduce_sum_), each of which passes
    its own shard of the set in `loader`: the per-class counts are integers, so the metrics are exactly those of
    one process over the whole set."""
    device = torch.device(device)
    step = EvalStep(model, mode=mode, amp_dtype=amp_dtype, cuda_graph=cuda_graph, device=device)
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if input_dtype is not None:
            images = images.to(input_dtype)
        step(images, labels)
        if progress is not None:
            progress(labels.shape[0])
    if reduce is not None:
        reduce(step._counts)
        reduce(step._loss)
    totals = step.totals()
    if totals.images == 0:
        raise ValueError("evaluation set is empty")
    return {"accuracy": totals.accuracy * 100, "macro_f1": totals.macro_f1 * 100, "loss": totals.mean_loss,
            "images": totals.images}
