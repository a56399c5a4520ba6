"""Every method as a configuration of the general model, and the registry that builds them.

    model = fastprompt.build("maple", clip_model, classnames)               # paper defaults
    model = fastprompt.build("mmrl", clip_model, classnames, reg_weight=7.0)  # options per method

Options are the keyword arguments of each method class (see its docstring).
"""

from __future__ import annotations

import inspect
import math
import numbers

import torch.nn as nn

from ..backbone import UnsupportedModelError, cnn_refusal, inspect_clip
from ..keywords import accepts, declared_types, plain_number, type_name
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
    if not isinstance(name, str):
        raise TypeError(f"method name must be a string such as 'coop', not {type(name).__name__}")
    key = name.lower().replace("-", "_")
    if key not in METHODS:
        raise KeyError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[key]


def method_options(name: str) -> dict:
    """The options a method accepts, with their defaults."""
    sig = inspect.signature(method_class(name).__init__)
    return {k: p.default for k, p in list(sig.parameters.items())[2:]}


def option_types(name: str) -> dict[str, object]:
    """Option name -> the type its method declares for it (object where undeclared or unresolvable)."""
    return declared_types(method_class(name).__init__, skip=2)


# Options with a range, the same for every method that takes them: name -> (lowest, highest) inclusive, None =
# unbounded. Checked when a model is built and by the runner before anything is read.
OPTION_RANGES = {
    "n_ctx": (1, None), "depth": (1, None), "n_tokens": (1, None), "rep_dim": (1, None), "first_layer": (1, None),
    "text_depth": (0, None), "vision_depth": (0, None), "decoder_layers": (1, None), "meta_hidden": (1, None),
    "n_text": (0, None), "n_vision": (0, None), "n_add": (0, None), "n_remove": (0, None),
    "reg_weight": (0, None), "text_weight": (0, None), "image_weight": (0, None), "kl_weight": (0, None),
    "alpha": (0, 1), "gpa_mean": (0, None), "gpa_std": (0, None),
}


def option_range_problem(option: str, value) -> str | None:
    """'must be >= 1, got 0' for a number outside OPTION_RANGES (or not finite); None for anything else."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    if not math.isfinite(value):
        return f"must be a finite number, got {value}"
    low, high = OPTION_RANGES.get(option, (None, None))
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = " and ".join(b for b in ("" if low is None else f">= {low}", "" if high is None else f"<= {high}")
                              if b)
        return f"must be {bounds}, got {value}"
    return None


def checked_options(name: str, options: dict) -> dict:
    """`options` with each checked against its declared type, so that a wrong type is one error naming the option
    (n_ctx='two' used to fail deep inside the method with "'<' not supported between 'int' and 'str'"), and numpy
    scalars made Python numbers (the schedule and the methods' checks take Python ints)."""
    types_ = option_types(name)
    checked = {}
    for option, value in options.items():
        hint = types_[option]
        if accepts(hint, value) is False:
            raise TypeError(f"method {name!r} option {option}={value!r} is of type {type(value).__name__}; "
                            f"expected {type_name(hint)} (default {method_options(name)[option]!r})")
        problem = option_range_problem(option, value)
        if problem is not None:
            raise ValueError(f"method {name!r} option {option} {problem}")
        checked[option] = plain_number(value)
    return checked


def build(
    name: str,
    clip: nn.Module,
    classnames,
    tokenizer=None,
    truncate_text: bool = True,
    text_path: str = "auto",
    last_layer: str = "auto",
    **options,
):
    """Build method `name` over the frozen `clip` for `classnames`; returns a PromptedCLIP.

    classnames: any iterable of strings (read once, so a generator works); None, a single string, a
    non-string entry are errors naming it; two names equal after cleaning ('red_panda', 'red panda') a warning.
    text_path: 'reference' (the eager oracle: full template rows cut after the last EOT), 'packed' (shared
    prefix once, class suffixes packed; exact), or 'auto' (packed when `clip` is fastprompt-patched).
    last_layer: 'pooled' (each tower's last block runs on the rows its output is pooled from: the vision CLS rows,
    the packed text's EOT rows; exact), 'full' (every row, as open_clip computes it) or 'auto' (pooled when `clip`
    is fastprompt-patched, the vision tower full for a method that reads its tokens); see PromptedCLIP.

    `clip` is frozen in place: every one of its parameters gets requires_grad=False (the caller's flags are not
    kept). Training needs it: a CLIP weight that requires grad makes every step compute and keep its gradient
    (open_clip's blocks read their weights directly, and the fused ops take the frozen-weight path only for
    weights that do not require grad). Call `clip.requires_grad_(True)` to train the CLIP itself afterwards.
    """
    from ..model import PromptedCLIP, _default_tokenizer
    from ..text import class_list

    cls = method_class(name)
    known = method_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"method {name!r} has no option(s) {unknown}; its options: {sorted(known)}")
    options = checked_options(name, options)
    # Checked before any work; a generator is read once, here. The model's tokenization warns of duplicates.
    classnames = class_list(classnames)
    info = inspect_clip(clip)
    if info.vision_tower == "cnn" and cls.prompts_vision(options):
        raise UnsupportedModelError(cnn_refusal(cls.name, type(clip.visual).__name__))
    tokenizer = tokenizer or _default_tokenizer(info)
    ctx = BuildContext(clip, info, tokenizer)
    ctx.num_classes = len(classnames)
    method = cls(ctx, **options)
    device = next(clip.parameters()).device
    method.to(device)
    model = PromptedCLIP(clip, method, classnames, tokenizer=tokenizer, truncate_text=truncate_text,
                         text_path=text_path, last_layer=last_layer)
    model.build_options = options  # what fastprompt.save_prompts records beside the method's defaults
    return model


__all__ = ["METHODS", "build", "method_class", "method_options"]
