"""GPU tier for the attention ops: bf16/fp16 on CUDA against float64 with the
PyTorch-error rule, compiled Triton kernels at the benchmark shapes, determinism, memory (VAIPL
never materialises B x H x C x N probabilities), CUDA graph capture, torch.compile with Inductor,
and timings against the other backends (printed; run with ``-s`` to see them).

    pytest -m gpu tests/kernels/test_attention_gpu.py -s
"""

import math

import pytest
import torch

from fastprompt.ops import backends
from fastprompt.ops.attention import attention, prefix_varlen_attention
from attention_references import reference_attention, reference_prefix_attention

pytestmark = pytest.mark.gpu
DEVICE = "cuda"


def usable(backend, op="attention", dtype=torch.bfloat16, head_dim=64):
    reasons = backends.get_backend(backend).not_supported_reasons(
        backends.AttentionRequest(op, DEVICE, dtype, head_dim, op != "attention"))
    return not reasons, "; ".join(reasons)


def gpu_backends(op="attention", dtype=torch.bfloat16, head_dim=64):
    params = []
    for name in ("triton", "xformers", "sdpa", "eager"):
        ok, why = usable(name, op, dtype, head_dim) if torch.cuda.is_available() else (True, "")
        params.append(pytest.param(name, marks=pytest.mark.skipif(not ok, reason=f"{name}: {why}")))
    return params


def check_against_torch(name, fn, ref_fn, inputs, grad, dtype, reduction_lens):
    """Outputs and gradients within 2x plain torch's error at ``dtype`` (both vs float64), plus
    output rounding and an fp32 accumulation floor (see test_attention.py)."""
    def run(f, cast):
        leaves = [t.detach().to(cast).requires_grad_() for t in inputs]
        out = f(*leaves)
        out.backward(grad.to(cast))
        return [out.detach()] + [t.grad for t in leaves]

    got, ref, low = run(fn, dtype), run(ref_fn, torch.float64), run(ref_fn, dtype)
    for i, (a, r, lp) in enumerate(zip(got, ref, low)):
        err = (a.double() - r).abs().max().item() if a.numel() else 0.0
        torch_err = (lp.double() - r).abs().max().item() if a.numel() else 0.0
        magnitude = r.abs().max().item() if a.numel() else 0.0
        rounding = 2 * torch.finfo(dtype).eps * magnitude
        accumulation = torch.finfo(torch.float32).eps * math.sqrt(a.shape[-1] * reduction_lens[i])
        bound = 2 * torch_err + rounding + accumulation
        print(f"{name} [{i}]: err {err:.3g}, torch {torch_err:.3g}, bound {bound:.3g}")
        assert math.isfinite(err) and err <= bound, f"{name} output {i}: {err:.3g} > {bound:.3g}"


DENSE_SHAPES = [  # (B, Lq, Lk, H, causal)
    (1, 1, 1, 1, False),
    (3, 77, 77, 8, True),
    (32, 199, 199, 12, False),
    (5, 206, 206, 12, False),
    (4, 1000, 199, 8, False),  # VAIPL: C class queries x image keys
    (1, 1025, 1025, 2, True),
]


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("B,LQ,LK,H,causal", DENSE_SHAPES)
def test_dense_bf16(backend, B, LQ, LK, H, causal):
    q, k, v = (torch.randn(B, L, H, 64, device=DEVICE) for L in (LQ, LK, LK))
    grad = torch.randn(B, LQ, H, 64, device=DEVICE)
    check_against_torch(f"{backend} {B}x{LQ}x{LK}", lambda a, b, c: attention(a, b, c, causal, backend=backend),
                        lambda a, b, c: reference_attention(a, b, c, causal, 0.125), (q, k, v), grad,
                        torch.bfloat16, [max(LQ, LK)] * 4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 80, 128])
def test_dense_triton_dtypes_and_head_dims(dtype, D):
    q, k, v = (torch.randn(3, L, 4, D, device=DEVICE) for L in (197, 201, 201))
    scale = D ** -0.5
    check_against_torch(f"triton {dtype} D={D}", lambda a, b, c: attention(a, b, c, backend="triton"),
                        lambda a, b, c: reference_attention(a, b, c, False, scale), (q, k, v),
                        torch.randn(3, 197, 4, D, device=DEVICE), dtype, [201] * 4)


def test_fp32_goes_to_sdpa_and_explicit_triton_says_why():
    q = torch.randn(2, 50, 2, 64, device=DEVICE)
    assert backends.explain_backend("attention", device=DEVICE, dtype=torch.float32, head_dim=64).chosen != "triton"
    with pytest.raises(backends.BackendNotSupportedError, match="dtype float32 is not supported on cuda"):
        attention(q, q, q, backend="triton")
    torch.testing.assert_close(attention(q, q, q), reference_attention(q, q, q, False, 0.125), rtol=1e-4, atol=1e-4)


def make_packed(num_seqs, max_len, P, G, H, D=64, adjacent=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (num_seqs,), generator=gen)
    cu = torch.zeros(num_seqs + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    T = int(cu[-1])
    if G == 1:
        index = None
    elif adjacent:
        index = (torch.arange(num_seqs) * G // num_seqs).to(torch.int32).to(DEVICE)
    else:
        index = torch.randint(0, G, (num_seqs,), generator=gen, dtype=torch.int32).to(DEVICE)
    tensors = [torch.randn(T, H, D, device=DEVICE) for _ in range(3)]
    tensors += [torch.randn(G, P, H, D, device=DEVICE) for _ in range(2)]
    return tensors, cu.to(DEVICE), int(lengths.max()), index, torch.randn(T, H, D, device=DEVICE)


PACKED = [  # (S, max_len, P, G, H, adjacent)
    (1, 30, 5, 1, 8, True),
    (37, 30, 0, 1, 8, True),
    (37, 30, 5, 1, 8, True),
    (1000, 8, 5, 1, 8, True),  # ImageNet classes after a MaPLe prefix
    (1000, 30, 17, 1, 8, True),  # CoOp's 16 context tokens
    (4 * 100, 8, 5, 4, 8, True),  # CoCoOp: one prefix per image
    (300, 12, 5, 7, 8, False),
]


@pytest.mark.parametrize("backend", gpu_backends("prefix_varlen_attention"))
@pytest.mark.parametrize("S,max_len,P,G,H,adjacent", PACKED)
def test_prefix_bf16(backend, S, max_len, P, G, H, adjacent):
    (q, k, v, pk, pv), cu, longest, index, grad = make_packed(S, max_len, P, G, H, adjacent=adjacent)
    T = q.shape[0]
    check_against_torch(
        f"{backend} S={S} P={P} G={G}",
        lambda a, b, c, d, e: prefix_varlen_attention(a, b, c, cu, longest, d, e, index, backend=backend),
        lambda a, b, c, d, e: reference_prefix_attention(a, b, c, cu, d, e, index, 0.125),
        (q, k, v, pk, pv), grad, torch.bfloat16,
        [P + longest, P + longest, longest, longest, T, T])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 80, 128])
def test_prefix_triton_dtypes_and_head_dims(dtype, D):
    (q, k, v, pk, pv), cu, longest, index, grad = make_packed(200, 20, 9, 3, 4, D=D, adjacent=False)
    T = q.shape[0]
    check_against_torch(
        f"triton {dtype} D={D}",
        lambda a, b, c, d, e: prefix_varlen_attention(a, b, c, cu, longest, d, e, index, backend="triton"),
        lambda a, b, c, d, e: reference_prefix_attention(a, b, c, cu, d, e, index, D ** -0.5),
        (q, k, v, pk, pv), grad, dtype, [9 + longest, 9 + longest, longest, longest, T, T])


def test_prefix_gradient_bit_identical_on_gpu():
    (q, k, v, pk, pv), cu, longest, index, grad = make_packed(1000, 8, 5, 4, 8, adjacent=False)
    results = []
    for _ in range(2):
        leaves = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v, pk, pv)]
        out = prefix_varlen_attention(*leaves[:3], cu, longest, *leaves[3:], index, backend="triton")
        out.backward(grad.to(torch.bfloat16))
        results.append([out] + [t.grad for t in leaves])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_vaipl_never_materialises_probabilities():
    B, C, N, H, D = 4, 1000, 199, 8, 64
    q = torch.randn(B, C, H, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(B, N, H, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    out = attention(q, k, v, backend="triton")
    grad = torch.randn_like(out)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out.backward(grad)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    gradients = sum(t.numel() * t.element_size() for t in (q, k, v))
    statistics = 2 * B * H * C * 4  # lse2 is saved; delta is the backward's one temporary
    probabilities = B * H * C * N * 2
    print(f"backward extra {extra / 2**20:.1f} MiB, gradients {gradients / 2**20:.1f} MiB, "
          f"probabilities would be {probabilities / 2**20:.1f} MiB")
    assert extra <= gradients + statistics + 2**20


def test_prefix_forward_under_cuda_graph_capture():
    (q, k, v, pk, pv), cu, longest, index, _ = make_packed(500, 8, 5, 2, 8, adjacent=True)
    q, k, v, pk, pv = (t.to(torch.bfloat16) for t in (q, k, v, pk, pv))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside capture: validates and caches the packing
        prefix_varlen_attention(q, k, v, cu, longest, pk, pv, index, backend="triton")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = prefix_varlen_attention(q, k, v, cu, longest, pk, pv, index, backend="triton")
    q.copy_(q * 0.5)
    expected = prefix_varlen_attention(q, k, v, cu, longest, pk, pv, index, backend="triton")
    graph.replay()
    torch.testing.assert_close(captured, expected, rtol=0, atol=0)


def test_inductor_compile():
    # bf16: the compiled Triton kernels take fp16/bf16 only (fp32 on a GPU is sdpa's).
    (q, k, v, pk, pv), cu, longest, _, _ = make_packed(100, 8, 5, 1, 8)
    pk, pv = pk.to(torch.bfloat16), pv.to(torch.bfloat16)
    x = torch.randn(q.shape[0], 512, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(512, 1536, device=DEVICE, dtype=torch.bfloat16) / 512 ** 0.5

    def block(x):
        qkv = (x @ w).view(-1, 3, 8, 64)
        return prefix_varlen_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, longest, pk, pv, backend="triton")

    compiled = torch.compile(block, fullgraph=True)
    expected = block(x)
    # Inductor may round the projection differently (an epilogue, another GEMM): a few bf16 ulps.
    tolerance = 4 * torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(compiled(x), expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())


# ----------------------------------------------------------------------------------------------
# Timings (printed)
# ----------------------------------------------------------------------------------------------


def _time(fn, grad_to_none):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, grad_to_none=grad_to_none, return_mode="median")


def _bench(label, make_call, names, op):
    print(f"\n{label}")
    for name in names:
        ok, why = usable(name, op)
        if not ok:
            print(f"  {name:<9} unavailable: {why}")
            continue
        call, leaves, grad = make_call(name)
        fwd = _time(call, None)
        out = call()

        def fwd_bwd(call=call, grad=grad):
            call().backward(grad)

        full = _time(fwd_bwd, leaves)
        print(f"  {name:<9} forward {fwd * 1e3:8.1f} us   forward+backward {full * 1e3:8.1f} us")
        assert math.isfinite(fwd) and math.isfinite(full) and out.isfinite().all()


def test_timing_vision_attention():
    B, L, H = 32, 199, 12

    def make(name):
        leaves = [torch.randn(B, L, H, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
                  for _ in range(3)]
        return (lambda: attention(*leaves, backend=name)), leaves, torch.randn_like(leaves[0])

    _bench(f"vision self-attention B={B} L={L} H={H} D=64 bf16", make, ("triton", "xformers", "sdpa", "eager"),
           "attention")


def test_timing_vaipl_cross_attention():
    B, C, N, H = 4, 1000, 199, 8

    def make(name):
        q = torch.randn(B, C, H, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(B, N, H, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        return (lambda: attention(q, k, v, backend=name)), [q, k, v], torch.randn_like(q)

    _bench(f"VAIPL cross-attention B={B} C={C} N={N} H={H} D=64 bf16", make,
           ("triton", "xformers", "sdpa", "eager"), "attention")


def test_timing_packed_text():
    (q, k, v, pk, pv), cu, longest, _, grad = make_packed(1000, 7, 5, 1, 8)  # mean length 4

    def make(name):
        leaves = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v, pk, pv)]
        def call():
            return prefix_varlen_attention(*leaves[:3], cu, longest, *leaves[3:], backend=name)

        return call, leaves, grad.to(torch.bfloat16)

    _bench(f"packed text S=1000 T={q.shape[0]} P=5 H=8 D=64 bf16", make,
           ("triton", "xformers", "sdpa", "eager"), "prefix_varlen_attention")
