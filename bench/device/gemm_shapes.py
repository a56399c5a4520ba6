"""Issue 9 item 2 on the GPU: which GEMM runs the frozen MLP's first layer fastest at the step's shapes.

The frozen CLIP MLP is fc1 + QuickGELU + fc2 per block; fastprompt runs fc1 + bias + activation as one Triton GEMM
(`linear_act`, also recomputed in backward by `linear_act_grad`) and fc2 with cuBLAS (`addmm`). This times, at the
ImageNet step's rows (vision: B = 32 images of 199 tokens at width 768; text: MaPLe's 4,170 packed tokens at 512),
forward fc1 + activation as
  * triton      fastprompt's linear_act (bias and QuickGELU in the epilogue),
  * cublas+act  torch.addmm (cuBLAS, bias fused) then QuickGELU as PyTorch ops,
  * cublas      torch.addmm alone (the GEMM without the activation: a floor for any cuBLAS-based plan),
  * cublaslt    torch._addmm_activation(..., use_gelu=True) (cuBLASLt's GELU epilogue; tanh GELU, not QuickGELU,
                so a speed reference for an epilogue, not a replacement),
and the backward recompute (linear_act_grad) against addmm + the activation's derivative in PyTorch ops. Each as a
CUDA graph replay (GPU time), in TFLOP/s of the GEMM. From the repo root on the GPU machine:

    python bench/device/gemm_shapes.py            # one JSON line per shape
    python bench/device/gemm_shapes.py --smoke    # tiny shapes on CPU under TRITON_INTERPRET=1 (CI)
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
from bench.device.timing import conditions, graphed_ms_per_call, ms_per_call  # noqa: E402

SHAPES = {"vision_fc1": (32 * 199, 768, 3072), "text_fc1": (4170, 512, 2048)}


def _quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def _quick_gelu_grad(pre, dh):
    s = torch.sigmoid(1.702 * pre)
    return dh * (s + 1.702 * pre * s * (1 - s))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    smoke = "--smoke" in argv
    if smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    from fastprompt.ops.mlp import _pre_activation_grad as linear_act_grad
    from fastprompt.ops.mlp import linear_act

    if smoke:
        device, dtype, n, shapes = torch.device("cpu"), torch.float32, 1, {"tiny_fc1": (40, 64, 128)}
    else:
        device, dtype, n, shapes = torch.device("cuda"), torch.bfloat16, 50, SHAPES
    for name, (rows, k, hidden) in shapes.items():
        x = torch.randn(rows, k, device=device, dtype=dtype)
        w = torch.randn(hidden, k, device=device, dtype=dtype) / k**0.5
        b = torch.randn(hidden, device=device, dtype=dtype)
        dh = torch.randn(rows, hidden, device=device, dtype=dtype)
        plans = {
            "triton": lambda: linear_act(x, w, b, "quick_gelu"),
            "cublas+act": lambda: _quick_gelu(torch.addmm(b, x, w.t())),
            "cublas": lambda: torch.addmm(b, x, w.t()),
            "triton_grad": lambda: linear_act_grad(x, w, b, dh, "quick_gelu"),
            "cublas+act_grad": lambda: _quick_gelu_grad(torch.addmm(b, x, w.t()), dh),
        }
        if device.type == "cuda":
            plans["cublaslt_gelu"] = lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True)
        flops = 2 * rows * k * hidden
        record = {"shape": name, "rows": rows, "k": k, "n": hidden}
        for plan, fn in plans.items():
            ms = graphed_ms_per_call(fn, device, n) if device.type == "cuda" else ms_per_call(fn, device, n)
            record[f"{plan}_ms"] = round(ms, 4)
            record[f"{plan}_tflops"] = round(flops / ms / 1e9, 1)
        record.update(conditions(device, dtype))
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
