"""Evaluation: accuracy and macro-F1 of a PromptedCLIP over a loader; never trains."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


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
