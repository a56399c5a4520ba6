"""The GPU kernel path's ops per training step, counted on a CPU: the host-overhead proxy that matches the GPU.

bench/host.py counts the ops of a step on a CPU, where the fast path runs PyTorch ops (no Triton there), so its
fastprompt numbers describe another op sequence than a GPU runs. This counts the sequence the GPU runs: the model is
patched with backend='triton' (allowed on a CPU under TRITON_INTERPRET=1) and one whole training step (forward,
loss, backward, the guarded fused optimizer step, the device totals) runs under a FakeTensorMode, so every op is
dispatched exactly as on the GPU but none computes: fastprompt's custom ops go to their fake implementations and no
kernel runs. That makes ViT-B/16 at the benchmark's own workload (C = 1000 real ImageNet names, B = 32) a matter
of seconds. In fp32 without autocast: the interpreter's kernels take fp32 only, so the patch refuses bf16 here; on a
GPU the step runs the same ops on bf16 tensors (the blocks cast explicitly, and casts to the same dtype are free).

The second of two steps is counted (the first fills what a run computes once: frozen teacher features, the
packing's device copies). Counted per step: fastprompt custom-op calls (each one or a few Triton launches on a GPU), launch ops (each an aten
kernel launch on a GPU) and view/metadata ops (no kernel); `prim::device` queries of fake tensors are not counted.
What it cannot see: the cost of each call (Triton's launcher, the custom-op dispatch), which the GPU run measures
(bench/device/host_gpu.py).

    TRITON_INTERPRET=1 python -m bench.kernel_path maple,coop [classes] [batch] [backbone]   # a JSON line each
"""

from __future__ import annotations

import json
import os
import sys

import torch

WORKLOAD_CLASSES, WORKLOAD_BATCH = 1000, 32


def count(method: str, classes: int = WORKLOAD_CLASSES, batch: int = WORKLOAD_BATCH, backbone: str = "ViT-B-16"):
    from torch._subclasses.fake_tensor import FakeTensorMode

    import fastprompt
    from fastprompt.backbones import create_clip
    from fastprompt.ops import gemm_plan
    from fastprompt.training import TrainStep, make_optimizer

    from .host import OpCounter, classnames

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("run with TRITON_INTERPRET=1: patch(backend='triton') is refused on a CPU otherwise")
    names = classnames(classes)
    clip = create_clip(backbone, precision="fp32", device="cpu")
    # The frozen MLP's first-GEMM plan a CUDA device takes (fastprompt.ops.gemm_plan), not the CPU's: the op
    # sequence is the GPU's.
    mlp_gemm = gemm_plan.default_plan("cuda")
    fastprompt.patch(clip, backend="triton", mlp_gemm=mlp_gemm)
    model = fastprompt.build(method, clip, names)
    model.train()
    model.packed_text()  # the class set's packing metadata is built (read from the host) once, before any step
    step = TrainStep(model, make_optimizer(model.trainable_parameters(), "sgd", lr=2e-3))
    generator = torch.Generator().manual_seed(0)
    size = model.info.image_size
    images = torch.randn(batch, 3, *size, generator=generator)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    counter = OpCounter()
    with FakeTensorMode(allow_non_fake_inputs=True):
        step(images, labels)  # warm-up: what a run computes once (frozen teacher features, device copies) is cached
        with counter:
            step(images, labels)
    counter.ops.pop("prim::device", None)  # fake tensors' device queries: no op on a GPU
    summary = counter.summary()
    return {"method": method, "classes": classes, "batch": batch, "backbone": backbone,
            "mlp_gemm": mlp_gemm,
            "kernel_path_ops_per_step": summary["ops_per_step"], "kernel_path_ops_custom": summary["ops_custom"],
            "kernel_path_ops_launch": summary["ops_launch"], "kernel_path_ops_view": summary["ops_view"],
            "kernel_path_ops_top": summary["ops_top"], "kernel_path_ops": dict(counter.ops)}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    methods = argv[0].split(",") if argv else ["maple"]
    classes = int(argv[1]) if len(argv) > 1 else WORKLOAD_CLASSES
    batch = int(argv[2]) if len(argv) > 2 else WORKLOAD_BATCH
    backbone = argv[3] if len(argv) > 3 else "ViT-B-16"
    torch.set_num_threads(1)
    for method in methods:
        print(json.dumps(count(method, classes, batch, backbone)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
