"""Every method as a configuration of the general model, and the registry that builds them.

    model = fastprompt.build("maple", clip_model, classnames)               # paper defaults
    model = fastprompt.build("mmrl", clip_model, classnames, reg_weight=7.0)  # options per method

Options are the keyword arguments of each method class (see its docstring).
"""

from __future__ import annotations

import inspect

import torch.nn as nn

from ..backbone import inspect_clip
from ._build import BuildContext
from .coop import CoCoOp, CoOp
from .deep import IVLP, DeepLanguagePrompting, VPTDeep
from .maple import MaPLe
from .mcpl import MCPLCLIP
from .mmrl import MMRL
from .mpl import MPL
from .mudpt import MuDPT
from .promptsrc import PromptSRC
from .zeroshot import ZeroShotCLIP

METHODS = {
    "clip": ZeroShotCLIP,
    "coop": CoOp,
    "cocoop": CoCoOp,
    "vpt_deep": VPTDeep,
    "deep_language": DeepLanguagePrompting,
    "ivlp": IVLP,
    "maple": MaPLe,
    "mpl": MPL,
    "mudpt": MuDPT,
    "mmrl": MMRL,
    "promptsrc": PromptSRC,
    "mcpl": MCPLCLIP,
}


def method_class(name: str):
    key = name.lower().replace("-", "_")
    if key not in METHODS:
        raise KeyError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[key]


def method_options(name: str) -> dict:
    """The options a method accepts, with their defaults."""
    sig = inspect.signature(method_class(name).__init__)
    return {k: p.default for k, p in list(sig.parameters.items())[2:]}


def build(
    name: str,
    clip: nn.Module,
    classnames,
    tokenizer=None,
    truncate_text: bool = True,
    text_path: str = "auto",
    **options,
):
    """Build method `name` over the frozen `clip` for `classnames`; returns a PromptedCLIP.

    text_path: 'reference' (the eager oracle: full template rows cut after the last EOT), 'packed' (shared
    prefix once, class suffixes packed; exact), or 'auto' (packed when `clip` is fastprompt-patched).
    """
    from ..model import PromptedCLIP, _default_tokenizer

    cls = method_class(name)
    known = method_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"method {name!r} has no option(s) {unknown}; its options: {sorted(known)}")
    tokenizer = tokenizer or _default_tokenizer()
    ctx = BuildContext(clip, inspect_clip(clip), tokenizer)
    ctx.num_classes = len(classnames)
    method = cls(ctx, **options)
    device = next(clip.parameters()).device
    method.to(device)
    return PromptedCLIP(clip, method, classnames, tokenizer=tokenizer, truncate_text=truncate_text, text_path=text_path)


__all__ = ["METHODS", "build", "method_class", "method_options"]
