"""fastprompt.ops.mlp (linear_act, frozen_mlp) against a float64 reference.

Rule (DESIGN.md §4): the kernel's max error against float64 is at most twice the error of the
same computation in plain PyTorch at the test dtype, plus a small atol. The checks use small
matrices whose sizes are not multiples of the tiles; on CPU the kernels run under the Triton
interpreter in fp32, on a GPU compiled in bf16, fp16 and fp32 (kernel_targets). The GPU class
repeats the checks at ViT-B/16 shapes and times the kernels against PyTorch.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from fastprompt.kernels import linear_act as la_kernel
from fastprompt.ops.mlp import ACTIVATIONS, GEMMS, frozen_mlp, linear_act
from kernel_numerics import TORCH_ACTIVATIONS, assert_within_torch_error, OpRecorder
from kernel_targets import MATRIX_DTYPE, MATRIX_DTYPES, dtype_params

DTYPES = dtype_params(MATRIX_DTYPES)




def torch_mlp(x, fc_w, fc_b, proj_w, proj_b, activation):
    return F.linear(TORCH_ACTIVATIONS[activation](F.linear(x, fc_w, fc_b)), proj_w, proj_b)


def torch_linear_act(x, weight, bias, activation):
    return TORCH_ACTIVATIONS[activation](F.linear(x, weight, bias))


def make_linear(n, k, dtype, device):
    # Scaled so pre-activations are O(1): the activations' curved parts are exercised.
    weight = (torch.randn(n, k, device=device) / math.sqrt(k)).to(dtype)
    bias = (0.5 * torch.randn(n, device=device)).to(dtype)
    return weight, bias


def outputs_and_gradients(fn, inputs, trainable, dy):
    """fn(*inputs) and the gradients of <output, dy> for the inputs whose index is trainable."""
    leaves = [t.detach().requires_grad_(i in trainable) for i, t in enumerate(inputs)]
    out = fn(*leaves)
    out.backward(dy.to(out.dtype))
    found = {"out": out.detach()}
    for i, leaf in enumerate(leaves):
        if i in trainable:
            found[f"grad{i}"] = leaf.grad
        else:
            assert leaf.grad is None
    return found


def check(fn, torch_fn, inputs, trainable, dtype, label):
    """fn vs float64 torch_fn, against torch_fn at the test dtype, output and gradients."""
    with torch.no_grad():
        dy = torch.randn_like(torch_fn(*inputs).float())
    got = outputs_and_gradients(fn, inputs, trainable, dy)
    low = outputs_and_gradients(torch_fn, inputs, trainable, dy)
    ref = outputs_and_gradients(torch_fn, [t.double() for t in inputs], trainable, dy)
    for name in got:
        assert_within_torch_error(f"{label} {name}", got[name], ref[name], low[name], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_linear_act_forward_and_all_gradients(activation, dtype, kernel_device, poison):
    m, k, n = 77, 90, 200  # none a multiple of the tiles (fp32 32 x 64 x 16, the 16-bit ones larger)
    x = torch.randn(m, k, device=kernel_device).to(dtype)
    weight, bias = make_linear(n, k, dtype, kernel_device)
    check(
        lambda *a: linear_act(*a, activation), lambda *a: torch_linear_act(*a, activation),
        [x, weight, bias], {0, 1, 2}, dtype, f"linear_act {activation}",
    )  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 48), (3, 77, 40)], ids=["1x48", "3x77x40"])
def test_linear_act_leading_shapes_input_gradient_only(shape, dtype, kernel_device, poison):
    x = torch.randn(shape, device=kernel_device).to(dtype)
    weight, bias = make_linear(70, shape[-1], dtype, kernel_device)
    check(
        lambda *a: linear_act(*a, "quick_gelu"), lambda *a: torch_linear_act(*a, "quick_gelu"),
        [x, weight, bias], {0}, dtype, f"linear_act {list(shape)}",
    )  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize(
    "rows, activation", [(1, "gelu"), (77, "quick_gelu"), (199, "gelu_tanh"), (13, "relu"), (6, "none")]
)
def test_frozen_mlp_forward_and_input_gradient(rows, activation, gemm, dtype, kernel_device, poison):
    d, hidden = 40, 160  # the CLIP MLP's 4x expansion, at interpreter-friendly widths
    x = torch.randn(rows, d, device=kernel_device).to(dtype)
    fc_w, fc_b = make_linear(hidden, d, dtype, kernel_device)
    proj_w, proj_b = make_linear(d, hidden, dtype, kernel_device)
    check(
        lambda *a: frozen_mlp(*a, activation, gemm), lambda *a: torch_mlp(*a, activation),
        [x, fc_w, fc_b, proj_w, proj_b], {0}, dtype, f"frozen_mlp {gemm} {rows} {activation}",
    )  # fmt: skip


@pytest.mark.parametrize("gemm", GEMMS)
def test_frozen_mlp_saves_only_its_input(gemm, kernel_device):
    x = torch.randn(2, 9, 40, device=kernel_device).to(MATRIX_DTYPE).requires_grad_()
    fc_w, fc_b = make_linear(160, 40, MATRIX_DTYPE, kernel_device)
    proj_w, proj_b = make_linear(40, 160, MATRIX_DTYPE, kernel_device)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = frozen_mlp(x, fc_w, fc_b, proj_w, proj_b, "gelu", gemm)
    allowed = {t.data_ptr() for t in (x, fc_w, fc_b, proj_w, proj_b)}
    assert saved, "nothing saved for backward"
    assert all(t.data_ptr() in allowed for t in saved), [tuple(t.shape) for t in saved]
    assert not any(t.shape[-1] == 160 and t.dim() == x.dim() for t in saved), "the hidden activation was saved"
    y.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("gemm", GEMMS)
def test_frozen_weights_compute_no_weight_gradients(gemm, kernel_device):
    x = torch.randn(10, 40, device=kernel_device).to(MATRIX_DTYPE).requires_grad_()
    fc_w, fc_b = make_linear(160, 40, MATRIX_DTYPE, kernel_device)
    proj_w, proj_b = make_linear(40, 160, MATRIX_DTYPE, kernel_device)
    y = frozen_mlp(x, fc_w, fc_b, proj_w, proj_b, "quick_gelu", gemm)
    with OpRecorder() as ops:
        y.backward(torch.randn_like(y))
    assert "fastprompt::linear_act_grad" in ops.names  # the recompute GEMM ran (one op, whichever the plan)
    # dh = dy @ proj_w and dx = d_pre @ fc_w: two matrix products, none for a weight gradient.
    products = [n for n in ops.names if n in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul")]
    assert len(products) == 2, ops.names
    assert all(p.grad is None for p in (fc_w, fc_b, proj_w, proj_b))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trainable", [{1, 2, 3, 4}, {3}, {2}], ids=["all", "proj_w", "fc_b"])
def test_unfrozen_weights_fall_back_to_a_path_with_weight_gradients(trainable, dtype, kernel_device, poison):
    x = torch.randn(21, 40, device=kernel_device).to(dtype)
    fc_w, fc_b = make_linear(96, 40, dtype, kernel_device)
    proj_w, proj_b = make_linear(40, 96, dtype, kernel_device)
    check(
        lambda *a: frozen_mlp(*a, "gelu"), lambda *a: torch_mlp(*a, "gelu"),
        [x, fc_w, fc_b, proj_w, proj_b], {0} | trainable, dtype, f"fallback {sorted(trainable)}",
    )  # fmt: skip


def test_frozen_mlp_op_refuses_weight_gradients(kernel_device):
    x = torch.randn(3, 16, device=kernel_device).to(MATRIX_DTYPE).requires_grad_()
    fc_w, fc_b = make_linear(32, 16, MATRIX_DTYPE, kernel_device)
    proj_w, proj_b = make_linear(16, 32, MATRIX_DTYPE, kernel_device)
    fc_w.requires_grad_(True)
    y = torch.ops.fastprompt.frozen_mlp(x, fc_w, fc_b, proj_w, proj_b, "gelu")
    with pytest.raises(RuntimeError, match="computes no weight gradients"):
        y.sum().backward()


@pytest.mark.parametrize("dtype", DTYPES)
def test_launcher_writes_every_output_element(dtype, kernel_device, poison):
    x = torch.randn(65, 33, device=kernel_device).to(dtype)
    weight, bias = make_linear(129, 33, dtype, kernel_device)
    out = la_kernel.linear_act_forward(x, weight, bias, "none")
    x64, w64, b64 = x.double(), weight.double(), bias.double()
    assert_within_torch_error("forward", out, F.linear(x64, w64, b64), F.linear(x, weight, bias), dtype)
    grad = torch.randn(65, 129, device=kernel_device).to(dtype)
    d_pre = la_kernel.linear_act_grad(x, weight, bias, grad, "relu")
    assert_within_torch_error("relu gradient", d_pre, grad.double() * (F.linear(x64, w64, b64) > 0),
                              grad * (F.linear(x, weight, bias) > 0), dtype)


@pytest.mark.parametrize("gemm", GEMMS)
def test_opcheck(gemm, kernel_device):
    x = torch.randn(2, 5, 24, device=kernel_device).to(MATRIX_DTYPE).requires_grad_()
    fc_w, fc_b = make_linear(40, 24, MATRIX_DTYPE, kernel_device)
    proj_w, proj_b = make_linear(20, 40, MATRIX_DTYPE, kernel_device)
    torch.library.opcheck(torch.ops.fastprompt.frozen_mlp, (x, fc_w, fc_b, proj_w, proj_b, "gelu_tanh", gemm))
    trained = (x, fc_w.clone().requires_grad_(True), fc_b.clone().requires_grad_(True), "gelu")
    torch.library.opcheck(torch.ops.fastprompt.linear_act, trained)
    grad = torch.randn(2, 5, 40, device=kernel_device).to(MATRIX_DTYPE)
    torch.library.opcheck(torch.ops.fastprompt.linear_act_grad, (x.detach(), fc_w, fc_b, grad, "quick_gelu", gemm))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"activation": "silu"}, "activation must be one of"),
        ({"x": lambda dev: torch.randn(4, 9, device=dev)}, "shapes do not match"),
        ({"weight": lambda dev: torch.randn(12, 8, device=dev).double()}, "must share a dtype"),
        ({"x": lambda dev: torch.randint(0, 5, (4, 8), device=dev)}, "float32, float16 or bfloat16"),
        ({"bias": lambda dev: torch.randn(12, device="meta")}, "one device"),
    ],
    ids=["activation", "shapes", "dtypes", "int-input", "devices"],
)
def test_bad_input_raises_clear_error(change, message, kernel_device):
    args = {
        "x": torch.randn(4, 8, device=kernel_device),
        "weight": torch.randn(12, 8, device=kernel_device),
        "bias": torch.randn(12, device=kernel_device),
        "activation": "gelu",
    }
    args |= {k: (v(kernel_device) if callable(v) else v) for k, v in change.items()}
    with pytest.raises(ValueError, match=message):
        linear_act(args["x"], args["weight"], args["bias"], args["activation"])


def test_frozen_mlp_bad_projection_raises(kernel_device):
    x = torch.randn(4, 8, device=kernel_device)
    fc_w, fc_b = make_linear(16, 8, torch.float32, kernel_device)
    with pytest.raises(ValueError, match="proj_w must be"):
        frozen_mlp(x, fc_w, fc_b, torch.randn(8, 15, device=kernel_device), torch.randn(8, device=kernel_device))


@pytest.mark.parametrize("gemm", GEMMS)
def test_frozen_mlp_keeps_its_dtype_under_an_autocast_of_another(gemm, kernel_device):
    """The op's contract (and its fake): the result in x's dtype. A caller's autocast to another dtype must not
    reach the op's cuBLAS GEMMs (the Triton GEMM is out of its reach anyway): the same values as without it."""
    x = torch.randn(6, 40, device=kernel_device, dtype=torch.float32).requires_grad_()
    fc_w, fc_b = make_linear(160, 40, torch.float32, kernel_device)
    proj_w, proj_b = make_linear(40, 160, torch.float32, kernel_device)
    args = (fc_w, fc_b, proj_w, proj_b, "quick_gelu", gemm)
    plain = frozen_mlp(x, *args)
    (plain_grad,) = torch.autograd.grad(plain.square().sum(), x)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        cast = frozen_mlp(x, *args)
        (cast_grad,) = torch.autograd.grad(cast.square().sum(), x)
    assert cast.dtype == torch.float32 and torch.equal(cast, plain)
    assert cast_grad.dtype == torch.float32 and torch.equal(cast_grad, plain_grad)


@pytest.mark.parametrize("trained", [False, True], ids=["frozen", "trained"])
def test_frozen_mlp_unknown_gemm_raises(trained, kernel_device):
    x = torch.randn(4, 8, device=kernel_device)
    fc_w, fc_b = make_linear(16, 8, torch.float32, kernel_device)
    proj_w, proj_b = make_linear(8, 16, torch.float32, kernel_device)
    fc_w.requires_grad_(trained)
    with pytest.raises(ValueError, match="gemm must be one of"):
        frozen_mlp(x, fc_w, fc_b, proj_w, proj_b, "gelu", "cutlass")


@pytest.mark.gpu
class TestMLPGPU:
    """bf16 numerics and speed against PyTorch at ViT-B/16 shapes."""

    @pytest.mark.parametrize("activation", ACTIVATIONS)
    @pytest.mark.parametrize("rows", [1, 197, 4 * 199])
    def test_bf16(self, rows, activation):
        x = torch.randn(rows, 768, device="cuda", dtype=torch.bfloat16)
        fc_w, fc_b = make_linear(3072, 768, torch.bfloat16, "cuda")
        proj_w, proj_b = make_linear(768, 3072, torch.bfloat16, "cuda")
        for gemm in GEMMS:
            check(
                lambda *a: frozen_mlp(*a, activation, gemm), lambda *a: torch_mlp(*a, activation),
                [x, fc_w, fc_b, proj_w, proj_b], {0}, torch.bfloat16, f"frozen_mlp {gemm} bf16 {rows} {activation}",
            )  # fmt: skip
        check(
            lambda *a: linear_act(*a, activation), lambda *a: torch_linear_act(*a, activation),
            [x, fc_w, fc_b], {0, 1, 2}, torch.bfloat16, f"linear_act bf16 {rows} {activation}",
        )  # fmt: skip

    def test_fp16_and_fp32(self):
        for dtype in (torch.float16, torch.float32):
            x = torch.randn(199, 512, device="cuda", dtype=dtype)
            fc_w, fc_b = make_linear(2048, 512, dtype, "cuda")
            proj_w, proj_b = make_linear(512, 2048, dtype, "cuda")
            for gemm in GEMMS:
                check(
                    lambda *a: frozen_mlp(*a, "gelu", gemm), lambda *a: torch_mlp(*a, "gelu"),
                    [x, fc_w, fc_b, proj_w, proj_b], {0}, dtype, f"frozen_mlp {gemm} {dtype}",
                )  # fmt: skip

    @pytest.mark.parametrize("rows, d", [(32 * 199, 768), (1000 * 9, 512)])
    def test_speed_vs_torch(self, rows, d):
        from triton.testing import do_bench

        x = torch.randn(rows, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        fc_w, fc_b = make_linear(4 * d, d, torch.bfloat16, "cuda")
        proj_w, proj_b = make_linear(d, 4 * d, torch.bfloat16, "cuda")
        args = (fc_w, fc_b, proj_w, proj_b, "quick_gelu")
        dy = torch.randn(rows, d, device="cuda", dtype=torch.bfloat16)
        timings = {}
        plans = [(f"fastprompt {gemm}", lambda *a, g=gemm: frozen_mlp(*a, g)) for gemm in GEMMS]
        for name, fn in (*plans, ("torch", torch_mlp)):
            timings[f"{name} fwd"] = do_bench(lambda: fn(x.detach(), *args))
            y = fn(x, *args)
            timings[f"{name} bwd"] = do_bench(lambda: y.backward(dy, retain_graph=True), grad_to_none=[x])
        timings["linear_act fwd"] = do_bench(lambda: linear_act(x.detach(), fc_w, fc_b, "quick_gelu"))
        timings["torch linear+act fwd"] = do_bench(lambda: torch_linear_act(x.detach(), fc_w, fc_b, "quick_gelu"))
        print(f"\nMLP bf16 rows={rows} d={d}: " + ", ".join(f"{k} {v * 1000:.1f} us" for k, v in timings.items()))
