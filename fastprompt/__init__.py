"""fastprompt: fast, memory-lean prompt learning on frozen open_clip CLIP models.

    import open_clip, fastprompt
    clip = open_clip.create_model("ViT-B-16-quickgelu", pretrained="openai")  # OpenAI weights: QuickGELU
    model = fastprompt.build("maple", clip, ["cat", "dog"])
    out = model(images); loss, parts = model.loss(out, labels)
"""

from __future__ import annotations

import importlib
import importlib.util

__version__ = "0.1.0"

# The public names resolve on first use (PEP 562), not at import: `import fastprompt.cli` must not import
# torch and open_clip (seconds), so that `fastprompt --help` and argument errors answer at once.
_LAZY = {
    "UnsupportedModelError": ".backbone",
    "inspect_clip": ".backbone",
    "METHODS": ".methods",
    "build": ".methods",
    "method_options": ".methods",
    "PromptedCLIP": ".model",
    "is_patched": ".fast",
    "patch": ".fast",
    "unpatch": ".fast",
    "save_prompts": ".runner.checkpoint",
    "load_prompts": ".runner.checkpoint",
    "LayerEdit": ".schedule",
    "ScheduleError": ".schedule",
    "TowerSchedule": ".schedule",
}


def __getattr__(name: str):
    if name not in _LAZY:
        # Submodules too (fastprompt.memory.predict_for, fastprompt.runner.predict after `import fastprompt`):
        # the eager imports used to load several of them as a side effect.
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f".{name}", __name__)
        raise AttributeError(f"module 'fastprompt' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # cached: later lookups do not come back here
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "METHODS",
    "LayerEdit",
    "PromptedCLIP",
    "ScheduleError",
    "TowerSchedule",
    "UnsupportedModelError",
    "build",
    "inspect_clip",
    "is_patched",
    "load_prompts",
    "method_options",
    "patch",
    "save_prompts",
    "unpatch",
]
