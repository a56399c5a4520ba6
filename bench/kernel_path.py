"""The GPU kernel path's launches per training step, counted on a CPU: the host-overhead proxy that matches the GPU.

bench/host.py counts the ops of a step on a CPU, where the fast path runs PyTorch ops (no Triton there), so its
fastprompt numbers describe another op sequence than a GPU runs. This counts the sequence an eager step runs on the
GPU: the model is patched with backend='triton' (allowed on a CPU under TRITON_INTERPRET=1) and one whole training
step (forward, loss, backward, the guarded fused optimizer step, the device totals) runs under a FakeTensorMode, so
nothing computes and ViT-B/16 at the benchmark's own workload (C = 1000 real ImageNet names, B = 32) is a matter of
seconds. Two things make the fake step take the eager GPU path rather than the traced one:
- fastprompt's gate `direct_call_ok` answers as it does for an eager step on a GPU (True). It says False under any
  Python dispatch mode, fake tensors included, which would send every op through its registered torch op (the
  path torch.compile takes: other autograd nodes, and the GEMMs and launches inside a custom op out of sight);
- every Triton launch is counted per kernel and made a no-op (as in bench/kernel_host.py).
So the counts are: Triton launches, aten ops that launch a kernel on a GPU (each dispatched op below autograd that
is not a view, an allocation or other metadata: NO_KERNEL), and those that launch none. The sum of the first two is
the kernels a step launches, the figure issue 9's "launches per step" and the host budget per launch are about. In fp32
without autocast: the interpreter's launchers take fp32 on a CPU; on a GPU the step runs the same ops on bf16
tensors (the blocks cast explicitly, and casts to the same dtype are free).

The second of two steps is counted (the first fills what a run computes once: frozen teacher features, the
packing's device copies); `prim::device` queries of fake tensors are not counted. What it cannot see: the cost of
each launch, which the GPU run measures (bench/device/host_gpu.py).

    TRITON_INTERPRET=1 python -m bench.kernel_path maple,coop [classes] [batch] [backbone]   # a JSON line each
"""

from __future__ import annotations

import json
import os
import sys

import torch

WORKLOAD_CLASSES, WORKLOAD_BATCH = 1000, 32
# Dispatched ops that launch no kernel on a GPU besides the views: allocations (the caching allocator's), the host-side
# scalars torch.where wraps its Python numbers in, and the profiler's record_function markers.
NO_KERNEL = frozenset({"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty",
                       "aten::new_empty_strided", "aten::scalar_tensor", "profiler::_record_function_enter_new",
                       "profiler::_record_function_exit"})


def _eager_gates(answer):
    """Every loaded module's `direct_call_ok` (fastprompt.ops._library's, and each module that imported it by name)
    replaced by `answer`; returns a function that puts the originals back."""
    from fastprompt.ops import _library

    original = _library.direct_call_ok
    holders = [module for module in list(sys.modules.values())
               if module is not None and getattr(module, "direct_call_ok", None) is original]
    for module in holders:
        module.direct_call_ok = answer

    def restore():
        for module in holders:
            module.direct_call_ok = original

    return restore


def count(method: str, classes: int = WORKLOAD_CLASSES, batch: int = WORKLOAD_BATCH, backbone: str = "ViT-B-16"):
    from torch._subclasses.fake_tensor import FakeTensorMode

    import fastprompt
    from fastprompt.backbones import create_clip
    from fastprompt.ops import gemm_plan
    from fastprompt.training import TrainStep, make_optimizer

    from .host import OpCounter
    from .proxy import classnames, counted_triton_launches

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
    restore_gates = _eager_gates(lambda x: True)
    counter = OpCounter()
    try:
        # Each Triton launch counted, no kernel run.
        with counted_triton_launches() as launches, FakeTensorMode(allow_non_fake_inputs=True):
            step(images, labels)  # warm-up: what a run computes once (frozen teacher features, device copies)
            launches.clear()
            with counter:
                step(images, labels)
    finally:
        restore_gates()
    counter.ops.pop("prim::device", None)  # fake tensors' device queries: no op on a GPU
    summary = counter.summary()
    triton = sum(launches.values())
    no_kernel = sum(n for op, n in counter.ops.items() if op in NO_KERNEL)
    aten = summary["ops_launch"] - no_kernel
    return {"method": method, "classes": classes, "batch": batch, "backbone": backbone,
            "mlp_gemm": mlp_gemm, "path": "eager",
            "kernel_path_launches_per_step": triton + aten,
            "kernel_path_triton_launches": triton, "kernel_path_ops_launch": aten,
            "kernel_path_ops_no_kernel": no_kernel + summary["ops_view"],
            "kernel_path_ops_custom": summary["ops_custom"],
            "kernel_path_ops_top": summary["ops_top"], "kernel_path_triton": dict(sorted(launches.items())),
            "kernel_path_ops": dict(counter.ops)}


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
