"""Where and in which dtypes the kernel tests run the Triton kernels: the one decision for tests/kernels.

Without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported, so the kernels run
in the interpreter on CPU, in float32 (the interpreter has no bf16 dot), against tight references.
With a CUDA device they run compiled on it, in the dtypes a GPU step uses: bfloat16 and float16.
The attention kernels refuse float32 on a GPU (sdpa runs it); the linear/MLP, grouped-MLP and
LayerNorm kernels also run float32 compiled (IEEE), so their tests keep it there as well.

Tolerances follow the dtype, never the device: every numerics check bounds the kernel's error
against float64 by plain PyTorch's own error at the same dtype on the same device
(kernel_numerics.py, attention_references.py).
"""

import pytest
import torch

# The same test as the session-wide kernel_device fixture (tests/conftest.py): a CUDA device
# present means compiled kernels, its absence means the interpreter.
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"

ATTENTION_DTYPES = (torch.bfloat16, torch.float16) if ON_GPU else (torch.float32,)
MATRIX_DTYPES = (torch.bfloat16, torch.float16, torch.float32) if ON_GPU else (torch.float32,)
# One dtype for checks whose point is not numerics (bit-identity, saved tensors, dispatch).
ATTENTION_DTYPE = ATTENTION_DTYPES[0]
MATRIX_DTYPE = MATRIX_DTYPES[0]


def dtype_params(dtypes):
    """pytest.param per dtype, with readable ids (bfloat16, float16, float32)."""
    return [pytest.param(d, id=str(d).removeprefix("torch.")) for d in dtypes]
