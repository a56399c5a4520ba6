"""Dense attention (fastprompt.ops.attention): every backend that runs here against a float64
reference, forward and dq/dk/dv, on the model's awkward lengths; poisoned allocations, opcheck,
torch.compile, bad inputs, and backend dispatch (explain, order, explicit requests, xformers
detection). Device and dtypes come from kernel_targets: on CPU the Triton kernels run in the
interpreter in fp32; on a GPU every case runs compiled on CUDA in bf16 and fp16.

Tolerance (DESIGN.md §4): a backend's max error against float64 must be within twice the error
plain PyTorch makes at the same dtype, plus a few ulps of the result's magnitude.
"""

import math

import pytest
import torch

from fastprompt.ops import backends
from fastprompt.ops.attention import attention
from attention_references import reference_attention
from kernel_targets import ATTENTION_DTYPE, ATTENTION_DTYPES, DEVICE, dtype_params

BACKENDS = ["triton", "sdpa", "eager"]  # triton: the interpreter on CPU, compiled on a GPU
DTYPES = dtype_params(ATTENTION_DTYPES)


def assert_within_torch_error(name, actual, ref64, torch_lowp, reduction_len):
    """``actual``'s max error vs float64 is at most twice plain torch's at the same dtype, plus
    the rounding of the output to its dtype (2 ulps of the largest value) and an fp32
    accumulation floor: ``reduction_len`` terms of a head_dim-long fp32 dot product of O(1)
    inputs carry ~eps32 * sqrt(head_dim * reduction_len) of noise. The floor matters where the
    exact result is 0 and torch is exact by construction (one key: dq = p * (dO.v - rowsum(dO * O))
    = 0, which the kernel evaluates in another order); elsewhere twice torch's error dominates."""
    err = (actual.double() - ref64).abs().max().item() if actual.numel() else 0.0
    torch_err = (torch_lowp.double() - ref64).abs().max().item() if actual.numel() else 0.0
    magnitude = ref64.abs().max().item() if actual.numel() else 0.0
    rounding = 2 * torch.finfo(actual.dtype).eps * magnitude
    accumulation = torch.finfo(torch.float32).eps * math.sqrt(actual.shape[-1] * reduction_len)
    bound = 2 * torch_err + rounding + accumulation
    print(f"{name}: max err {err:.3g}, plain torch {torch_err:.3g}, bound {bound:.3g}")
    assert math.isfinite(err) and err <= bound, f"{name}: error {err:.3g} above {bound:.3g}"


def run_and_check(backend, B, LQ, LK, H, D, causal, dtype, scale=None, call=None):
    """Output and dq/dk/dv of ``call`` (default: ``attention`` with ``backend``) on the kernel
    device in ``dtype``, each within the rule above against float64."""
    q, k, v = (torch.randn(B, L, H, D, device=DEVICE, dtype=dtype) for L in (LQ, LK, LK))
    grad = torch.randn(B, LQ, H, D, device=DEVICE, dtype=dtype)
    if call is None:
        def call(a, b, c):
            return attention(a, b, c, causal=causal, scale=scale, backend=backend)
    ref_scale = 1 / math.sqrt(D) if scale is None else scale

    def forward_backward(fn, cast):
        leaves = [t.detach().to(cast).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(grad.to(cast))
        return [out.detach()] + [t.grad for t in leaves]

    got = forward_backward(call, dtype)
    ref = forward_backward(lambda a, b, c: reference_attention(a, b, c, causal, ref_scale), torch.float64)
    low = forward_backward(lambda a, b, c: reference_attention(a, b, c, causal, ref_scale), dtype)
    assert got[0].shape == (B, LQ, H, D) and got[0].dtype == dtype
    for name, a, r, lp in zip(("out", "dq", "dk", "dv"), got, ref, low):
        assert_within_torch_error(f"{backend} {name}", a, r, lp, max(LQ, LK))


# (batch, Lq, Lk, heads, causal): single tokens, text (77, causal), vision 197..210 with prompt
# tokens, VAIPL-like cross attention (class queries x image keys), odd batch sizes.
SHAPES = [
    (1, 1, 1, 1, False),
    (3, 77, 77, 1, True),
    (1, 197, 197, 1, False),
    (1, 199, 199, 2, False),
    (1, 206, 206, 1, True),
    (1, 210, 210, 1, False),
    (3, 37, 199, 1, False),
    (1, 77, 1, 2, False),
    (1, 1, 199, 1, False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,LQ,LK,H,causal", SHAPES)
def test_matches_float64_reference(backend, B, LQ, LK, H, causal, dtype):
    run_and_check(backend, B, LQ, LK, H, 64, causal, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [80, 128])
def test_triton_other_head_dims(D, dtype):
    run_and_check("triton", 2, 77, 77, 1, D, True, dtype)
    run_and_check("triton", 1, 33, 70, 1, D, False, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_writes_every_output(poison, dtype):
    run_and_check("triton", 3, 37, 71, 2, 64, False, dtype)
    run_and_check("triton", 1, 71, 71, 1, 64, True, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_accepts_strided_views(dtype):
    # q, k, v as slices of a fused qkv projection [B, L, 3 * H * D] (open_clip's in_proj output).
    B, L, H, D = 2, 50, 2, 64
    qkv = torch.randn(B, L, 3 * H * D, device=DEVICE, dtype=dtype)
    q, k, v = (t.view(B, L, H, D) for t in qkv.split(H * D, dim=-1))
    assert not q.is_contiguous()
    out = attention(q, k, v, backend="triton")
    ref = reference_attention(q.double(), k.double(), v.double(), False, 1 / math.sqrt(D))
    assert_within_torch_error("strided out", out, ref, reference_attention(q, k, v, False, 1 / math.sqrt(D)), L)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_scale(backend, dtype):
    run_and_check(backend, 1, 20, 20, 1, 64, False, dtype, scale=0.3)


def test_opcheck():
    q, k, v = (torch.randn(1, 19, 2, 64, device=DEVICE, dtype=ATTENTION_DTYPE, requires_grad=True)
               for _ in range(3))
    torch.library.opcheck(torch.ops.fastprompt.attention_fwd.default, (q, k, v, True, 0.125))
    out, lse2 = torch.ops.fastprompt.attention_fwd(q.detach(), k.detach(), v.detach(), True, 0.125)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse2, True, 0.125)
    torch.library.opcheck(torch.ops.fastprompt.attention_bwd.default, args)


def test_torch_compile_fullgraph():
    # Traced whole (one registered op forward, one backward), then held to the same float64 rule.
    compiled = torch.compile(lambda a, b, c: attention(a, b, c, causal=True, backend="triton"),
                             backend="aot_eager", fullgraph=True)
    run_and_check("triton", 1, 21, 21, 1, 64, True, ATTENTION_DTYPE, call=compiled)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    q = torch.randn(2, 10, 2, 64)
    with pytest.raises(TypeError, match="k has dtype torch.float64 but q has torch.float32"):
        attention(q, q.double(), q)
    with pytest.raises(ValueError, match="k is on meta but q is on cpu"):
        attention(q, q.to("meta"), q)
    with pytest.raises(ValueError, match=r"must be \[batch, seq, heads, head_dim\]"):
        attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="must agree on batch, heads and head_dim"):
        attention(q, torch.randn(2, 10, 3, 64), torch.randn(2, 10, 3, 64))
    with pytest.raises(ValueError, match="k and v must have one shape"):
        attention(q, q, torch.randn(2, 11, 2, 64))
    with pytest.raises(ValueError, match="causal attention needs as many queries as keys"):
        attention(q, torch.randn(2, 12, 2, 64), torch.randn(2, 12, 2, 64), causal=True)
    with pytest.raises(TypeError, match="floating-point"):
        attention(q.long(), q.long(), q.long())
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        attention(q, q, q, backend="flash")
    with pytest.raises(ValueError, match="scale must be a finite number"):
        attention(q, q, q, scale=float("inf"))


def test_unsupported_head_dim_names_the_reason():
    q = torch.randn(1, 10, 1, 48, device=DEVICE, dtype=ATTENTION_DTYPE)
    with pytest.raises(backends.BackendNotSupportedError, match=r"'triton' cannot run .*head_dim 48 is not supported"):
        attention(q, q, q, backend="triton")
    # auto on CPU takes sdpa, which has no head-dim limit
    q = torch.randn(1, 10, 1, 48)
    torch.testing.assert_close(attention(q, q, q), attention(q, q, q, backend="eager"))


def test_kernel_launcher_rejects_bad_inputs():
    from fastprompt.kernels.attention import attention_forward

    def randn(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=ATTENTION_DTYPE)

    q = randn(1, 8, 1, 64)
    with pytest.raises(ValueError, match="head_dim 96 is not supported"):
        attention_forward(randn(1, 8, 1, 96), randn(1, 8, 1, 96), randn(1, 8, 1, 96), causal=False, scale=0.1)
    with pytest.raises(TypeError, match="dtype torch.float64 is not supported"):
        attention_forward(q.double(), q.double(), q.double(), causal=False, scale=0.1)
    with pytest.raises(ValueError, match="contiguous last"):
        attention_forward(q, q, randn(1, 8, 1, 128)[..., ::2], causal=False, scale=0.1)


@pytest.mark.gpu
def test_kernel_launcher_refuses_float32_on_a_gpu():
    # Compiled kernels take fp16/bf16 only; fp32 is the interpreter's (CPU tests) and sdpa's on a GPU.
    from fastprompt.kernels.attention import attention_forward

    q = torch.randn(1, 8, 1, 64, device="cuda")
    with pytest.raises(TypeError, match="float32 only under the interpreter"):
        attention_forward(q, q, q, causal=False, scale=0.1)


# ----------------------------------------------------------------------------------------------
# Backend dispatch
# ----------------------------------------------------------------------------------------------


def test_declared_head_dims_match_the_kernels():
    from fastprompt.kernels import attention as kernels

    assert backends.get_backend("triton").head_dims == kernels.SUPPORTED_HEAD_DIMS


def test_auto_on_cpu_is_sdpa_and_explains_itself():
    choice = backends.explain_backend("attention", device="cpu", dtype=torch.float32, head_dim=64)
    assert choice.chosen == "sdpa"
    assert "backend='auto' -> sdpa" in str(choice)


def test_auto_never_picks_the_interpreter(monkeypatch):
    monkeypatch.setattr(backends, "_order", {})
    backends.set_backend_order(["triton", "eager"], device_type="cpu")
    try:
        choice = backends.explain_backend("prefix_varlen_attention", device="cpu", dtype=torch.float32,
                                          head_dim=64, causal=True)
        assert choice.chosen == "eager"
        (triton_reasons,) = [r for name, r in choice.considered if name == "triton"]
        assert any("interpreter" in r for r in triton_reasons)
        # asked for explicitly, the interpreter runs
        explicit = backends.explain_backend("attention", device="cpu", dtype=torch.float32, head_dim=64,
                                            backend="triton")
        assert explicit.chosen == ("triton" if backends.triton_interpreted() else None)
    finally:
        backends.set_backend_order(None, device_type="cpu")
    assert backends.get_backend_order("attention", "cpu") == ("sdpa", "eager")


def test_backend_order_is_settable_and_validated():
    backends.set_backend_order(["eager", "sdpa"], op="attention", device_type="cpu")
    try:
        assert backends.explain_backend("attention", device="cpu", dtype=torch.float32,
                                        head_dim=64).chosen == "eager"
        assert backends.explain_backend("prefix_varlen_attention", device="cpu", dtype=torch.float32,
                                        head_dim=64).chosen == "sdpa"
    finally:
        backends.set_backend_order(None, op="attention", device_type="cpu")
    with pytest.raises(ValueError, match="unknown attention backend"):
        backends.set_backend_order(["cudnn"])
    with pytest.raises(ValueError, match="twice"):
        backends.set_backend_order(["sdpa", "sdpa"])


def test_explicit_backend_that_cannot_run_raises_with_reasons():
    q = torch.randn(1, 4, 1, 64)
    with pytest.raises(backends.BackendNotSupportedError, match="'xformers' cannot run .*runs on cuda only"):
        attention(q, q, q, backend="xformers")
    reasons = backends.get_backend("sdpa").not_supported_reasons(
        backends.AttentionRequest("attention", "cpu", torch.float16, 64))
    assert reasons == []  # sdpa runs half precision on CPU too
    with pytest.raises(backends.BackendNotSupportedError, match="no attention backend can run"):
        attention(q.to(torch.float8_e4m3fn), q.to(torch.float8_e4m3fn), q.to(torch.float8_e4m3fn))
