"""The training and evaluation loop shared by the demo and the runner.

The papers' recipe (METHODS.md §2): SGD (momentum 0.9, weight decay 5e-4) or AdamW, a learning rate set
once per epoch: a constant warm-up epoch at 1e-5, then cosine over the E epochs ("recount" on), and the
final-epoch weights are evaluated. A NaN or inf loss (or gradient) skips the step with a warning and stops
the run after a bound, instead of silently corrupting the prompts.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def lr_at(epoch: int, epochs: int, base_lr: float, warmup_epochs: int = 1, warmup_lr: float = 1e-5) -> float:
    """Learning rate of 1-based `epoch`: warm-up epochs at `warmup_lr`, then cosine with T_max = `epochs`.

    With one warm-up epoch: epoch 1 -> 1e-5, epoch e >= 2 -> base (1 + cos(pi (e - 2) / E)) / 2, the
    Dassl ConstantWarmupScheduler over CosineAnnealingLR. Without warm-up: base (1 + cos(pi (e - 1) / E)) / 2.
    """
    if not 1 <= epoch <= epochs:
        raise ValueError(f"epoch {epoch} outside 1..{epochs}")
    if epoch <= warmup_epochs:
        return warmup_lr
    step = epoch - 1 - warmup_epochs
    return base_lr * (1 + math.cos(math.pi * step / epochs)) / 2


def make_optimizer(params, name: str = "sgd", lr: float = 2e-3, weight_decay: float = 5e-4, momentum: float = 0.9):
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: the method has no trainable parameters")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {name!r}")


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class NonFiniteLossError(RuntimeError):
    """Too many steps in a row produced a NaN or inf loss."""


@dataclass
class EpochStats:
    loss: float
    images: int
    seconds: float
    skipped_steps: int

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _finite_grads(params) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True


def train_epoch(
    model,
    loader,
    optimizer,
    device,
    amp_dtype: torch.dtype | None = None,
    max_bad_steps: int = 5,
    progress=None,
    input_dtype: torch.dtype | None = None,
) -> EpochStats:
    """One pass over `loader`. `progress(step, loss)` is called after each step when given.

    A step whose loss or gradients are not finite is skipped (no update) with a warning; `max_bad_steps` of
    them in a row raise NonFiniteLossError. `input_dtype` casts the images (fp16 weights without autocast).
    """
    device = torch.device(device)
    model.train()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    total, count, images, skipped, bad_in_a_row = 0.0, 0, 0, 0, 0
    _sync(device)
    start = time.perf_counter()
    for step, (x, y) in enumerate(loader):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if input_dtype is not None:
            x = x.to(input_dtype)
        with _autocast(device, amp_dtype):
            out = model(x)
            loss, _ = model.loss(out, y)
        optimizer.zero_grad(set_to_none=True)
        finite = bool(torch.isfinite(loss))
        if finite:
            loss.backward()
            finite = _finite_grads(params)
            what = "gradient"
        else:
            what = f"loss {loss.item()}"
        if not finite:
            skipped += 1
            bad_in_a_row += 1
            optimizer.zero_grad(set_to_none=True)
            warnings.warn(f"non-finite {what} at step {step}; step skipped", RuntimeWarning, stacklevel=2)
            if bad_in_a_row >= max_bad_steps:
                raise NonFiniteLossError(
                    f"{bad_in_a_row} non-finite steps in a row; stopping (lower the lr, or use bf16/fp32 precision)"
                )
            continue
        bad_in_a_row = 0
        optimizer.step()
        value = loss.item()
        total += value * len(y)
        count += len(y)
        images += len(y)
        if progress is not None:
            progress(step, value)
    _sync(device)
    seconds = time.perf_counter() - start
    return EpochStats(loss=total / max(count, 1), images=images, seconds=seconds, skipped_steps=skipped)


def peak_memory(device) -> tuple[float, str]:
    """(peak bytes, what was measured): CUDA max allocated since the last reset, or the process's peak RSS."""
    device = torch.device(device)
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device)), "GPU peak allocated"
    import sys

    try:
        import resource
    except ImportError:  # Windows has no getrusage
        return float("nan"), "peak RSS (unavailable)"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return float(peak if sys.platform == "darwin" else peak * 1024), "peak RSS"


def reset_peak_memory(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def macro_f1(pred: torch.Tensor, target: torch.Tensor, classes: int) -> float:
    """Mean over classes present in target or prediction of per-class F1."""
    f1s = []
    for c in range(classes):
        tp = ((pred == c) & (target == c)).sum().item()
        fp = ((pred == c) & (target != c)).sum().item()
        fn = ((pred != c) & (target == c)).sum().item()
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / len(f1s) if f1s else float("nan")


@torch.no_grad()
def evaluate(
    model,
    loader,
    device,
    mode: str = "base",
    amp_dtype: torch.dtype | None = None,
    input_dtype: torch.dtype | None = None,
    progress=None,
) -> dict:
    """Accuracy and macro-F1 of `model.predict(out, mode)`; never updates anything.

    `progress(batch)` is called after each batch when given."""
    device = torch.device(device)
    model.eval()
    preds, targets, loss_sum = [], [], 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        if input_dtype is not None:
            x = x.to(input_dtype)
        with _autocast(device, amp_dtype):
            out = model(x)
            logits = model.predict(out, mode)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        preds.append(logits.argmax(-1).cpu())
        targets.append(y.cpu())
        if progress is not None:
            progress(len(y))
    if not preds:
        raise ValueError("evaluation set is empty")
    pred, target = torch.cat(preds), torch.cat(targets)
    classes = len(model.classnames)
    return {
        "accuracy": (pred == target).float().mean().item() * 100,
        "macro_f1": macro_f1(pred, target, classes) * 100,
        "loss": loss_sum / len(target),
        "images": len(target),
    }
