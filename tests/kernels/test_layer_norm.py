"""fastprompt.ops.layer_norm against a float64 reference.

Rule (DESIGN.md §4): the kernel's max error against float64 is at most twice the error of the
same computation in plain PyTorch at the test dtype, plus a small atol. On CPU the kernels run
under the Triton interpreter in fp32, on a GPU compiled in bf16, fp16 and fp32 (kernel_targets);
the GPU class repeats the checks at ViT-B/16 shapes (and with fp32 weights) and times the
kernels against PyTorch.
"""

import importlib
import sys

import pytest
import torch
import torch.nn.functional as F

from fastprompt.kernels import layer_norm as ln_kernel
from fastprompt.ops.layer_norm import layer_norm
from kernel_numerics import assert_within_torch_error, OpRecorder
from kernel_targets import MATRIX_DTYPE, MATRIX_DTYPES, dtype_params

DTYPES = dtype_params(MATRIX_DTYPES)


def reference(x, weight, bias, eps, residual=None, compute=torch.float32):
    """LayerNorm(x [+ residual]) as open_clip's LayerNormFp32 computes it (compute=float32),
    or exactly (float64 inputs, compute=float64). Returns (y, x + residual or None)."""
    s = x if residual is None else x + residual
    y = F.layer_norm(s.to(compute), s.shape[-1:], weight.to(compute), bias.to(compute), eps).to(x.dtype)
    return y, (None if residual is None else s)


def make_inputs(shape, dtype, device, weight_dtype=None):
    d = shape[-1]
    x = (torch.randn(shape, device=device) * 2 + 0.5).to(dtype)
    weight = (1 + 0.3 * torch.randn(d, device=device)).to(weight_dtype or dtype)
    bias = (0.2 * torch.randn(d, device=device)).to(weight_dtype or dtype)
    return x, weight, bias


def outputs_and_gradients(fn, x, weight, bias, residual, dy, d_sum, train_params):
    """Run fn(x, weight, bias, residual) -> (y, s or None) and backpropagate dy (and d_sum)."""
    x = x.detach().requires_grad_(True)
    weight = weight.detach().requires_grad_(train_params)
    bias = bias.detach().requires_grad_(train_params)
    residual = None if residual is None else residual.detach().requires_grad_(True)
    y, s = fn(x, weight, bias, residual)
    if s is None:
        y.backward(dy.to(y.dtype))
    else:
        torch.autograd.backward([y, s], [dy.to(y.dtype), d_sum.to(s.dtype)])
    found = {"y": y.detach(), "dx": x.grad}
    if s is not None:
        found |= {"sum": s.detach(), "dresidual": residual.grad}
    if train_params:
        found |= {"dweight": weight.grad, "dbias": bias.grad}
    else:
        assert weight.grad is None and bias.grad is None
    return found


def fastprompt_layer_norm(x, weight, bias, residual):
    out = layer_norm(x, weight, bias, 1e-5, residual=residual)
    return (out, None) if residual is None else out


def check_forward_backward(shape, dtype, device, weight_dtype=None, train_params=False, residual=False):
    """Forward and every requested gradient vs float64, against PyTorch at the same dtype."""
    x, weight, bias = make_inputs(shape, dtype, device, weight_dtype)
    r = torch.randn(shape, device=device).to(dtype) if residual else None
    dy = torch.randn(shape, device=device)
    d_sum = torch.randn(shape, device=device) if residual else None
    args = (dy, d_sum, train_params)
    got = outputs_and_gradients(fastprompt_layer_norm, x, weight, bias, r, *args)
    low = outputs_and_gradients(lambda *a: reference(*a[:3], 1e-5, a[3]), x, weight, bias, r, *args)
    r64 = None if r is None else r.double()

    def exact(*a):
        return reference(*a[:3], 1e-5, a[3], compute=torch.float64)

    ref = outputs_and_gradients(exact, x.double(), weight.double(), bias.double(), r64, *args)
    for name in got:
        assert_within_torch_error(f"{name} {list(shape)} {dtype}", got[name], ref[name], low[name], dtype)


SHAPES = [(1, 768), (3, 200), (77, 512), (2, 3, 97)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_input_gradient_frozen_weights(shape, dtype, kernel_device, poison):
    check_forward_backward(shape, dtype, kernel_device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(199, 768), (5, 1000)], ids=lambda s: "x".join(map(str, s)))
def test_trainable_weight_and_bias_gradients(shape, dtype, kernel_device, poison):
    check_forward_backward(shape, dtype, kernel_device, train_params=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape, train_params", [((206, 768), False), ((3, 200), True)], ids=["206x768-frozen", "3x200-trainable"]
)
def test_fused_residual_add(shape, train_params, dtype, kernel_device, poison):
    check_forward_backward(shape, dtype, kernel_device, train_params=train_params, residual=True)


# --- a prompt splice fused into the residual add (fastprompt.ops.layer_norm.layer_norm_spliced) -------------------


def spliced_reference(x, residual, new, weight, bias, period, start, compute=torch.float32):
    """The unfused computation: x + residual, then rows [start, start + n) of each of the first G groups of
    `period` rows replaced by new [G, n, d] with a cat, then LayerNorm. Returns (y, the spliced sum)."""
    d = x.shape[-1]
    rows = (x + residual).reshape(-1, d)
    groups, n = new.shape[:2]
    head = rows[: groups * period].view(groups, period, d)
    head = torch.cat([head[:, :start], new, head[:, start + n :]], 1).reshape(-1, d)
    s = torch.cat([head, rows[groups * period :]]).view(x.shape)
    y = F.layer_norm(s.to(compute), (d,), weight.to(compute), bias.to(compute), 1e-5).to(x.dtype)
    return y, s


# (x shape, groups, period, start, n, one shared set): the vision tower's [B, L, d] with per-image prompts or one
# set for all images; the packed text stream's [G * P + T, d] with prefix groups and suffix rows below them.
SPLICES = {
    "vision_per_image": ((3, 13, 200), 3, 13, 1, 4, False),
    "vision_shared": ((3, 13, 200), 3, 13, 1, 4, True),
    "text_one_group": ((40, 512), 1, 9, 1, 2, False),
    "text_groups_shared": ((40, 768), 3, 7, 2, 3, True),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case, train_params", [(case, False) for case in SPLICES] + [("vision_per_image", True)])
def test_splice_fused_into_the_residual_add(case, train_params, dtype, kernel_device, poison):
    from fastprompt.ops.layer_norm import layer_norm_spliced

    shape, groups, period, start, n, shared = SPLICES[case]
    d = shape[-1]
    x, weight, bias = make_inputs(shape, dtype, kernel_device)
    residual = torch.randn(shape, device=kernel_device).to(dtype)
    new = torch.randn(1 if shared else groups, n, d, device=kernel_device).to(dtype)
    dy, d_sum = torch.randn(shape, device=kernel_device), torch.randn(shape, device=kernel_device)

    def run(fn, cast, compute=None):
        leaves = [t.detach().to(cast).requires_grad_(True) for t in (x, residual, new)]
        params = [t.detach().to(cast).requires_grad_(train_params) for t in (weight, bias)]
        rows = leaves[2].expand(groups, -1, -1) if shared else leaves[2]
        extra = {} if compute is None else {"compute": compute}
        y, s = fn(leaves[0], leaves[1], rows, *params, period, start, **extra)
        torch.autograd.backward([y, s], [dy.to(cast), d_sum.to(cast)])
        found = {"y": y.detach(), "sum": s.detach(), "dx": leaves[0].grad, "dresidual": leaves[1].grad,
                 "dnew": leaves[2].grad}
        if train_params:
            found |= {"dweight": params[0].grad, "dbias": params[1].grad}
        return found

    got = run(lambda *a: layer_norm_spliced(*a[:5], 1e-5, *a[5:]), dtype)
    low = run(spliced_reference, dtype)
    ref = run(spliced_reference, torch.float64, compute=torch.float64)
    for name in got:
        assert got[name].dtype == dtype
        assert_within_torch_error(f"{case} {name} {dtype}", got[name], ref[name], low[name], dtype)
    # spliced rows send nothing to the stream they replaced
    flat = got["dx"].reshape(-1, d)[: groups * period].view(groups, period, d)
    assert not flat[:, start : start + n].any()


def test_splice_opcheck(kernel_device):
    x, weight, bias = make_inputs((2, 6, 40), MATRIX_DTYPE, kernel_device)
    r, new = torch.randn_like(x), torch.randn(2, 2, 40, device=kernel_device).to(x.dtype)
    leaves = [t.clone().requires_grad_() for t in (x, r, new)]
    torch.library.opcheck(torch.ops.fastprompt.layer_norm_residual_splice, (*leaves, weight, bias, 1e-5, 6, 1))
    mean, rstd = x.float().mean(-1), (x.float().var(-1, unbiased=False) + 1e-5).rsqrt()
    for d_sum in (torch.randn_like(x), None):
        torch.library.opcheck(torch.ops.fastprompt.layer_norm_splice_backward,
                              (torch.randn_like(x), x, weight, mean, rstd, d_sum, 2, 2, 6, 1, d_sum is not None))


def test_splice_errors_name_the_problem(kernel_device):
    from fastprompt.ops.layer_norm import layer_norm_spliced

    x, weight, bias = make_inputs((2, 6, 40), torch.float32, kernel_device)
    r = torch.randn_like(x)
    for new, period, start, text in [
        (torch.randn(2, 2, 41, device=kernel_device), 6, 1, "splice rows must be \\[groups, n, 40\\]"),
        (torch.randn(2, 2, 40, device=kernel_device), 6, 5, "does not fit"),
        (torch.randn(3, 2, 40, device=kernel_device), 6, 1, "does not fit"),
        (torch.randn(2, 2, 40, device=kernel_device).double(), 6, 1, "splice rows must be torch.float32"),
    ]:
        with pytest.raises(ValueError, match=text):
            layer_norm_spliced(x, r, new, weight, bias, 1e-5, period, start)


def test_frozen_weights_never_run_the_parameter_gradient_kernel(kernel_device):
    x, weight, bias = make_inputs((6, 200), MATRIX_DTYPE, kernel_device)
    x.requires_grad_(True)
    y = layer_norm(x, weight, bias)
    with OpRecorder() as frozen:
        y.backward(torch.randn_like(y))
    assert "fastprompt::layer_norm_backward" in frozen.names
    assert "fastprompt::layer_norm_backward_params" not in frozen.names
    assert weight.grad is None and bias.grad is None

    weight.requires_grad_(True)
    y = layer_norm(x, weight, bias)
    with OpRecorder() as trained:
        y.backward(torch.randn_like(y))
    assert "fastprompt::layer_norm_backward_params" in trained.names
    assert weight.grad is not None and bias.grad is None  # bias was never asked for


def test_parameter_gradients_are_deterministic(kernel_device):
    x, weight, bias = make_inputs((37, 300), MATRIX_DTYPE, kernel_device)
    y, _, mean, rstd = ln_kernel.layer_norm_forward(x, weight, bias, 1e-5)
    dy = torch.randn_like(y)
    first = ln_kernel.layer_norm_backward(dy, x, weight, mean, rstd, param_grads=True)
    second = ln_kernel.layer_norm_backward(dy, x, weight, mean, rstd, param_grads=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_launcher_writes_every_statistic(dtype, kernel_device, poison):
    # The statistics are fp32 whatever x's dtype (x's values are exact in float64), so fp32 tolerances hold.
    x, weight, bias = make_inputs((9, 130), dtype, kernel_device)
    y, s, mean, rstd = ln_kernel.layer_norm_forward(x, weight, bias, 1e-5)
    assert s is None and mean.dtype == rstd.dtype == torch.float32
    torch.testing.assert_close(mean, x.double().mean(-1).float())
    torch.testing.assert_close(rstd, (x.double().var(-1, unbiased=False) + 1e-5).rsqrt().float())


@pytest.mark.parametrize(
    "residual, train_params", [(False, True), (True, False)], ids=["plain-trainable", "residual-frozen"]
)
def test_opcheck(residual, train_params, kernel_device):
    x, weight, bias = make_inputs((2, 3, 40), MATRIX_DTYPE, kernel_device)
    x.requires_grad_(True)
    weight.requires_grad_(train_params), bias.requires_grad_(train_params)
    if residual:
        r = torch.randn_like(x, requires_grad=True)
        torch.library.opcheck(torch.ops.fastprompt.layer_norm_residual, (x, r, weight, bias, 1e-5))
    else:
        torch.library.opcheck(torch.ops.fastprompt.layer_norm, (x, weight, bias, 1e-5))


def test_opcheck_backward_ops(kernel_device):
    x, weight, _ = make_inputs((5, 40), MATRIX_DTYPE, kernel_device)
    mean, rstd = x.float().mean(-1), (x.float().var(-1, unbiased=False) + 1e-5).rsqrt()  # fp32 statistics
    dy, d_sum = torch.randn_like(x), torch.randn_like(x)
    for op in (torch.ops.fastprompt.layer_norm_backward, torch.ops.fastprompt.layer_norm_backward_params):
        torch.library.opcheck(op, (dy, x, weight, mean, rstd, d_sum))
        torch.library.opcheck(op, (dy, x, weight, mean, rstd, None))


def _ln_args(dev, x_dtype=torch.float32, d=8, weight=(8,), bias_dtype=None, weight_device=None):
    x = torch.randn(4, d, device=dev).to(x_dtype)
    w = torch.ones(weight, device=weight_device or dev).to(x_dtype)
    return x, w, torch.zeros(weight, device=dev).to(bias_dtype or x_dtype)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda dev: _ln_args(dev, x_dtype=torch.float64), "float32, float16 or bfloat16"),
        (lambda dev: _ln_args(dev, weight=(9,)), "weight must have shape \\[8\\]"),
        (lambda dev: _ln_args(dev, x_dtype=torch.float16, bias_dtype=torch.float32), "weight and bias must share"),
        (lambda dev: _ln_args(dev, weight_device="meta"), "one device"),
        (lambda dev: _ln_args(dev, d=4096, weight=(4096,)), "width must be in \\[1, 2048\\]"),
    ],
    ids=["float64-input", "weight-shape", "mixed-param-dtypes", "devices", "too-wide"],
)
def test_bad_input_raises_clear_error(make, message, kernel_device):
    x, weight, bias = make(kernel_device)
    with pytest.raises(ValueError, match=message):
        layer_norm(x, weight, bias)


def test_residual_shape_mismatch_raises(kernel_device):
    x, weight, bias = make_inputs((4, 8), torch.float32, kernel_device)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        layer_norm(x, weight, bias, residual=torch.randn(4, 9, device=kernel_device))


def test_import_without_triton_raises_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # what `import triton` meets where it is absent
    monkeypatch.delitem(sys.modules, "fastprompt.ops.layer_norm")
    with pytest.raises(ImportError, match="need the `triton` package"):
        importlib.import_module("fastprompt.ops.layer_norm")


@pytest.mark.gpu
class TestLayerNormGPU:
    """bf16 numerics (bf16 and fp32 weights) and speed against PyTorch at ViT-B/16 shapes."""

    @pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
    @pytest.mark.parametrize("shape", [(1, 768), (77, 512), (4, 199, 768), (206, 1000)])
    def test_bf16(self, shape, weight_dtype):
        check_forward_backward(shape, torch.bfloat16, "cuda", weight_dtype=weight_dtype)
        check_forward_backward(shape, torch.bfloat16, "cuda", weight_dtype=weight_dtype, train_params=True)
        check_forward_backward(shape, torch.bfloat16, "cuda", weight_dtype=weight_dtype, residual=True)

    def test_fp16(self):
        check_forward_backward((199, 768), torch.float16, "cuda", train_params=True, residual=True)

    @pytest.mark.parametrize("rows, d", [(32 * 199, 768), (1000 * 9, 512)])
    def test_speed_vs_torch(self, rows, d):
        from triton.testing import do_bench

        x, weight, bias = make_inputs((rows, d), torch.bfloat16, "cuda")
        r = torch.randn_like(x)
        dy = torch.randn_like(x)
        timings = {
            "fastprompt fwd": do_bench(lambda: layer_norm(x, weight, bias)),
            "torch fwd": do_bench(lambda: F.layer_norm(x, (d,), weight, bias)),
            "fastprompt residual fwd": do_bench(lambda: layer_norm(x, weight, bias, residual=r)),
            "torch residual fwd": do_bench(lambda: F.layer_norm(x + r, (d,), weight, bias)),
        }
        xg = x.detach().requires_grad_(True)
        y = layer_norm(xg, weight, bias)
        timings["fastprompt bwd (dx)"] = do_bench(lambda: y.backward(dy, retain_graph=True), grad_to_none=[xg])
        yt = F.layer_norm(xg, (d,), weight, bias)
        timings["torch bwd (dx)"] = do_bench(lambda: yt.backward(dy, retain_graph=True), grad_to_none=[xg])
        print(f"\nLayerNorm bf16 rows={rows} d={d}: " + ", ".join(f"{k} {v * 1000:.1f} us" for k, v in timings.items()))
