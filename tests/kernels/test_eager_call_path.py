"""The eager call path of the ops (fastprompt.ops._library.eager_function) against the registered custom ops.

In eager mode each public op runs its implementation through a plain autograd.Function instead of the torch.library
dispatch (host time, see _library); traced or compiled code still sees one registered op. Here: both paths give
bit-identical outputs and gradients (the registered op itself is checked against PyTorch references and by opcheck
in the op tests), the eager path is the one taken in eager mode, and dispatch modes and torch.compile see the op.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

from fastprompt.ops import attention as attention_ops  # noqa: E402
from fastprompt.ops import grouped_mlp, layer_norm, mlp  # noqa: E402
from kernel_targets import ATTENTION_DTYPE, MATRIX_DTYPE  # noqa: E402

MODULES = (attention_ops, grouped_mlp, layer_norm, mlp)


def _cases(device):
    """name -> (fn, inputs) on ``device``: fp32 under the interpreter, bf16 on a GPU (kernel_targets)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape, grad=True, scale=1.0, dtype=MATRIX_DTYPE):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype).requires_grad_(grad)

    def a(*shape):  # attention inputs: the Triton attention kernels run fp32 only in the interpreter
        return r(*shape, dtype=ATTENTION_DTYPE)

    d = 64
    cu = torch.tensor([0, 3, 5, 9], dtype=torch.int32, device=device)
    index = torch.tensor([0, 1, 1], dtype=torch.int32, device=device)
    return {
        "layer_norm": (lambda x, w, b: layer_norm.layer_norm(x, w, b, 1e-5), (r(2, 5, d), r(d), r(d))),
        "layer_norm_frozen": (lambda x, w, b: layer_norm.layer_norm(x, w, b, 1e-5),
                              (r(2, 5, d), r(d, grad=False), r(d, grad=False))),
        "layer_norm_residual": (lambda x, res, w, b: torch.cat(layer_norm.layer_norm(x, w, b, 1e-5, residual=res)),
                                (r(7, d), r(7, d), r(d, grad=False), r(d, grad=False))),
        "frozen_mlp": (lambda x, *w: mlp.frozen_mlp(x, *w, activation="gelu"),
                       (r(2, 3, d), r(4 * d, d, grad=False, scale=0.1), r(4 * d, grad=False),
                        r(d, 4 * d, grad=False, scale=0.1), r(d, grad=False))),
        "attention": (lambda q, k, v: attention_ops.attention(q, k, v, backend="triton"),
                      (a(2, 5, 1, d), a(2, 7, 1, d), a(2, 7, 1, d))),
        "attention_causal": (lambda q, k, v: attention_ops.attention(q, k, v, causal=True, backend="triton"),
                             (a(2, 6, 1, d), a(2, 6, 1, d), a(2, 6, 1, d))),
        "prefix_varlen_attention": (
            lambda q, k, v, pk, pv: attention_ops.prefix_varlen_attention(q, k, v, cu, 4, pk, pv, index,
                                                                         backend="triton"),
            (a(9, 1, d), a(9, 1, d), a(9, 1, d), a(2, 3, 1, d), a(2, 3, 1, d))),
        "grouped_linear": (grouped_mlp.grouped_linear, (r(3, 2, d), r(3, 32, d, scale=0.1), r(3, 32))),
        "grouped_bottleneck_mlp": (grouped_mlp.grouped_bottleneck_mlp,
                                   (r(3, 2, d), r(3, 16, d, scale=0.1), r(3, 16), r(3, 32, 16, scale=0.1), r(3, 32))),
    }


def _run(fn, inputs):
    inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*inputs)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    out.backward(upstream)
    return out.detach(), [t.grad for t in inputs], type(out.grad_fn).__name__


@pytest.mark.parametrize("name", list(_cases("cpu")))
def test_eager_path_equals_registered_op(name, kernel_device, monkeypatch):
    fn, inputs = _cases(kernel_device)[name]
    out, grads, node = _run(fn, inputs)
    for module in MODULES:
        monkeypatch.setattr(module, "direct_call_ok", lambda x: False)
    ref_out, ref_grads, ref_node = _run(fn, inputs)
    assert torch.equal(out, ref_out), name
    for got, want in zip(grads, ref_grads):
        assert (got is None) == (want is None), name
        if got is not None:
            assert torch.equal(got, want), name
    # The path taken: outputs of an eager op come from its autograd.Function, the others from torch.library's.
    if name != "layer_norm_residual":  # (cat's node there)
        assert "Eager_" in node and "Eager_" not in ref_node, (node, ref_node)


class _Seen(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def test_dispatch_modes_see_one_op(kernel_device):
    fn, inputs = _cases(kernel_device)["frozen_mlp"]
    with _Seen() as seen:
        _run(fn, inputs)
    assert seen.names.count("fastprompt::frozen_mlp") == 1
    assert seen.names.count("fastprompt::linear_act_grad") == 1  # the backward's op, also through the dispatcher


def test_compile_sees_the_registered_op(kernel_device):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x, w, b = (torch.randn(*shape, device=kernel_device, dtype=MATRIX_DTYPE) for shape in ((3, 64), (64,), (64,)))
    compiled = torch.compile(lambda x: layer_norm.layer_norm(x, w, b, 1e-5) * 2, backend=backend, fullgraph=True)
    torch._dynamo.reset()
    try:
        out = compiled(x)
    finally:
        torch._dynamo.reset()
    assert torch.equal(out, layer_norm.layer_norm(x, w, b, 1e-5) * 2)
    targets = [str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"]
    assert any("fastprompt.layer_norm" in t for t in targets), targets


def test_modules_import_the_shared_switch():
    # Each op module decides through the one function in _library (monkeypatched above per module).
    library = importlib.import_module("fastprompt.ops._library")
    for module in MODULES:
        assert module.direct_call_ok is library.direct_call_ok


class _Allocations(TorchDispatchMode):
    """Counts ops that create zero-filled tensors (autograd materialising an unused output's gradient)."""

    def __init__(self):
        super().__init__()
        self.zero_fills = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in ("aten::zeros", "aten::zeros_like", "aten::fill_", "aten::zero_", "aten::new_zeros"):
            self.zero_fills += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", [n for n in _cases("cpu") if n != "grouped_linear"])
def test_backward_fills_no_zero_gradient_for_statistics(name, kernel_device):
    # The softmax / LayerNorm statistics (and the bottleneck's saved hidden) are outputs nobody differentiates;
    # autograd would otherwise fill a zero gradient for each on every backward call: one allocation and one launch
    # each, 132 per ViT-B/16 MaPLe step. Under fake tensors nothing computes, so only the dispatched ops count.
    from torch._subclasses.fake_tensor import FakeTensorMode

    fn, inputs = _cases(kernel_device)[name]
    if name == "prefix_varlen_attention":
        fn(*inputs)  # checks the packing's values (host reads) once: fake tensors have none
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = fn(*inputs)
        counter = _Allocations()
        with counter:
            out.sum().backward()
    assert counter.zero_fills == 0
