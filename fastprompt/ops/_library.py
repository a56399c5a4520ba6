"""Shared helpers for registering fastprompt's Triton kernels as torch ops.

Every op module follows the same pattern::

    from fastprompt.ops._library import define_op, require_triton

    require_triton()  # a clear ImportError where triton is missing (e.g. not Linux)
    from fastprompt.kernels import my_kernel  # launchers: shape/dtype/device checks + launch

    @define_op("my_op")  # registered as torch.ops.fastprompt.my_op
    def _my_op(x: torch.Tensor, scale: float) -> torch.Tensor:
        return my_kernel.forward(x, scale)

    @_my_op.register_fake  # shapes only: what torch.compile / opcheck trace with
    def _(x, scale):
        my_kernel.check_args(x)
        return x.new_empty(x.shape)

    _my_op.register_autograd(backward, setup_context=setup_context)

Why ``torch.library.custom_op`` and not ``torch.library.triton_op``: a triton_op's fake and
functional implementations re-run the Python body on FakeTensors/FunctionalTensors and rely on
``wrap_triton`` turning each launch into a graph node. Under ``TRITON_INTERPRET=1`` (the CPU
test environment) ``wrap_triton`` hands back the interpreted kernel itself, which then runs on
those tensors and fails, so the CPU tests could not exercise the registration the GPU uses.
A custom op with an explicit fake is the same code path on CPU and GPU; torch.compile treats
it as one opaque node (no graph break), which is all these kernels need.
"""

from __future__ import annotations

import importlib
import platform

import torch

NAMESPACE = "fastprompt"


def require_triton():
    """Import triton, or raise an ImportError that says what is missing and what to do."""
    try:
        return importlib.import_module("triton")
    except ImportError as exc:
        raise ImportError(
            "fastprompt's Triton kernels need the `triton` package (Linux; CUDA GPUs, or CPU under "
            f"TRITON_INTERPRET=1), which could not be imported on {platform.system()}: {exc}. "
            "Install `triton>=3.6,<3.10` on Linux, or use the PyTorch backends."
        ) from exc


def define_op(name: str):
    """Decorator: register a function as the custom op ``fastprompt::<name>``.

    The schema is inferred from the type annotations; no op mutates its inputs.
    """
    return torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=())
