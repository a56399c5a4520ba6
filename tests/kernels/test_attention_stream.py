"""The packed text stream's attention in one op (fastprompt.ops.prefix_stream_attention): G prefixes of P rows
at the top of the stream attend causally within themselves, the packed suffixes attend to their prefix and
causally within their sequence, all from one [N, 3, H, D] qkv with one [N, 3, H, D] gradient.

Every backend against the tests' own float64 reference (reference_attention for the prefixes,
reference_prefix_attention for the suffixes, both written independently of the kernels), forward and the
gradient of qkv, where the prefix rows' key/value gradient sums their own attention's and every later
token's; bit-identical gradients across runs; poisoned allocations; opcheck; torch.compile; bad input.
Device and dtypes come from kernel_targets (interpreter fp32 on CPU, compiled bf16/fp16 on a GPU).
"""

import math

import pytest
import torch

from attention_references import reference_attention, reference_prefix_attention
from fastprompt.ops.attention import prefix_stream_attention
from kernel_targets import ATTENTION_DTYPE, ATTENTION_DTYPES, DEVICE, dtype_params
from kernel_numerics import OpRecorder
from test_attention_prefix import _lengths, assert_within_torch_error, random_lengths

BACKENDS = ["triton", "sdpa", "eager"]
DTYPES = dtype_params(ATTENTION_DTYPES)


def make_stream(lengths, P, G, H=1, D=64, prefix_index="none", device=DEVICE, dtype=ATTENTION_DTYPE):
    lengths = torch.as_tensor(lengths)
    S = lengths.numel()
    cu = torch.zeros(S + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    rows = G * P + int(cu[-1])
    index = {"none": None, "random": torch.randint(0, G, (S,), dtype=torch.int32),
             "blocks": (torch.arange(S) * G // S).to(torch.int32)}[prefix_index]
    qkv = torch.randn(rows, 3, H, D, dtype=dtype)
    grad = torch.randn(rows, H, D, dtype=dtype)
    return qkv.to(device), cu.to(device), int(lengths.max()), None if index is None else index.to(device), \
        grad.to(device)


def reference_stream(qkv, cu, G, P, index, scale):
    """The stream by its definition: the prefixes' dense causal attention, then the suffixes' attention to them."""
    rows = G * P
    q, k, v = qkv[rows:].unbind(1)
    pq, pk, pv = (t.unflatten(0, (G, P)) for t in qkv[:rows].unbind(1))
    suffix = reference_prefix_attention(q, k, v, cu, pk, pv, index, scale)
    if rows == 0:
        return suffix
    return torch.cat([reference_attention(pq, pk, pv, True, scale).flatten(0, 1), suffix])


def forward_backward(fn, qkv, grad, dtype):
    leaf = qkv.detach().to(dtype).clone().requires_grad_()
    out = fn(leaf)
    out.backward(grad.to(dtype))
    return out.detach(), leaf.grad


def run_and_check(backend, lengths, P, G, prefix_index="none", H=1, dtype=ATTENTION_DTYPE, call=None):
    qkv, cu, max_len, index, grad = make_stream(lengths, P, G, H=H, prefix_index=prefix_index, dtype=dtype)
    scale = 1 / math.sqrt(qkv.shape[-1])

    def op(x):
        if call is not None:
            return call(x, cu, max_len, G, P, index)
        return prefix_stream_attention(x, cu, max_len, G, P, index, backend=backend)

    def ref(x):
        return reference_stream(x, cu, G, P, index, scale)

    got = forward_backward(op, qkv, grad, dtype)
    exact = forward_backward(ref, qkv, grad, torch.float64)
    low = forward_backward(ref, qkv, grad, dtype)
    rows = G * P
    tokens = qkv.shape[0] - rows
    # The reductions behind each part: a row's keys (prefix + own sequence); the prefix rows' key and value
    # gradients sum over every token that sees them.
    assert got[0].shape == exact[0].shape and got[1].shape == qkv.shape and got[1].dtype == dtype
    assert_within_torch_error(f"{backend} out", got[0], exact[0], low[0], P + max_len)
    assert_within_torch_error(f"{backend} dq", got[1][:, 0], exact[1][:, 0], low[1][:, 0], P + max_len)
    for part, name in ((1, "dk"), (2, "dv")):
        assert_within_torch_error(f"{backend} {name} suffix", got[1][rows:, part], exact[1][rows:, part],
                                  low[1][rows:, part], max_len)
        assert_within_torch_error(f"{backend} {name} prefix", got[1][:rows, part], exact[1][:rows, part],
                                  low[1][:rows, part], tokens + P)
    return got


# (lengths, P, G, prefix_index): the text tower's cases: one shared prefix (CoOp, MaPLe), no prefix rows, a long
# prefix over several key blocks, several prefixes shared by adjacent sequences (CoCoOp: per image) or by
# unordered ones (class-specific context), single-token suffixes.
CASES = {
    "shared_prefix": ("random37", 5, 1, "none"),
    "no_prefix_rows": ("random20", 0, 1, "none"),
    "one_sequence": ([30], 5, 1, "none"),
    "long_prefix": ([3, 40, 1, 9], 21, 1, "none"),
    "prefixes_adjacent": ("random20", 5, 4, "blocks"),
    "prefixes_unordered": ("random20", 3, 3, "random"),
    "one_token_suffixes": ([1] * 50, 4, 1, "none"),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(backend, case, dtype):
    lengths, P, G, prefix_index = CASES[case]
    run_and_check(backend, _lengths(lengths), P, G, prefix_index, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_two_heads_and_prefix_longer_than_a_block(dtype):
    # P = 70: the prefix keys span several BLOCK_P blocks and the prefix rows several query blocks.
    run_and_check("triton", [3, 40, 1, 9], 70, 2, "random", H=2, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_writes_every_output(poison, dtype):
    run_and_check("triton", random_lengths(12), 5, 3, "random", dtype=dtype)


def test_triton_gradient_is_bit_identical_across_runs():
    qkv, cu, max_len, index, grad = make_stream(random_lengths(15), 5, 2, prefix_index="random")
    runs = [forward_backward(lambda x: prefix_stream_attention(x, cu, max_len, 2, 5, index, backend="triton"),
                             qkv, grad, ATTENTION_DTYPE) for _ in range(2)]
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_opcheck():
    qkv, cu, _, index, _ = make_stream([3, 1, 6], 5, 2, prefix_index="random")
    torch.library.opcheck(torch.ops.fastprompt.prefix_stream_attention_fwd.default,
                          (qkv.requires_grad_(), cu, index, 2, 5, 0.125))
    out, lse2 = torch.ops.fastprompt.prefix_stream_attention_fwd(qkv.detach(), cu, index, 2, 5, 0.125)
    torch.library.opcheck(torch.ops.fastprompt.prefix_stream_attention_bwd.default,
                          (torch.randn_like(out), qkv.detach(), out, lse2, cu, index, 2, 5, 0.125))


def test_torch_compile_fullgraph():
    def op(qkv, cu, max_len, groups, prefix_len, index):
        return prefix_stream_attention(qkv, cu, max_len, groups, prefix_len, index, backend="triton")

    run_and_check("triton", [4, 9, 2], 5, 1, call=torch.compile(op, backend="aot_eager", fullgraph=True))


def test_one_op_forward_and_backward():
    # What the fusion is for: the whole stream is one registered op each way (counted under the dispatcher).
    qkv, cu, max_len, index, grad = make_stream(random_lengths(9), 5, 2, prefix_index="random")
    leaf = qkv.clone().requires_grad_()
    out = prefix_stream_attention(leaf, cu, max_len, 2, 5, index, backend="triton")
    with OpRecorder() as seen:
        out.backward(grad)
    ops = [name.split(".")[0] for name in seen.names]  # overload names dropped: aten::add.Tensor -> aten::add
    assert ops.count("fastprompt::prefix_stream_attention_bwd") == 1
    assert not {"aten::stack", "aten::cat", "aten::add"} & set(ops), ops


# ----------------------------------------------------------------------------------------------
# Bad input: one line each, before any backend runs
# ----------------------------------------------------------------------------------------------


def test_errors_name_the_problem():
    qkv, cu, max_len, _, _ = make_stream([3, 2, 4], 5, 2, device="cpu", dtype=torch.float32)
    cases = [
        (lambda: prefix_stream_attention(qkv[:, :2], cu, max_len, 2, 5), ValueError, "rows, 3, heads, head_dim"),
        (lambda: prefix_stream_attention(qkv, cu, max_len, 0, 5), ValueError, "groups >= 1"),
        (lambda: prefix_stream_attention(qkv, cu, max_len, 2, 2.5), TypeError, "prefix_len must be an int"),
        (lambda: prefix_stream_attention(qkv[:7], cu, max_len, 2, 5), ValueError, "fewer than the 2 x 5"),
        (lambda: prefix_stream_attention(qkv, cu, max_len, 2, 4), ValueError, "cu_seqlens must start at 0 and end"),
        (lambda: prefix_stream_attention(qkv, cu, max_len, 2, 5, torch.tensor([0, 1, 2], dtype=torch.int32)),
         ValueError, "outside [0, 2)"),
        (lambda: prefix_stream_attention(qkv.long(), cu, max_len, 2, 5), TypeError, "floating-point"),
    ]
    for call, kind, text in cases:
        with pytest.raises(kind) as info:
            call()
        message = str(info.value)
        assert text in message and "\n" not in message, message
