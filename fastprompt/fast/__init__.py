"""The fast path: `patch` (fused blocks on one CLIP instance), the packed text tower and grouped coupling maps.

Layering: this package calls fastprompt.ops (and, through it, the Triton kernels) and knows open_clip's modules;
it never imports the general model, the methods, training or the runner. A patched CLIP carries one `FastPath`
(the kernel plan chosen at patch time); `fast_path(clip)` returns it, and the general model asks it how to run.
"""

from .patch import FastPath, fast_path, is_patched, patch, unpatch

__all__ = ["FastPath", "fast_path", "is_patched", "patch", "unpatch"]
