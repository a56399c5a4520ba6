"""The benchmark's contenders (DESIGN.md §5): how each builds a model and steps it through fastprompt's engine.

Benchmark code lives here, not in the library: the library has one training engine (fastprompt.training.TrainStep)
and every contender steps through it, with the choices below. The memory arithmetic of a contender is the library's
description of the same configuration (`contender_options` -> fastprompt.memory.options_for).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastprompt.memory import StepOptions, options_for
from fastprompt.training import TrainStep


@dataclass(frozen=True)
class Contender:
    """How a contender builds and runs a step (DESIGN.md §5)."""

    name: str
    patched: bool  # fastprompt.patch on the CLIP
    text_path: str  # PromptedCLIP text_path
    truncate_text: bool  # False: the reference rows keep all 77 tokens, as the research repos compute them
    compile: bool
    cuda_graph: bool | str
    weights_in_amp_dtype: bool  # frozen CLIP weights in the autocast dtype (else fp32 master weights)

    def clip_precision(self, amp_dtype: torch.dtype | None) -> str:
        if amp_dtype is None or not self.weights_in_amp_dtype:
            return "fp32"
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]


CONTENDERS = {
    # The research repos' computation made fair: unpatched open_clip, 77-token text per class, fp32 weights
    # under bf16 autocast (the repos call clip.float() for AMP).
    "eager": Contender("eager", False, "reference", False, False, False, False),
    "compiled": Contender("compiled", False, "reference", False, True, False, False),
    # The best step a skilled engineer writes with stock PyTorch and no fastprompt: unpatched open_clip (whose
    # nn.MultiheadAttention, batch-first and called without weights, runs F.scaled_dot_product_attention), frozen
    # weights in the autocast dtype, text cut after the longest EOT of the class set, torch.compile of the step.
    "tuned": Contender("tuned", False, "reference", True, True, False, True),
    "fastprompt": Contender("fastprompt", True, "packed", True, False, "auto", True),
}


def contender_options(name: str, device="cuda", amp_dtype: torch.dtype | None = torch.bfloat16,
                      optimizer: str = "sgd") -> StepOptions:
    """What contender `name` computes, for the memory and FLOP arithmetic, without building it."""
    spec = _spec(name)
    weights = torch.float32 if spec.clip_precision(amp_dtype) == "fp32" else amp_dtype
    return options_for(spec.patched, spec.truncate_text, device, amp_dtype, weights, optimizer=optimizer)


def _spec(name: str) -> Contender:
    if name not in CONTENDERS:
        raise ValueError(f"unknown contender {name!r}; known: {', '.join(CONTENDERS)}")
    return CONTENDERS[name]


def build_model(name: str, method: str, classnames, *, backbone: str = "ViT-B-16", device="cpu",
                amp_dtype: torch.dtype | None = torch.bfloat16, seed: int = 0, **method_options):
    """Contender `name`'s PromptedCLIP for `method` over a fresh random-weight CLIP, in training mode."""
    from fastprompt.backbones import create_clip
    from fastprompt.fast import patch
    from fastprompt.methods import build

    spec = _spec(name)
    clip = create_clip(backbone, precision=spec.clip_precision(amp_dtype), device=device, seed=seed)
    if spec.patched:
        patch(clip)
    torch.manual_seed(seed)
    model = build(method, clip, classnames, text_path=spec.text_path, truncate_text=spec.truncate_text,
                  **method_options)
    return model.train()


def build_contender(name: str, method: str, classnames, *, backbone: str = "ViT-B-16", device="cpu",
                    amp_dtype: torch.dtype | None = torch.bfloat16, lr: float = 2e-3, compile_options=None,
                    warmup_steps: int = 2, seed: int = 0, **method_options):
    """(model, TrainStep) for contender `name` training `method`: `build_model` and the papers' optimizer (SGD,
    momentum 0.9, weight decay 5e-4)."""
    from fastprompt.training import make_optimizer

    spec = _spec(name)
    model = build_model(name, method, classnames, backbone=backbone, device=device, amp_dtype=amp_dtype, seed=seed,
                        **method_options)
    optimizer = make_optimizer(model.trainable_parameters(), "sgd", lr=lr)
    step = TrainStep(model, optimizer, amp_dtype=amp_dtype, cuda_graph=spec.cuda_graph, compile=spec.compile,
                     compile_options=compile_options, warmup_steps=warmup_steps)
    return model, step
