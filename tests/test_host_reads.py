"""A warm training step and a warm evaluation batch read no value back to the host, for every method.

On a GPU a read (`item()`, `tolist()`, `bool(t)`, `int(t)`, or an op whose output size depends on values: nonzero,
boolean indexing, masked_select, unique, repeat_interleave without output_size) waits for every kernel queued so far:
host and GPU time then add up instead of overlapping, which is what keeps a step without a CUDA graph from being
GPU-bound (issue 8). Building a class set's packing reads the host once; after that a step reads nothing (the loss
and counts are read once per log interval, tests/test_training_engine.py).

The step watched is the GPU's op sequence: the model patched with backend='triton'. On a CPU the kernels run under
the interpreter with every launch made a no-op (only the host side is watched, so no kernel needs to compute); on a
GPU they run compiled, and CUDA's sync debug mode also refuses every synchronisation PyTorch itself makes (blocking
host-to-device copies included, which a CPU cannot show).
"""

from __future__ import annotations

import contextlib
import copy
import sys
import traceback
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastprompt
from fastprompt.evaluation import EvalStep
from fastprompt.methods import METHODS
from fastprompt.training import TrainStep, make_optimizer

NAMES = ["red circle", "blue square", "green triangle", "yellow star", "purple hexagon"]
TRAINED = sorted(set(METHODS) - {"clip"})

# Dispatched ops that need tensor values on the host.
VALUE_OPS = frozenset({"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal", "aten::nonzero",
                       "aten::masked_select", "aten::_unique2", "aten::unique_consecutive", "aten::unique_dim"})
# Tensor methods that hand values to Python. For CPU tensors `tolist` and `numpy` dispatch no op, so they are seen as
# calls; on a GPU they would copy to the host and wait.
VALUE_METHODS = frozenset({"tolist", "numpy", "item", "__bool__", "__int__", "__float__", "__index__"})


class HostReads(TorchDispatchMode):
    """Inside, every read of tensor values by the host is recorded with the fastprompt lines that made it."""

    def __init__(self):
        super().__init__()
        self.reads: list[tuple[str, list[str]]] = []
        self.registered_ops: set[str] = set()  # fastprompt's torch.library ops: the traced path, not the eager one

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in VALUE_OPS or _value_sized(name, args, kwargs):
            self._record(name)
        if name.startswith("fastprompt::"):
            self.registered_ops.add(name)
        return func(*args, **kwargs)

    def _record(self, what: str) -> None:
        lines = [f"{frame.filename.rsplit('fastprompt', 1)[-1]}:{frame.lineno} {frame.name}"
                 for frame in traceback.extract_stack() if "fastprompt" in frame.filename and "tests" not in frame.filename]
        self.reads.append((what, lines[-3:]))

    def _profile(self, frame, event, arg):
        if event == "c_call" and getattr(arg, "__name__", None) in VALUE_METHODS \
                and isinstance(getattr(arg, "__self__", None), torch.Tensor):
            self._record(f"Tensor.{arg.__name__}")

    def __enter__(self):
        sys.setprofile(self._profile)
        return super().__enter__()

    def __exit__(self, *exc):
        sys.setprofile(None)
        return super().__exit__(*exc)


def _value_sized(name: str, args, kwargs) -> bool:
    if name == "aten::repeat_interleave":
        return kwargs.get("output_size") is None
    if name == "aten::index":
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()))
    return False


@contextlib.contextmanager
def _watched(device: str):
    """HostReads, and on a GPU CUDA's sync debug mode set to raise on any synchronisation."""
    with HostReads() as watch:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        try:
            yield watch
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")


@pytest.fixture(scope="module")
def small_clip():
    """The "small" random-weight CLIP: heads of 64, which the Triton attention takes (the tiny one's are 32)."""
    from fastprompt.backbones import create_clip

    return create_clip("small")


@pytest.fixture
def no_op_launches(kernel_device, monkeypatch):
    """On a CPU every interpreted Triton launch returns at once (the host side runs, no kernel does). Everywhere,
    fastprompt's eager/traced gate answers as in an eager step: it says "traced" under any Python dispatch mode,
    the watch's included, which would send every op through its registered torch.library op instead of the call
    path an eager step takes (fastprompt.ops._library.direct_call_ok)."""
    from bench.kernel_path import _eager_gates

    if kernel_device == "cpu":
        import triton.runtime.interpreter as interpreter

        monkeypatch.setattr(interpreter.InterpretedFunction, "run", lambda self, *args, **kwargs: None)
    restore = _eager_gates(lambda x: type(x) is torch.Tensor)
    yield kernel_device
    restore()


def _model(small_clip, method, device):
    if device == "cuda":  # bf16 frozen weights, as the runner loads them on a GPU (the Triton kernels' dtypes)
        from fastprompt.backbones import create_clip

        clip = create_clip("small", precision="bf16", device=device)
    else:
        clip = copy.deepcopy(small_clip)
    fastprompt.patch(clip, backend="triton")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fastprompt.build(method, clip, NAMES).to(device)


def _batch(model, device, size=2):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(size, 3, *model.info.image_size, generator=generator)
    labels = torch.randint(0, len(NAMES), (size,), generator=generator)
    return images.to(device), labels.to(device)


def test_the_watch_sees_each_kind_of_read():
    x = torch.arange(6.0)
    reads = []
    for read in (lambda: x.sum().item(), lambda: x.tolist(), lambda: bool(x[0]), lambda: int(x[1]),
                 lambda: x.nonzero(), lambda: x[x > 2], lambda: x.unique(), lambda: x.repeat_interleave(x.long()),
                 lambda: torch.equal(x, x), lambda: x.numpy()):
        with HostReads() as watch:
            read()
        reads.append(len(watch.reads))
    assert all(n >= 1 for n in reads), reads
    with HostReads() as watch:
        (x * 2 + 1).exp().sum().neg().repeat_interleave(3, output_size=3)
    assert watch.reads == []


def test_the_first_step_of_a_class_set_reads_its_packing(small_clip, no_op_launches):
    """The watch sees the product's own reads: building the packed text's metadata (once per class set)."""
    model = _model(small_clip, "coop", no_op_launches)
    model.train()
    step = TrainStep(model, make_optimizer(model.trainable_parameters()), cuda_graph=False)
    with HostReads() as watch:
        step(*_batch(model, no_op_launches))
    assert any("packed_text" in " ".join(lines) for _, lines in watch.reads), watch.reads


@pytest.mark.parametrize("method", TRAINED)
def test_a_warm_training_step_reads_nothing_back(method, small_clip, no_op_launches):
    device = no_op_launches
    model = _model(small_clip, method, device)
    model.train()
    amp = torch.bfloat16 if device == "cuda" else None
    step = TrainStep(model, make_optimizer(model.trainable_parameters()), cuda_graph=False, amp_dtype=amp)
    images, labels = _batch(model, device)
    for _ in range(2):  # the class set's packing and device copies, the optimizer state
        step(images, labels)
    with _watched(device) as watch:
        step(images, labels)
    assert watch.reads == []
    assert watch.registered_ops == set()  # the eager call path was watched


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_warm_evaluation_batch_reads_nothing_back(method, small_clip, no_op_launches):
    device = no_op_launches
    model = _model(small_clip, method, device)
    evaluation = EvalStep(model, cuda_graph=False)
    images, labels = _batch(model, device, size=3)
    evaluation(images, labels)  # fills the class set's cached text features
    with _watched(device) as watch:
        evaluation(images, labels)
        evaluation(images)
    assert watch.reads == []
    assert watch.registered_ops == set()
