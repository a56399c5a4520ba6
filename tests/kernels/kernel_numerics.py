"""Numerics helpers shared by the kernel tests (DESIGN.md §4: error relative to PyTorch's own)."""

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

# atol relative to the largest reference magnitude: ~100 fp32 ulps, half a bf16/fp16 ulp.
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 5e-4}

# The kernels' activations written as PyTorch ops: the references of the MLP and activation tests.
TORCH_ACTIVATIONS = {
    "none": lambda t: t,
    "relu": torch.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "quick_gelu": lambda t: t * torch.sigmoid(1.702 * t),
}


def assert_within_torch_error(name, got, ref64, torch_out, dtype):
    """Max |got - ref64| <= 2 * max |torch_out - ref64| + atol * max |ref64|."""
    assert torch.isfinite(got).all(), f"{name}: non-finite values (an unwritten output element?)"
    err = (got.double() - ref64).abs()
    torch_err = (torch_out.double() - ref64).abs()
    atol = ATOL[dtype] * ref64.abs().max().item()
    print(
        f"{name}: kernel max {err.max().item():.3e} mean {err.mean().item():.3e} | "
        f"torch max {torch_err.max().item():.3e} mean {torch_err.mean().item():.3e}"
    )
    bound = 2 * torch_err.max().item() + atol
    assert err.max().item() <= bound, f"{name}: error {err.max().item():.3e} > 2 x PyTorch's + atol = {bound:.3e}"


class OpRecorder(TorchDispatchMode):
    """Records the names of the ops dispatched while active."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))
