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


# --- the eager call path ------------------------------------------------------------------------------------------
# Calling a custom op costs two trips through the dispatcher (the autograd kernel, then the device kernel), schema
# handling and a generated autograd.Function: ~100 us of host time per forward call with autograd, ~40 us without,
# measured on a CPU host against ~10 us for a plain autograd.Function (bench/host.py has the step-level proxy). A
# training step makes ~200 such calls. So in eager mode each op runs its implementation through `eager_function`
# (the same Python body, the same setup_context and backward formula), and the registered op is what torch.compile,
# export, opcheck and every other tracing mode see: there `direct_call_ok` is False and the call goes to torch.ops.
def direct_call_ok(x: torch.Tensor) -> bool:
    """True when an op may skip the torch.library dispatch: not compiling or tracing, no Python dispatch mode
    (FakeTensorMode, functionalization, opcheck's modes, op counters), no functorch transform, and a plain tensor.
    The last two are asked of torch's C functions directly (what torch.utils._python_dispatch's
    _get_current_dispatch_mode reads): this runs ~100 times per training step."""
    return (
        type(x) is torch.Tensor
        and not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
        and torch._C._functorch.peek_interpreter_stack() is None
    )


def eager_function(name: str, impl, setup_context, backward) -> type[torch.autograd.Function]:
    """A torch.autograd.Function that runs `impl` with the op's own autograd formula (`setup_context`, `backward`,
    written for `register_autograd`; called here with the same arguments).

    Written in the combined form (forward(ctx, *args) calls setup_context itself) rather than with a separate
    setup_context staticmethod: for that form `Function.apply` binds the arguments with `inspect.signature` on every
    call (~20-90 us of host time, ~100 calls per training step). The separate form is what functorch transforms need,
    and those never take this path (`direct_call_ok` is False under them). Every argument is passed positionally."""

    def forward(ctx, *args):
        output = impl(*args)
        setup_context(ctx, args, output)
        return output

    return type(
        f"Eager_{name}",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward)},
    )


# --- no view ops to the shape a tensor has -------------------------------------------------------------------------
# The launchers take [rows, d], and the packed text stream already is [rows, d]. A reshape or view to the shape a tensor
# already has is still a dispatched op (~1-4 us of host time each; ~475 per MaPLe training step at ViT-B/16 on the
# eager Triton path), so the call paths skip them: `t if t.dim() == 2 else t.reshape(-1, t.shape[-1])` inline where
# it runs most (a Python call costs too), `viewed` elsewhere.
def viewed(t: torch.Tensor, shape) -> torch.Tensor:
    """t.view(shape), or t itself when it already has that shape."""
    return t if t.shape == shape else t.view(shape)
