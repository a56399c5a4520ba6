"""`fastprompt demo`: train and evaluate one method end to end on the embedded procedural dataset.

Everything is the real pipeline: drawn images through the data loader and the papers' augmentation, the
CLIP tokenizer, the general model, an optimizer with warm-up + cosine, and evaluation (accuracy, macro-F1).
With no pretrained weights it uses a random-weight CLIP ('small': 12 layers of width 128, 64 px), so what it
shows is that prompt learning on a frozen network fits the task from the prompts alone, and how fast a step
is; with `pretrained` (an open_clip tag or a local file) and a real backbone it is a real few-shot run.
"""

from __future__ import annotations

import time

import torch
from torch.utils.data import DataLoader

from . import backbone as bb
from .backbones import create_clip
from .data import eval_transform, procedural_splits, train_transform
from .evaluation import evaluate
from .fast import patch
from .methods import build
from .training import TrainStep, fit, lr_at, make_optimizer

# Short-run settings that learn within a minute on a CPU from random weights (the papers' recipes assume
# pretrained CLIP and 5-200 epochs; the runner's presets carry those).
DEMO_DEFAULTS = dict(optimizer="adamw", lr=2e-3, weight_decay=0.0)


def _check_options(method, backbone, epochs, shots, test_per_class, batch_size, lr, device,
                   kernels) -> torch.device:
    """Every option checked before anything is built, each error naming the option (ConfigError, a ValueError);
    returns the device. Without this, an unknown backbone or device ended in a traceback."""
    import math

    from .backbones import known_backbones
    from .methods import METHODS
    from .ops.backends import BACKENDS
    from .runner.config import ConfigError, unknown_key_message
    from .runner.engine import resolve_device

    if method not in METHODS:
        raise ConfigError(unknown_key_message(method, sorted(METHODS), "method"))
    for name, value, low in (("epochs", epochs, 1), ("shots", shots, 1), ("test_per_class", test_per_class, 1),
                             ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            hint = " (the demo trains; fastprompt train ... epochs=0 evaluates without training)" * (name == "epochs")
            raise ConfigError(f"demo: {name} must be an integer >= {low}, got {value!r}{hint}")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr)
                           or lr <= 0):
        raise ConfigError(f"demo: lr must be a finite number > 0, got {lr!r}")
    if not backbone.startswith("hf-hub:") and backbone not in known_backbones():
        import difflib

        close = difflib.get_close_matches(backbone, known_backbones(), n=3)
        raise ConfigError(f"demo: unknown backbone {backbone!r}" + (f"; did you mean {', '.join(close)}?" if close
                                                                     else "; see open_clip.list_models()"))
    if kernels not in ("auto", *BACKENDS):
        raise ConfigError(f"demo: kernels must be auto or one of {', '.join(BACKENDS)}, got {kernels!r}")
    return resolve_device(device)


def run_demo(
    method: str = "maple",
    backbone: str = "small",
    pretrained: str | None = None,
    epochs: int = 15,
    shots: int = 16,
    test_per_class: int = 25,
    batch_size: int = 16,
    lr: float | None = None,
    seed: int = 0,
    device: str = "auto",
    kernels: str = "auto",
    echo=print,
) -> dict:
    device = _check_options(method, backbone, epochs, shots, test_per_class, batch_size, lr, device, kernels)
    # The runner's precision=auto: on a GPU bf16 frozen weights under bf16 autocast, or before Ampere fp16 weights
    # without autocast (the papers' numerics); fp32 on a CPU.
    from .runner.engine import numerics

    num = numerics("auto", device)
    amp_dtype = num.amp_dtype
    torch.manual_seed(seed)
    clip = create_clip(backbone, pretrained=pretrained, device=device, precision=num.clip_precision)
    if kernels != "eager":
        # The product's fast path (exact): fused blocks, packed text; Triton kernels on CUDA.
        patch(clip, backend=kernels)
    size = bb.image_size_of(clip.visual)[0]
    splits = procedural_splits(num_train_per_class=shots, num_test_per_class=test_per_class, image_size=size, seed=seed)
    model = build(method, clip, splits.classnames)
    trainable = sum(p.numel() for p in model.trainable_parameters())
    generator = torch.Generator().manual_seed(seed)
    whole_set = batch_size > len(splits.train)  # one batch of the whole set per epoch, as the runner and Dassl do
    asked, batch_size = batch_size, min(batch_size, len(splits.train))
    train_loader = DataLoader(
        splits.dataset("train", train_transform(size)), batch_size=batch_size, shuffle=True, generator=generator,
        drop_last=True, pin_memory=device.type == "cuda",
    )
    test_loader = DataLoader(splits.dataset("test", eval_transform(size)), batch_size=64)
    chance = 100.0 / splits.num_classes
    echo(
        f"fastprompt demo: {method} on {backbone} ({'pretrained ' + pretrained if pretrained else 'random weights'}),"
        f" {splits.num_classes} classes x {shots} shots, {len(splits.test)} test images, {trainable:,} trainable"
        f" parameters, device {device}, {'unpatched reference path' if kernels == 'eager' else 'fastprompt.patch'}"
    )
    if whole_set:
        echo(f"the training set holds {batch_size} images, fewer than batch_size={asked}: each epoch is one batch of"
             " all of them")
    before = evaluate(model, test_loader, device, amp_dtype=amp_dtype)
    echo(f"before training: accuracy {before['accuracy']:.1f}% (chance {chance:.1f}%)")
    optimizer = make_optimizer(
        model.trainable_parameters(), DEMO_DEFAULTS["optimizer"], lr or DEMO_DEFAULTS["lr"],
        weight_decay=DEMO_DEFAULTS["weight_decay"],
    )
    base_lr = lr or DEMO_DEFAULTS["lr"]
    step = TrainStep(model, optimizer, amp_dtype=amp_dtype)  # the library's one engine (CUDA graph on a GPU)

    def epoch_end(epoch, rate, stats):
        echo(f"epoch {epoch}/{epochs}: loss {stats.loss:.4f}, {stats.images_per_second:.1f} images/s"
             f" ({stats.seconds:.1f} s)")

    start = time.perf_counter()
    # A short run: no warm-up epoch, cosine over the epochs.
    history = fit(step, train_loader, epochs, lambda epoch: lr_at(epoch, epochs, base_lr, warmup_epochs=0),
                  device=device, on_epoch_end=epoch_end)
    after = evaluate(model, test_loader, device, amp_dtype=amp_dtype)
    seconds = time.perf_counter() - start
    echo(
        f"after training: accuracy {after['accuracy']:.1f}% (chance {chance:.1f}%), macro-F1 {after['macro_f1']:.1f}%,"
        f" {seconds:.0f} s of training"
    )
    return {
        "method": method,
        "backbone": backbone,
        "chance": chance,
        "accuracy_before": before["accuracy"],
        "accuracy": after["accuracy"],
        "macro_f1": after["macro_f1"],
        "losses": [s.loss for s in history],
        "images_per_second": history[-1].images_per_second if history else float("nan"),
        "seconds": seconds,
    }
