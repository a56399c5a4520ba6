"""fastprompt.kernels.activation (the in-place activation pass of the cuBLAS MLP plan) against float64.

Both modes are checked against the float64 activation and its derivative (autograd's) evaluated on the same stored
values, with the error bound of DESIGN.md §4 (twice PyTorch's own error at the test dtype); sizes straddle the
4,096-element tile so the masked tail is exercised. On CPU the kernel runs under the Triton interpreter in fp32, on a
GPU compiled in bf16, fp16 and fp32.
"""

import pytest
import torch

from fastprompt.kernels import activation as act_kernel
from kernel_numerics import TORCH_ACTIVATIONS, assert_within_torch_error
from kernel_targets import MATRIX_DTYPE, MATRIX_DTYPES, dtype_params

DTYPES = dtype_params(MATRIX_DTYPES)
ACTIVATIONS = tuple(act_kernel.ACTIVATIONS)
SIZES = [(1,), (4095,), (3, 2731)]  # one element, one tile short of full, three tiles with a tail (8,193)


def _derivative(activation, pre):
    """act'(pre) by autograd, in pre's dtype."""
    leaf = pre.detach().requires_grad_()
    (grad,) = torch.autograd.grad(TORCH_ACTIVATIONS[activation](leaf).sum(), leaf)
    return grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_forward_in_place(activation, size, dtype, kernel_device):
    pre = (2 * torch.randn(size, device=kernel_device)).to(dtype)
    expected64 = TORCH_ACTIVATIONS[activation](pre.double())
    torch_out = TORCH_ACTIVATIONS[activation](pre)
    buffer = pre.clone()
    out = act_kernel.activation_(buffer, activation)
    assert out.data_ptr() == buffer.data_ptr() and out.dtype == dtype
    assert_within_torch_error(f"activation {activation} {size}", out, expected64, torch_out, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradient_in_place(activation, size, dtype, kernel_device):
    pre = (2 * torch.randn(size, device=kernel_device)).to(dtype)
    grad = torch.randn(size, device=kernel_device).to(dtype)
    expected64 = grad.double() * _derivative(activation, pre.double())
    torch_out = grad * _derivative(activation, pre)
    buffer = pre.clone()
    out = act_kernel.activation_grad_(buffer, grad, activation)
    assert out.data_ptr() == buffer.data_ptr() and out.dtype == dtype
    assert_within_torch_error(f"activation gradient {activation} {size}", out, expected64, torch_out, dtype)


def test_empty_tensor_is_a_no_op(kernel_device):
    pre = torch.empty(0, 7, device=kernel_device, dtype=MATRIX_DTYPE)
    assert act_kernel.activation_(pre, "quick_gelu").shape == (0, 7)
    assert act_kernel.activation_grad_(pre, pre.clone(), "gelu").shape == (0, 7)


@pytest.mark.parametrize(
    "pre, grad, activation, message",
    [
        (lambda d: torch.randn(4, 6, device=d), None, "silu", "must be one of"),
        (lambda d: torch.randn(6, 4, device=d).t(), None, "gelu", "must be contiguous"),
        (lambda d: torch.randint(0, 3, (5,), device=d), None, "gelu", "float32, float16 or bfloat16"),
        (lambda d: torch.randn(4, 6, device=d), lambda d: torch.randn(4, 5, device=d), "gelu", "upstream gradient"),
        (lambda d: torch.randn(4, 6, device=d), lambda d: torch.randn(4, 6, device=d).double(), "relu",
         "upstream gradient"),
        (lambda d: torch.randn(4, 6, device=d), lambda d: torch.randn(4, 6, device="meta"), "relu", "one device"),
    ],
    ids=["activation", "layout", "int", "grad-shape", "grad-dtype", "grad-device"],
)
def test_bad_input_raises_clear_error(pre, grad, activation, message, kernel_device):
    with pytest.raises(ValueError, match=message):
        if grad is None:
            act_kernel.activation_(pre(kernel_device), activation)
        else:
            act_kernel.activation_grad_(pre(kernel_device), grad(kernel_device), activation)
