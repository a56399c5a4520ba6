"""The xformers backend without xformers: detection (not installed, op moved to mslk, op that
fails to run) and the glue code (mask construction, interleaving of per-sequence prefixes with
suffix keys, deterministic prefix gradient), run against a stand-in ``xformers.ops`` whose
``memory_efficient_attention`` implements the documented mask semantics in plain torch; and the
one-line error of an explicit ``backend="xformers"`` that cannot run (a wheel built for another
torch/CUDA, an import that fails with several lines).

The real xformers kernels need CUDA; the GPU tier (test_attention_gpu.py) runs them when the
package is installed and usable there.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

import pytest
import torch

from fastprompt.ops import backends
from fastprompt.ops.attention import _xformers_attention, _xformers_prefix


@pytest.fixture(autouse=True)
def fresh_backend_caches():
    backends.clear_caches()
    yield
    backends.clear_caches()


def _install(monkeypatch, name, module):
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    monkeypatch.setitem(sys.modules, name, module)


class StandInBottomRightMask:
    """BlockDiagonalCausalFromBottomRightMask: block b pairs q_seqlen[b] queries with
    kv_seqlen[b] keys, and query i sees key j iff j <= i + kv_seqlen[b] - q_seqlen[b]."""

    def __init__(self, q_seqlen, kv_seqlen):
        self.q_seqlen, self.kv_seqlen = list(q_seqlen), list(kv_seqlen)

    @classmethod
    def from_seqlens(cls, q_seqlen, kv_seqlen=None):
        return cls(q_seqlen, q_seqlen if kv_seqlen is None else kv_seqlen)

    def materialize(self, total_q, total_k):
        allowed = torch.zeros(total_q, total_k, dtype=torch.bool)
        q0 = k0 = 0
        for nq, nk in zip(self.q_seqlen, self.kv_seqlen):
            i, j = torch.arange(nq)[:, None], torch.arange(nk)[None, :]
            allowed[q0:q0 + nq, k0:k0 + nk] = j <= i + (nk - nq)
            q0, k0 = q0 + nq, k0 + nk
        assert (q0, k0) == (total_q, total_k), "the mask and the packed tensors disagree"
        return allowed


class StandInLowerTriangularMask:
    def materialize(self, total_q, total_k):
        return torch.ones(total_q, total_k, dtype=torch.bool).tril()


def stand_in_memory_efficient_attention(q, k, v, attn_bias=None, p=0.0, scale=None):
    assert q.dim() == 4, "memory_efficient_attention takes [batch, seq, heads, head_dim]"
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if attn_bias is not None:
        s = s.masked_fill(~attn_bias.materialize(q.shape[1], k.shape[1]), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


def install_stand_in(monkeypatch, attention_fn=stand_in_memory_efficient_attention):
    package, ops = types.ModuleType("xformers"), types.ModuleType("xformers.ops")
    fmha, attn_bias = types.ModuleType("xformers.ops.fmha"), types.ModuleType("xformers.ops.fmha.attn_bias")
    ops.memory_efficient_attention = attention_fn
    attn_bias.BlockDiagonalCausalFromBottomRightMask = StandInBottomRightMask
    attn_bias.LowerTriangularMask = StandInLowerTriangularMask
    package.ops, ops.fmha, fmha.attn_bias = ops, fmha, attn_bias
    for name, module in (("xformers", package), ("xformers.ops", ops), ("xformers.ops.fmha", fmha),
                         ("xformers.ops.fmha.attn_bias", attn_bias)):
        _install(monkeypatch, name, module)


def test_not_installed_is_reported():
    if "xformers" in sys.modules or importlib.util.find_spec("xformers") is not None:
        pytest.skip("xformers is installed here")
    assert backends.xformers_import_problem() == "xformers is not installed"


def test_fmha_moved_to_mslk_is_reported(monkeypatch):
    # Recent xformers: xformers.ops imports, but memory_efficient_attention lives in mslk.
    package, ops = types.ModuleType("xformers"), types.ModuleType("xformers.ops")
    package.ops = ops
    _install(monkeypatch, "xformers", package)
    _install(monkeypatch, "xformers.ops", ops)
    problem = backends.xformers_import_problem()
    assert "no memory_efficient_attention" in problem and "mslk" in problem


def test_an_operator_that_fails_to_run_is_reported(monkeypatch):
    def broken(*args, **kwargs):
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs:\n...")

    install_stand_in(monkeypatch, broken)
    assert backends.xformers_import_problem() is None
    problem = backends.xformers_run_problem("cpu", 0, torch.float32)
    assert problem.startswith("memory_efficient_attention failed on cpu:0 in float32")
    assert "No operator found" in problem


def test_a_working_operator_passes_the_probe(monkeypatch):
    install_stand_in(monkeypatch)
    assert backends.xformers_run_problem("cpu", 0, torch.float32) is None


def reference(q, k, v, allowed, scale):
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    return torch.einsum("hqk,khd->qhd", s.masked_fill(~allowed, float("-inf")).softmax(-1), v)


def test_dense_glue(monkeypatch):
    install_stand_in(monkeypatch)
    q, k, v = (torch.randn(2, 30, 2, 64, dtype=torch.float64) for _ in range(3))
    for causal in (False, True):
        allowed = torch.ones(30, 30, dtype=torch.bool)
        if causal:
            allowed = allowed.tril()
        expected = torch.stack([reference(q[b], k[b], v[b], allowed, 0.2) for b in range(2)])
        torch.testing.assert_close(_xformers_attention(q, k, v, causal, 0.2), expected)


@pytest.mark.parametrize("P,G,with_index", [(0, 1, False), (5, 1, False), (5, 3, True)])
def test_prefix_glue_interleaves_prefixes_and_suffixes(monkeypatch, P, G, with_index):
    install_stand_in(monkeypatch)
    lengths = [3, 1, 7, 2, 5]
    cu = torch.tensor([0, 3, 4, 11, 13, 18], dtype=torch.int32)
    index = torch.tensor([2, 0, 1, 2, 0], dtype=torch.int32) if with_index else None
    q, k, v = (torch.randn(18, 2, 64, dtype=torch.float64, requires_grad=True) for _ in range(3))
    pk, pv = (torch.randn(G, P, 2, 64, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out = _xformers_prefix(q, k, v, cu, 7, pk, pv, index, 0.125)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v, pk, pv))

    q2, k2, v2, pk2, pv2 = (t.detach().requires_grad_() for t in (q, k, v, pk, pv))
    pieces = []
    for s, n in enumerate(lengths):
        a = int(cu[s])
        g = int(index[s]) if with_index else 0
        allowed = torch.ones(n, P + n, dtype=torch.bool)
        allowed[:, P:] = torch.ones(n, n, dtype=torch.bool).tril()
        pieces.append(reference(q2[a:a + n], torch.cat([pk2[g], k2[a:a + n]]),
                                torch.cat([pv2[g], v2[a:a + n]]), allowed, 0.125))
    expected = torch.cat(pieces)
    expected_grads = torch.autograd.grad(expected.square().sum(), (q2, k2, v2, pk2, pv2))
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------------------------
# An explicit backend="xformers" that cannot run says why in one line
# ----------------------------------------------------------------------------------------------


class StandInBuildInfo:
    """What xformers._cpp_lib records from its wheel's cpp_lib.json (the H200 image's wheel)."""

    torch_version = "2.10.0+cu128"
    cuda_version = 1208


def record_extension_load(monkeypatch, failure):
    """xformers._cpp_lib as a wheel for another torch/CUDA leaves it: the import succeeds (xformers
    logs a warning) and _cpp_library_load_exception holds what went wrong (None: it loaded)."""
    cpp_lib = types.ModuleType("xformers._cpp_lib")
    cpp_lib._cpp_library_load_exception = failure
    sys.modules["xformers"]._cpp_lib = cpp_lib
    _install(monkeypatch, "xformers._cpp_lib", cpp_lib)


def explicit_request_error(**request) -> str:
    from fastprompt.ops.attention import _select

    args = {"op": "attention", "device": torch.device("cpu"), "dtype": torch.float32, "head_dim": 64,
            "causal": False} | request
    with pytest.raises(backends.BackendNotSupportedError) as raised:
        _select(**args, backend="xformers")
    return str(raised.value)


def no_operator(*args, **kwargs):  # memory_efficient_attention when no C++/CUDA operator was registered
    raise NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs:\n...")


def test_a_wheel_built_for_another_torch_is_named(monkeypatch):
    install_stand_in(monkeypatch, no_operator)
    failure = RuntimeError("xFormers can't load C++/CUDA extensions. xFormers was built for:\n ...")
    failure.build_info = StandInBuildInfo()
    record_extension_load(monkeypatch, failure)
    message = explicit_request_error()
    assert "\n" not in message
    assert message.startswith("attention backend 'xformers' cannot run attention on cpu")
    assert "runs on cuda only" in message
    here = f"this is torch {torch.__version__}"
    assert f"could not load its C++/CUDA extension: it was built for torch 2.10.0+cu128 with CUDA 12.8, {here}" in message


def test_an_extension_that_loaded_adds_nothing(monkeypatch):
    install_stand_in(monkeypatch)
    record_extension_load(monkeypatch, None)
    assert "could not load" not in explicit_request_error()


def test_a_failing_import_is_reported_in_one_line(monkeypatch):
    # xformers.ops raising on import (multi-line text), on a CUDA request: the probe reports the import.
    class FailingLoader(importlib.abc.Loader):
        def create_module(self, spec):
            return None

        def exec_module(self, module):
            raise ImportError("xFormers can't load C++/CUDA extensions.\n  Please reinstall xformers")

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            return importlib.machinery.ModuleSpec(name, FailingLoader()) if name == "xformers.ops" else None

    package = types.ModuleType("xformers")
    package.__path__ = []  # a package: its submodules are looked up through sys.meta_path
    _install(monkeypatch, "xformers", package)
    for name in ("xformers.ops", "xformers._cpp_lib"):  # a real installation's, where there is one
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(sys, "meta_path", [Finder(), *sys.meta_path])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past "runs on cuda only" to the probes
    message = explicit_request_error(device=torch.device("cuda", 0), dtype=torch.bfloat16)
    assert message == ("attention backend 'xformers' cannot run attention on cuda:0 in torch.bfloat16 with "
                       "head_dim 64: importing xformers.ops failed: ImportError: xFormers can't load C++/CUDA "
                       "extensions.")
