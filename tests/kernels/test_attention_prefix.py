"""Packed causal varlen attention with shared prefixes (fastprompt.ops.prefix_varlen_attention):
every backend that runs here against a per-sequence float64 reference, forward and the
gradients of q, k, v and the prefixes; bit-identical prefix gradients across runs; poisoned
allocations; opcheck; torch.compile; the packing checks and their cache; bad inputs. Device and
dtypes come from kernel_targets: on CPU the Triton kernels run in the interpreter in fp32; on a
GPU every case runs compiled on CUDA in bf16 and fp16.
"""

import math

import pytest
import torch

from fastprompt.ops.attention import prefix_varlen_attention
from attention_references import reference_prefix_attention
from kernel_targets import ATTENTION_DTYPE, ATTENTION_DTYPES, DEVICE, dtype_params

BACKENDS = ["triton", "sdpa", "eager"]  # triton: the interpreter on CPU, compiled on a GPU
DTYPES = dtype_params(ATTENTION_DTYPES)


def assert_within_torch_error(name, actual, ref64, torch_lowp, reduction_len):
    """Twice plain torch's error at the dtype, plus output rounding and an fp32 accumulation
    floor (the rule and its reasons are in test_attention.py)."""
    err = (actual.double() - ref64).abs().max().item() if actual.numel() else 0.0
    torch_err = (torch_lowp.double() - ref64).abs().max().item() if actual.numel() else 0.0
    magnitude = ref64.abs().max().item() if actual.numel() else 0.0
    rounding = 2 * torch.finfo(actual.dtype).eps * magnitude
    accumulation = torch.finfo(torch.float32).eps * math.sqrt(actual.shape[-1] * reduction_len)
    bound = 2 * torch_err + rounding + accumulation
    print(f"{name}: max err {err:.3g}, plain torch {torch_err:.3g}, bound {bound:.3g}")
    assert math.isfinite(err) and err <= bound, f"{name}: error {err:.3g} above {bound:.3g}"


def make_problem(lengths, P, G, H=1, D=64, prefix_index="none", device=DEVICE, dtype=ATTENTION_DTYPE):
    lengths = torch.as_tensor(lengths)
    S = lengths.numel()
    cu_seqlens = torch.zeros(S + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(lengths, 0)
    T = int(cu_seqlens[-1])
    if prefix_index == "none":
        index = None
    elif prefix_index == "random":
        index = torch.randint(0, G, (S,), dtype=torch.int32)
    elif prefix_index == "blocks":  # CoCoOp: image g's class prompts are adjacent
        index = (torch.arange(S) * G // S).to(torch.int32)
    tensors = [torch.randn(T, H, D, dtype=dtype) for _ in range(3)]
    tensors += [torch.randn(G, P, H, D, dtype=dtype) for _ in range(2)]
    grad = torch.randn(T, H, D, dtype=dtype)
    def to(t):
        return None if t is None else t.to(device)

    return [to(t) for t in tensors], to(cu_seqlens), int(lengths.max()), to(index), to(grad)


def forward_backward(fn, tensors, grad, cast):
    leaves = [t.detach().to(cast).requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(grad.to(cast))
    return [out.detach()] + [t.grad for t in leaves]


def run_and_check(backend, lengths, P, G, prefix_index="none", H=1, dtype=ATTENTION_DTYPE, call=None):
    """Output and the five gradients of ``call`` (default: the op with ``backend``) on the kernel
    device in ``dtype``, each within the rule against float64; plain torch's error is measured
    with the reference at the same dtype on the same device."""
    (q, k, v, pk, pv), cu, max_len, index, grad = make_problem(lengths, P, G, H=H, dtype=dtype,
                                                               prefix_index=prefix_index)
    scale = 1 / math.sqrt(q.shape[-1])

    def op(q, k, v, pk, pv):
        if call is not None:
            return call(q, k, v, cu, max_len, pk, pv, index)
        return prefix_varlen_attention(q, k, v, cu, max_len, pk, pv, index, backend=backend)

    def ref_fn(q, k, v, pk, pv):
        return reference_prefix_attention(q, k, v, cu, pk, pv, index, scale)

    got = forward_backward(op, (q, k, v, pk, pv), grad, dtype)
    ref = forward_backward(ref_fn, (q, k, v, pk, pv), grad, torch.float64)
    low = forward_backward(ref_fn, (q, k, v, pk, pv), grad, dtype)
    check_outputs_and_gradients(backend, got, ref, low, P, max_len)
    return got


def check_outputs_and_gradients(label, got, ref, low, P, max_len):
    """[out, dq, dk, dv, dprefix_k, dprefix_v]: each within the rule, in the dtype it was run in."""
    # the prefix gradient sums over all tokens that see the prefix; suffix ones over a sequence
    tokens = got[0].shape[0]
    reductions = (P + max_len, P + max_len, max_len, max_len, tokens, tokens)
    for name, a, r, lp, n in zip(("out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"), got, ref, low, reductions):
        assert a.shape == r.shape and a.dtype == lp.dtype
        assert_within_torch_error(f"{label} {name}", a, r, lp, n)


def random_lengths(S, low=1, high=30):
    return torch.randint(low, high + 1, (S,)).tolist()


# (lengths, P, G, prefix_index): one sequence; 37 sequences of random lengths 1..30 with and
# without a prefix; several prefixes shared by unordered sequences (each block of tokens meets
# several prefix ids) or by adjacent ones (CoCoOp's layout).
CASES = {
    "one_sequence_no_prefix": ([17], 0, 1, "none"),
    "one_sequence_prefix": ([30], 5, 1, "none"),
    "37_sequences_no_prefix": ("random37", 0, 1, "none"),
    "37_sequences_prefix": ("random37", 5, 1, "none"),
    "3_prefixes_unordered": ("random20", 5, 3, "random"),
    "2_prefixes_adjacent": ("random20", 5, 2, "blocks"),
}


def _lengths(spec):
    return random_lengths(int(spec[len("random"):])) if isinstance(spec, str) else spec


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(backend, case, dtype):
    lengths, P, G, prefix_index = CASES[case]
    run_and_check(backend, _lengths(lengths), P, G, prefix_index, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_long_prefix_and_two_heads(dtype):
    # P = 70 > 64 splits the prefix over several blocks (forward loop, gradient programs).
    run_and_check("triton", [3, 40, 1, 9], 70, 2, "random", H=2, dtype=dtype)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_thousand_short_sequences(backend):
    # The text tower's shape: ~1000 classes, a few tokens each after the shared prefix.
    run_and_check(backend, random_lengths(1000, 1, 8), 5, 1, "none", H=2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_writes_every_output(poison, dtype):
    run_and_check("triton", random_lengths(12), 5, 3, "random", dtype=dtype)


def test_triton_prefix_gradient_is_bit_identical_across_runs():
    (q, k, v, pk, pv), cu, max_len, index, grad = make_problem(random_lengths(15), 5, 2,
                                                               prefix_index="random")
    runs = [forward_backward(lambda *t: prefix_varlen_attention(t[0], t[1], t[2], cu, max_len, t[3], t[4],
                                                                index, backend="triton"),
                             (q, k, v, pk, pv), grad, ATTENTION_DTYPE) for _ in range(2)]
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_prefix_index_of_zeros_equals_none():
    (q, k, v, pk, pv), cu, max_len, _, _ = make_problem(random_lengths(9), 5, 1)
    zeros = torch.zeros(9, dtype=torch.int32, device=DEVICE)
    torch.testing.assert_close(
        prefix_varlen_attention(q, k, v, cu, max_len, pk, pv, zeros, backend="triton"),
        prefix_varlen_attention(q, k, v, cu, max_len, pk, pv, None, backend="triton"), rtol=0, atol=0)


def test_opcheck():
    (q, k, v, pk, pv), cu, _, index, _ = make_problem([3, 1, 6], 5, 2, prefix_index="random")
    leaves = [t.requires_grad_() for t in (q, k, v, pk, pv)]
    args = (leaves[0], leaves[1], leaves[2], cu, leaves[3], leaves[4], index, 0.125)
    torch.library.opcheck(torch.ops.fastprompt.prefix_varlen_attention_fwd.default, args)
    plain = [t.detach() for t in leaves]
    out, lse2 = torch.ops.fastprompt.prefix_varlen_attention_fwd(*plain[:3], cu, *plain[3:], index, 0.125)
    bwd_args = (torch.randn_like(out), *plain[:3], out, lse2, cu, *plain[3:], index, 0.125)
    torch.library.opcheck(torch.ops.fastprompt.prefix_varlen_attention_bwd.default, bwd_args)


def test_torch_compile_fullgraph():
    # Traced whole (one registered op forward, one backward), then held to the same float64 rule.
    def op(q, k, v, cu, max_len, pk, pv, index):
        return prefix_varlen_attention(q, k, v, cu, max_len, pk, pv, index, backend="triton")

    run_and_check("triton", [4, 9, 2], 5, 1, call=torch.compile(op, backend="aot_eager", fullgraph=True))


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def _args(lengths=(3, 2, 4), P=5, G=2):
    # On CPU in fp32 on every machine: the checks run before any backend, and the messages name them.
    (q, k, v, pk, pv), cu, max_len, _, _ = make_problem(list(lengths), P, G, device="cpu", dtype=torch.float32)
    return q, k, v, cu, max_len, pk, pv


def test_packing_errors_name_the_problem():
    q, k, v, cu, max_len, pk, pv = _args()
    with pytest.raises(TypeError, match="cu_seqlens must be an int32 tensor, got torch.int64"):
        prefix_varlen_attention(q, k, v, cu.long(), max_len, pk, pv)
    with pytest.raises(ValueError, match=r"strictly increasing .*cu_seqlens\[2\]=3 <= cu_seqlens\[1\]=3"):
        prefix_varlen_attention(q, k, v, torch.tensor([0, 3, 3, 9], dtype=torch.int32), max_len, pk, pv)
    with pytest.raises(ValueError, match="start at 0 and end at the token count 9"):
        prefix_varlen_attention(q, k, v, torch.tensor([1, 3, 5, 9], dtype=torch.int32), max_len, pk, pv)
    with pytest.raises(ValueError, match="start at 0 and end at the token count 9"):
        prefix_varlen_attention(q, k, v, torch.tensor([0, 3, 5, 8], dtype=torch.int32), max_len, pk, pv)
    with pytest.raises(ValueError, match="max_seqlen=3 but sequence 2 holds 4 tokens"):
        prefix_varlen_attention(q, k, v, cu, 3, pk, pv)
    with pytest.raises(ValueError, match="max_seqlen must be a positive int"):
        prefix_varlen_attention(q, k, v, cu, torch.tensor(4), pk, pv)
    with pytest.raises(ValueError, match=r"prefix_index holds 2, outside \[0, 2\)"):
        prefix_varlen_attention(q, k, v, cu, max_len, pk, pv, torch.tensor([0, 2, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"prefix_index holds -1"):
        prefix_varlen_attention(q, k, v, cu, max_len, pk, pv, torch.tensor([0, -1, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="prefix_index has 2 entries for 3 sequences"):
        prefix_varlen_attention(q, k, v, cu, max_len, pk, pv, torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(TypeError, match="prefix_index must be an int32 tensor"):
        prefix_varlen_attention(q, k, v, cu, max_len, pk, pv, torch.tensor([0, 1, 1]))


def test_tensor_errors_name_the_problem():
    q, k, v, cu, max_len, pk, pv = _args()
    with pytest.raises(TypeError, match="prefix_k has dtype torch.float64 but q has torch.float32"):
        prefix_varlen_attention(q, k, v, cu, max_len, pk.double(), pv)
    with pytest.raises(ValueError, match="v is on meta but q is on cpu"):
        prefix_varlen_attention(q, k, v.to("meta"), cu, max_len, pk, pv)
    with pytest.raises(ValueError, match="cu_seqlens is on meta but q is on cpu"):
        prefix_varlen_attention(q, k, v, cu.to("meta"), max_len, pk, pv)
    with pytest.raises(ValueError, match="matching q"):
        prefix_varlen_attention(q, k, v, cu, max_len, pk[:, :, :, :32], pv[:, :, :, :32])
    with pytest.raises(ValueError, match=r"\[tokens, heads, head_dim\] of one shape"):
        prefix_varlen_attention(q, k[:-1], v, cu, max_len, pk, pv)
    from fastprompt.ops.backends import BackendNotSupportedError

    q48 = torch.randn(9, 1, 48, device=DEVICE, dtype=ATTENTION_DTYPE)
    pk48 = torch.randn(1, 5, 1, 48, device=DEVICE, dtype=ATTENTION_DTYPE)
    cu = cu.to(DEVICE)
    with pytest.raises(BackendNotSupportedError, match="head_dim 48 is not supported"):
        prefix_varlen_attention(q48, q48, q48, cu, max_len, pk48, pk48, backend="triton")


def test_packing_is_checked_again_after_an_in_place_change():
    q, k, v, cu, max_len, pk, pv = _args()
    prefix_varlen_attention(q, k, v, cu, max_len, pk, pv)  # validated and cached
    cu[2] = cu[1]  # corrupt in place: the version counter moves, the cache entry no longer applies
    with pytest.raises(ValueError, match="strictly increasing"):
        prefix_varlen_attention(q, k, v, cu, max_len, pk, pv)


def test_cached_packing_metadata_follows_an_in_place_change():
    # The kernels reuse token->sequence maps and gradient plans while cu_seqlens/prefix_index
    # are unchanged; rewriting them in place (same token count) must not reuse stale ones.
    (q, k, v, pk, pv), cu, _, index, grad = make_problem([4, 4, 4, 4], 5, 2, prefix_index="random")
    leaves = [t.requires_grad_() for t in (q, k, v, pk, pv)]
    for new_cu, new_index in ((None, None), ([0, 1, 9, 10, 16], [1, 1, 0, 1])):
        if new_cu is not None:
            cu.copy_(torch.tensor(new_cu, dtype=torch.int32))
            index.copy_(torch.tensor(new_index, dtype=torch.int32))
        out = prefix_varlen_attention(*leaves[:3], cu, 10, *leaves[3:], index, backend="triton")
        got = [out.detach(), *torch.autograd.grad(out, leaves, grad)]

        def reference(cast):
            ref_leaves = [t.detach().to(cast).requires_grad_() for t in leaves]
            ref = reference_prefix_attention(*ref_leaves[:3], cu, *ref_leaves[3:], index, 0.125)
            return [ref.detach(), *torch.autograd.grad(ref, ref_leaves, grad.to(cast))]

        check_outputs_and_gradients("after rewrite" if new_cu else "before", got, reference(torch.float64),
                                    reference(q.dtype), 5, 10)


def test_kernel_plan_keeps_chunks_inside_one_prefix():
    from fastprompt.kernels.attention_prefix import prefix_grad_plan

    lengths = [3, 1, 4, 2, 5, 2]
    cu = torch.tensor([0, 3, 4, 8, 10, 15, 17], dtype=torch.int32)
    index = torch.tensor([2, 0, 2, 0, 0, 2], dtype=torch.int32)  # prefix 1 unused
    order, start, group, offsets = prefix_grad_plan(cu, index, 3, 17, chunk_len=4)
    # positions in prefix order: prefix 0's sequences (1, 3, 4), then prefix 2's (0, 2, 5)
    expected = [3, 8, 9, 10, 11, 12, 13, 14, 0, 1, 2, 4, 5, 6, 7, 15, 16]
    assert order.tolist() == expected
    owner = {t: int(index[s]) for s in range(len(lengths)) for t in range(int(cu[s]), int(cu[s + 1]))}
    for c in range(group.numel()):
        for pos in range(int(start[c]), int(start[c + 1])):
            assert owner[expected[pos]] == int(group[c])
    assert offsets.tolist()[0] == 0 and offsets.tolist()[-1] == group.numel()
    assert int(offsets[1]) == int(offsets[2])  # prefix 1 owns no chunk with tokens
    covered = sum(int(start[c + 1] - start[c]) for c in range(int(offsets[1]), int(offsets[2])))
    assert covered == 0
