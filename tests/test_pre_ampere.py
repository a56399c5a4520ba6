"""GPUs before Ampere (V100 7.0, T4 7.5: the 16 GB cards many researchers train on) compute bf16 only by emulation
and are not what fastprompt's Triton kernels are built and measured for. 'auto' gives them PyTorch ops for
LayerNorm/MLP/coupling maps, fp16 autocast for evaluation and prediction, and the papers' fp16 numerics for
training; Ampere and later keep the Triton kernels and bf16. Checked on a CPU with the capability faked."""

import pytest
import torch

from fastprompt.evaluation import default_amp_dtype
from fastprompt.ops import backends
from fastprompt.runner.engine import numerics


@pytest.fixture
def capability(monkeypatch):
    """Set the compute capability every CUDA device reports."""
    def set_to(value):
        monkeypatch.setattr(backends, "_cuda_capability", lambda index: value)
    return set_to


@pytest.mark.parametrize("value, bf16, precision, amp", [
    ((7, 0), False, "fp16-parity", torch.float16),   # V100
    ((7, 5), False, "fp16-parity", torch.float16),   # T4
    ((8, 0), True, "bf16", torch.bfloat16),          # A100
    ((9, 0), True, "bf16", torch.bfloat16),          # H100 / H200
])
def test_auto_precision_follows_native_bf16(capability, value, bf16, precision, amp):
    capability(value)
    cuda = torch.device("cuda:0")
    assert backends.computes_bf16(cuda) is bf16
    assert numerics("auto", cuda).name == precision
    assert default_amp_dtype(cuda) is amp
    # Elsewhere nothing changes: fp32 on a CPU, and what the user asked for anywhere.
    assert numerics("auto", torch.device("cpu")).name == "fp32" and default_amp_dtype("cpu") is None
    assert numerics("bf16", cuda).name == "bf16" and numerics("fp32", cuda).name == "fp32"


def test_auto_block_kernels_need_compute_capability_8(capability, monkeypatch):
    monkeypatch.setattr(backends, "triton_import_problem", lambda: None)  # Triton imports (as on a GPU machine)
    capability((7, 5))
    assert backends.block_kernels_problem("cuda:0") == ("fastprompt's Triton kernels are built for compute"
                                                        " capability >= 8.0; cuda:0 has 7.5")
    capability((8, 6))
    assert backends.block_kernels_problem("cuda:0") is None
    assert backends.block_kernels_problem("cpu") == "the Triton kernels are used on CUDA devices only"
    monkeypatch.setattr(backends, "triton_import_problem", lambda: "triton is not installed")
    assert backends.block_kernels_problem("cuda:0") == "Triton cannot run: triton is not installed"


def test_the_triton_attention_backend_shares_the_threshold():
    assert backends.get_backend("triton").min_cuda_capability == backends.TRITON_MIN_CAPABILITY == (8, 0)
