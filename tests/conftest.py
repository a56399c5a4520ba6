"""Shared test set-up.

Triton kernels run on CPU only under the interpreter, and TRITON_INTERPRET must be set before
triton is first imported, so it is decided here, at the very start of the session: without a
CUDA device the kernel tests run in the interpreter (fp32, small shapes); with one they run
compiled. Tests that need real compilation without a GPU (ahead-of-time sm_90 compiles) run in a
subprocess with the variable removed.
"""

import os


def _cuda_device_present() -> bool:
    # Decided without importing torch or triton (importing either first could fix triton's mode).
    return os.path.exists("/dev/nvidiactl") or bool(os.environ.get("FASTPROMPT_ASSUME_GPU"))


if not _cuda_device_present():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def kernel_device() -> str:
    """Device the Triton kernel tests run on: 'cuda' when present, else 'cpu' (interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


# Functions through which the launchers and the backend choice ask whether Triton is interpreted: one list, the
# one the CPU host proxies answer yes to (bench/proxy.py imports neither torch nor triton).
from bench.proxy import INTERPRETER_QUESTIONS as _INTERPRETER_QUESTIONS  # noqa: E402


@pytest.fixture(autouse=True)
def _no_interpreter_unless_asked(request, monkeypatch):
    """Outside tests/kernels, a test that does not ask for `kernel_device` sees Triton as a GPU machine does: no
    interpreter. There such a test would hand CPU tensors to compiled kernels and fail (31 failures of the first GPU
    run were of this kind); here it fails the same way, with the launcher's own error, so the CPU suite keeps the
    GPU suite green. Tests that run Triton take `kernel_device` and put their tensors there."""
    if "kernel_device" in request.fixturenames or request.path.parent.name == "kernels" \
            or os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    import importlib

    import triton.runtime.interpreter as interpreter

    for module, name in _INTERPRETER_QUESTIONS:
        monkeypatch.setattr(importlib.import_module(module), name, lambda: False)

    def refuse(self, *args, **kwargs):  # the last net, for a launch no launcher check refused
        raise RuntimeError(f"Triton kernel {self.fn.__name__} launched on CPU tensors by a test without "
                           "kernel_device: on a GPU machine it would get CPU tensors and fail")

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", refuse)
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="session")
def _one_cpu_thread():
    # The test models are tiny: with two intra-op threads on a 2-core machine the thread hand-off costs more
    # than the work (and a loaded machine makes it 30-50x slower), so the CPU suite runs single-threaded.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (bf16 and compiled Triton); none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_clip():
    """Random-weight 12-layer CLIP of width 64 (real tokenizer, 77-token context), fp32."""
    from fastprompt.backbones import create_clip

    return create_clip("tiny")


@pytest.fixture(scope="session")
def tiny_clip64(tiny_clip):
    """The tiny CLIP in float64: equivalence tests compare at ~1e-12, so only real differences show."""
    import copy

    return copy.deepcopy(tiny_clip).double()


@pytest.fixture(scope="session")
def vit_b16():
    """Random-weight open_clip ViT-B-16 (about 6 s to build on CPU; shared by the session)."""
    from fastprompt.backbones import create_clip

    return create_clip("ViT-B-16")
