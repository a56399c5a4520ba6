"""Which GEMM runs the frozen MLP's first layer with the Triton kernels, and the measurement behind the choice.

The frozen CLIP MLP is fc1 + activation + fc2 per block, 24 per ViT-B/16 step, and fc1 with its backward recompute
is the largest GEMM work of a prompt-learning step. fastprompt.ops.mlp runs fc1 on one of two plans (`gemm`):

* ``triton``  fastprompt's Triton GEMM with the bias and the activation (backward: the gradient's product) in its
              epilogue: one kernel, no extra pass over the 4x-wide hidden;
* ``cublas``  ``torch.addmm`` (cuBLAS, the bias fused in its epilogue) and one in-place elementwise Triton pass for
              the activation (backward: the gradient's product): one more read and write of the hidden.

Both save only the MLP's input. Which is faster is a question of GEMM efficiency against that extra pass, so the
choice on a device type follows a measurement kept here with its device, date, commit and source, like the
attention order in fastprompt.ops.backends; device types without one (CPU under the interpreter, for tests) take
``triton``, the plan the kernel tests were first written for.
"""

from __future__ import annotations

from dataclasses import dataclass

PLANS = ("triton", "cublas")


@dataclass(frozen=True)
class GemmMeasurement:
    """The evidence a device type's plan follows."""

    device: str
    device_type: str
    date: str
    commit: str
    source: str
    plan: str
    figures: str  # what was measured, in words and numbers

    def label(self) -> str:
        return f"{self.device}, {self.date}, commit {self.commit} ({self.source})"


# From the profiler table of the MaPLe C = 1000, B = 32 fastprompt step (bf16, three steps profiled; per step:
# 24 fc1 forwards + 24 backward recomputes on the Triton GEMM, 72 forward addmm for every other projection).
# Triton's fc1: linear_act_kernel 10.730 ms in 144 launches, of which fastprompt::linear_act_grad 6.354 ms in 72:
# forward 1.459 ms per step for 465.6 GFLOP (12 x (6,368 x 768 x 3,072 + 4,170 x 512 x 2,048) x 2) = 319 TFLOP/s,
# gradient mode 2.118 ms = 220 TFLOP/s. The same step's cuBLAS addmm (vision and text qkv, out-proj and fc2):
# 4.696 ms in 216 calls, 1.565 ms per step for 931 GFLOP = 595 TFLOP/s. At that rate cuBLAS's fc1 takes ~0.78 ms,
# and the elementwise passes move ~1.35 GB forward and ~2.0 GB backward per step (~0.85 ms at 4 TB/s): ~2.4 ms
# against Triton's 3.6 ms. That is an inference from a step profile, not a timing of both plans at fc1's shapes:
# bench/device/gemm_shapes.py times exactly that (both plans of fastprompt.ops.mlp, forward and backward), and its
# result replaces this entry.
H200_2026_11_27 = GemmMeasurement(
    device="NVIDIA H200", device_type="cuda", date="2026-11-27", commit="e536e88",
    source="shared/gpu/2026-11-27/profile-maple-imagenet-b32-fastprompt-auto.txt", plan="cublas",
    figures="Triton fc1 GEMM 319 TFLOP/s forward, 220 TFLOP/s in gradient mode; the step's cuBLAS addmm 595 TFLOP/s",
)
MEASUREMENTS = (H200_2026_11_27,)  # newest first per device type
_UNMEASURED_PLAN = "triton"


def measurement_for(device_type: str) -> GemmMeasurement | None:
    return next((m for m in MEASUREMENTS if m.device_type == device_type), None)


def default_plan(device_type: str) -> str:
    """The plan `fastprompt.patch(..., mlp_gemm='auto')` takes on this device type."""
    measurement = measurement_for(device_type)
    return measurement.plan if measurement is not None else _UNMEASURED_PLAN


def resolve(mlp_gemm: str, device_type: str) -> tuple[str, str]:
    """(plan, why) for a requested plan ('auto', 'triton' or 'cublas') on a device type."""
    if mlp_gemm not in ("auto", *PLANS):
        raise ValueError(f"mlp_gemm must be 'auto', 'triton' or 'cublas', got {mlp_gemm!r}")
    if mlp_gemm != "auto":
        return mlp_gemm, f"MLP first GEMM: {mlp_gemm} (requested)"
    measurement = measurement_for(device_type)
    if measurement is None:
        return _UNMEASURED_PLAN, f"MLP first GEMM: {_UNMEASURED_PLAN} (no measurement for {device_type})"
    return measurement.plan, (f"MLP first GEMM: {measurement.plan} (chosen from {measurement.label()}: "
                              f"{measurement.figures})")
