"""Issue 9 item 2 on the GPU: which GEMM plan runs the frozen MLP's first layer fastest at the step's shapes.

The frozen CLIP MLP is fc1 + QuickGELU + fc2 per block; fastprompt.ops.mlp runs fc1 + bias + activation on one of
two plans (`gemm`, chosen per device type by fastprompt.ops.gemm_plan) and fc2 with cuBLAS (`addmm`). This times,
at the ImageNet step's rows (vision: B = 32 images of 199 tokens at width 768; text: MaPLe's 4,170 packed tokens
at 512; the B = 4 step's vision rows) and the image tower's at inference (B = 100), the forward fc1 + activation as
  * triton      the product's "triton" plan: fastprompt's linear_act GEMM, bias and QuickGELU in its epilogue,
  * cublas_plan the product's "cublas" plan: torch.addmm (cuBLAS, bias fused), then the in-place Triton activation,
  * cublas+act  torch.addmm then QuickGELU as PyTorch ops (three elementwise kernels: what not to do),
  * cublas      torch.addmm alone (the GEMM without the activation: a floor for any cuBLAS-based plan),
  * cublaslt    torch._addmm_activation(..., use_gelu=True) (cuBLASLt's GELU epilogue; tanh GELU, not QuickGELU,
                so a speed reference for an epilogue, not a replacement),
and the backward recompute of each (`<plan>_grad`: the pre-activation's gradient g * act'(x W^T + b)). Each as a
CUDA graph replay (GPU time), in TFLOP/s of the GEMM; `faster_plan` names the product plan with the lower forward +
backward time, what fastprompt.ops.gemm_plan's entry for the device should say. From the repo root on the GPU:

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

# The training step's two fc1 shapes, the papers' B = 4 step's vision fc1 (few rows: where a GEMM with the activation
# in its epilogue may win by saving a launch), and the image tower's at inference (batch 100, what `inference` times).
SHAPES = {"vision_fc1": (32 * 199, 768, 3072), "text_fc1": (4170, 512, 2048),
          "vision_fc1_b4": (4 * 199, 768, 3072), "vision_fc1_b100": (100 * 199, 768, 3072)}


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
    from fastprompt.ops.mlp import _fc_activation, _pre_activation_grad

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
            "triton": lambda: _fc_activation(x, w, b, "quick_gelu", "triton"),
            "cublas_plan": lambda: _fc_activation(x, w, b, "quick_gelu", "cublas"),
            "cublas+act": lambda: _quick_gelu(torch.addmm(b, x, w.t())),
            "cublas": lambda: torch.addmm(b, x, w.t()),
            "triton_grad": lambda: _pre_activation_grad(x, w, b, dh, "quick_gelu", "triton"),
            "cublas_plan_grad": lambda: _pre_activation_grad(x, w, b, dh, "quick_gelu", "cublas"),
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
        totals = {plan: record[f"{key}_ms"] + record[f"{key}_grad_ms"]
                  for plan, key in (("triton", "triton"), ("cublas", "cublas_plan"))}
        record["faster_plan"] = min(totals, key=totals.__getitem__)
        record.update(conditions(device, dtype))
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
