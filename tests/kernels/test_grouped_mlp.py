"""fastprompt.ops.grouped_mlp (grouped_linear, grouped_bottleneck_mlp) against float64.

Rule (DESIGN.md §4): the kernel's max error against float64 is at most twice the error of the
same computation in plain PyTorch at the test dtype, plus a small atol, for the output and the
gradients of x and of every weight and bias (these maps train). On CPU the kernels run under
the Triton interpreter in fp32, on a GPU compiled in bf16, fp16 and fp32 (kernel_targets); the
GPU class repeats the checks at the PMS / coupling shapes and times the kernels against PyTorch.
"""

import math

import pytest
import torch

from fastprompt.kernels import grouped_mlp as grouped_kernel
from fastprompt.ops.grouped_mlp import grouped_bottleneck_mlp, grouped_linear
from kernel_numerics import assert_within_torch_error
from kernel_targets import MATRIX_DTYPE, MATRIX_DTYPES, dtype_params

DTYPES = dtype_params(MATRIX_DTYPES)


def torch_grouped_linear(x, weight, bias):
    return torch.baddbmm(bias[:, None, :], x, weight.transpose(1, 2))


def torch_bottleneck(x, w1, b1, w2, b2):
    return torch_grouped_linear(torch.relu(torch_grouped_linear(x, w1, b1)), w2, b2)


def linear_stack(groups, dout, din, dtype, device):
    weight = (torch.randn(groups, dout, din, device=device) / math.sqrt(din)).to(dtype)
    bias = (0.5 * torch.randn(groups, dout, device=device)).to(dtype)
    return weight, bias


def outputs_and_gradients(fn, inputs, dy):
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out.backward(dy.to(out.dtype))
    return {"out": out.detach()} | {f"grad{i}": leaf.grad for i, leaf in enumerate(leaves)}


def check(fn, torch_fn, inputs, dtype, label):
    """fn vs float64 torch_fn, against torch_fn at the test dtype: output and every gradient."""
    with torch.no_grad():
        dy = torch.randn_like(torch_fn(*inputs).float())
    got = outputs_and_gradients(fn, inputs, dy)
    low = outputs_and_gradients(torch_fn, inputs, dy)
    ref = outputs_and_gradients(torch_fn, [t.double() for t in inputs], dy)
    for name in got:
        assert_within_torch_error(f"{label} {name}", got[name], ref[name], low[name], dtype)


def linear_inputs(groups, n, din, dout, dtype, device):
    x = torch.randn(groups, n, din, device=device).to(dtype)
    return [x, *linear_stack(groups, dout, din, dtype, device)]


def bottleneck_inputs(groups, n, din, hidden, dout, dtype, device):
    x = torch.randn(groups, n, din, device=device).to(dtype)
    return [x, *linear_stack(groups, hidden, din, dtype, device), *linear_stack(groups, dout, hidden, dtype, device)]


# (G, n, din, dout): a MaPLe-like coupling (12 layers, 2 tokens), one token, and more rows
# than one 16-row tile; widths that are not multiples of the tiles.
@pytest.mark.parametrize(
    "shape", [(12, 2, 40, 72), (1, 1, 70, 90), (2, 37, 24, 70)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_linear(shape, dtype, kernel_device, poison):
    inputs = linear_inputs(*shape, dtype, kernel_device)
    check(grouped_linear, torch_grouped_linear, inputs, dtype, f"grouped_linear {shape}")


# (G, n, din, hidden, dout): PMS-like (2 tokens, hidden narrower than the input), one token,
# the 16-token maximum with a hidden wider than one chunk.
@pytest.mark.parametrize(
    "shape", [(3, 2, 70, 24, 90), (1, 1, 20, 16, 24), (2, 16, 40, 130, 33)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_bottleneck_mlp(shape, dtype, kernel_device, poison):
    inputs = bottleneck_inputs(*shape, dtype, kernel_device)
    check(grouped_bottleneck_mlp, torch_bottleneck, inputs, dtype, f"bottleneck {shape}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_bottleneck_hidden_is_the_relu_output(dtype, kernel_device, poison):
    x, w1, b1, w2, b2 = bottleneck_inputs(4, 3, 24, 40, 20, dtype, kernel_device)
    _, hidden = torch.ops.fastprompt.grouped_bottleneck_mlp(x, w1, b1, w2, b2)
    exact = torch.relu(torch_grouped_linear(x.double(), w1.double(), b1.double()))
    assert_within_torch_error("hidden", hidden, exact, torch.relu(torch_grouped_linear(x, w1, b1)), dtype)


def test_backward_is_deterministic(kernel_device):
    x, w, b = linear_inputs(3, 20, 40, 33, MATRIX_DTYPE, kernel_device)
    dy = torch.randn(3, 20, 33, device=kernel_device).to(MATRIX_DTYPE)
    first = grouped_kernel.grouped_linear_backward(dy, x, w)
    second = grouped_kernel.grouped_linear_backward(dy, x, w)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    x, w1, b1, w2, b2 = bottleneck_inputs(3, 2, 40, 24, 33, MATRIX_DTYPE, kernel_device)
    _, hidden = grouped_kernel.grouped_bottleneck_forward(x, w1, b1, w2, b2)
    dy = torch.randn(3, 2, 33, device=kernel_device).to(MATRIX_DTYPE)
    first = grouped_kernel.grouped_bottleneck_backward(dy, x, hidden, w1, w2)
    second = grouped_kernel.grouped_bottleneck_backward(dy, x, hidden, w1, w2)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_opcheck(kernel_device):
    inputs = [t.requires_grad_(True) for t in linear_inputs(2, 3, 20, 24, MATRIX_DTYPE, kernel_device)]
    torch.library.opcheck(torch.ops.fastprompt.grouped_linear, tuple(inputs))
    inputs = [t.requires_grad_(True) for t in bottleneck_inputs(2, 3, 20, 17, 24, MATRIX_DTYPE, kernel_device)]
    torch.library.opcheck(torch.ops.fastprompt.grouped_bottleneck_mlp, tuple(inputs))


def _linear_args(dev, x_shape=(2, 3, 8), w_shape=(2, 5, 8), w_dtype=torch.float32, b_device=None):
    x = torch.randn(x_shape, device=dev)
    return [x, torch.randn(w_shape, device=dev).to(w_dtype), torch.randn(2, 5, device=b_device or dev)]


def _bottleneck_args(dev, n=3, b2_shape=(2, 6), dtype=torch.float32):
    x, w1, b1, w2, _ = bottleneck_inputs(2, n, 8, 4, 6, torch.float32, dev)
    return [t.to(dtype) for t in (x, w1, b1, w2, torch.randn(b2_shape, device=dev))]


@pytest.mark.parametrize(
    "fn, make, message",
    [
        (grouped_linear, lambda d: _linear_args(d, w_shape=(3, 5, 8)), "weight must have shape"),
        (grouped_linear, lambda d: _linear_args(d, w_dtype=torch.float64), "share one dtype"),
        (grouped_linear, lambda d: _linear_args(d, b_device="meta"), "one device"),
        (grouped_linear, lambda d: _linear_args(d, x_shape=(3, 8)), "expected x \\[G, n, din\\]"),
        (grouped_bottleneck_mlp, lambda d: _bottleneck_args(d, n=17), "at most 16 tokens"),
        (grouped_bottleneck_mlp, lambda d: _bottleneck_args(d, b2_shape=(2, 7)), "b2 must have shape"),
        (grouped_bottleneck_mlp, lambda d: _bottleneck_args(d, dtype=torch.int32), "float32, float16 or bfloat16"),
    ],
    ids=["weight-groups", "dtypes", "devices", "x-rank", "too-many-tokens", "b2-shape", "int-inputs"],
)
def test_bad_input_raises_clear_error(fn, make, message, kernel_device):
    with pytest.raises(ValueError, match=message):
        fn(*make(kernel_device))


@pytest.mark.gpu
class TestGroupedMLPGPU:
    """bf16/fp32 numerics and speed against PyTorch at MaPLe-coupling and PMS shapes."""

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
    def test_numerics(self, dtype):
        check(grouped_linear, torch_grouped_linear, linear_inputs(12, 2, 512, 768, dtype, "cuda"), dtype, "coupling")
        for hidden in (128, 256):
            inputs = bottleneck_inputs(9, 2, 512, hidden, 768, dtype, "cuda")
            check(grouped_bottleneck_mlp, torch_bottleneck, inputs, dtype, f"PMS hidden {hidden}")

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
    def test_speed_vs_torch(self, dtype):
        from triton.testing import do_bench

        timings = {}
        coupling = linear_inputs(12, 2, 512, 768, dtype, "cuda")
        pms = bottleneck_inputs(9, 2, 512, 256, 768, dtype, "cuda")
        cases = (
            ("coupling 12x(2x512->768)", grouped_linear, torch_grouped_linear, coupling),
            ("PMS 9x(2x512->256->768)", grouped_bottleneck_mlp, torch_bottleneck, pms),
        )
        for label, fn, torch_fn, inputs in cases:
            leaves = [t.detach().requires_grad_(True) for t in inputs]
            for name, f in (("fastprompt", fn), ("torch", torch_fn)):
                timings[f"{label} {name} fwd"] = do_bench(lambda: f(*inputs))
                out = f(*leaves)
                dy = torch.randn_like(out)
                backward = lambda: out.backward(dy, retain_graph=True)  # noqa: E731
                timings[f"{label} {name} bwd"] = do_bench(backward, grad_to_none=leaves)
        print(f"\ngrouped MLPs {dtype}: " + ", ".join(f"{k} {v * 1000:.1f} us" for k, v in timings.items()))
