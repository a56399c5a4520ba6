"""fastprompt: fast, memory-lean prompt learning on frozen open_clip CLIP models.

    import open_clip, fastprompt
    clip = open_clip.create_model("ViT-B-16", pretrained="openai")
    model = fastprompt.build("maple", clip, ["cat", "dog"])
    out = model(images); loss, parts = model.loss(out, labels)
"""

from .backbone import UnsupportedModelError, inspect_clip
from .methods import METHODS, build, method_options
from .model import PromptedCLIP
from .fast import is_patched, patch, unpatch
from .schedule import LayerEdit, ScheduleError, TowerSchedule

__version__ = "0.1.0"

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
    "method_options",
    "patch",
    "unpatch",
]
