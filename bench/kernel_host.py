"""Host time of the GPU kernel path's training step, measured on a CPU: the host-overhead proxy that runs real code.

bench/kernel_path.py counts the ops a GPU step dispatches; this times the Python and dispatcher work behind them. The
model is patched with the Triton kernels (allowed on a CPU under TRITON_INTERPRET=1) and every Triton launch is made a
no-op, so a training step (forward, loss, backward, the guarded fused optimizer step) runs all of fastprompt's
wrappers, launchers, autograd Functions and aten ops for real, and no kernel. The backbone has ViT-B/16's depth (12 +
12 blocks, 77-token causal text, the real tokenizer and 1,000 ImageNet names) at width 64 with one head of 64, so the
aten arithmetic that remains is small beside the host work. What it cannot see: the GPU launcher's own cost per
Triton launch (a C call here stubbed away) and the GPU's time; bench/device/host_gpu.py measures those on a GPU.

    python -m bench.kernel_host maple,coop [classes] [batch]     # a JSON line per method: median host ms per step

Each record also counts the Python and C function calls of one step (bench.host.python_calls): milliseconds on a
shared 2-core machine vary by up to 40 % between runs, the call counts not at all, so they show a change that the
times cannot resolve.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import warnings
from collections import Counter

import torch

BACKBONE = "kernel-host-proxy"
CONFIG = dict(
    embed_dim=64,
    vision_cfg=dict(image_size=32, layers=12, width=64, patch_size=8, head_width=64, mlp_ratio=1),
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=12, mlp_ratio=1),
)


def host_ms_per_step(method: str, classes: int = 100, batch: int = 2, steps: int = 15, warmup: int = 3) -> dict:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("run with TRITON_INTERPRET=1: patch(backend='triton') is refused on a CPU otherwise")
    import triton.runtime.interpreter as interpreter

    import fastprompt
    from fastprompt.backbones import TINY_CONFIGS, create_clip
    from fastprompt.ops import gemm_plan
    from fastprompt.training import TrainStep, make_optimizer

    from .host import classnames, python_calls, step_seconds

    launches: Counter = Counter()

    def count_launch(self, *args, **kwargs):  # every launch: counted, no kernel runs
        launches[self.fn.__name__] += 1

    interpreter.InterpretedFunction.run = count_launch
    TINY_CONFIGS.setdefault(BACKBONE, CONFIG)
    clip = create_clip(BACKBONE, precision="fp32", device="cpu")
    # The frozen MLP's first-GEMM plan a CUDA device takes (fastprompt.ops.gemm_plan), not the CPU's: the op
    # sequence is the GPU's.
    mlp_gemm = gemm_plan.default_plan("cuda")
    fastprompt.patch(clip, backend="triton", mlp_gemm=mlp_gemm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ImageNet's duplicate class names
        model = fastprompt.build(method, clip, classnames(classes))
    model.train()
    step = TrainStep(model, make_optimizer(model.trainable_parameters(), "sgd", lr=2e-3))
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, *model.info.image_size, generator=generator)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    times = [seconds * 1e3 for seconds in step_seconds(step, images, labels, steps, warmup)]
    launches.clear()
    calls = python_calls(step, images, labels)
    return {"method": method, "classes": classes, "batch": batch, "backbone": BACKBONE,
            "mlp_gemm": mlp_gemm,
            "host_ms_per_step": round(statistics.median(times), 2), "host_ms_min": round(min(times), 2),
            "steps": steps, "threads": torch.get_num_threads(), **calls,
            "triton_launches_per_step": sum(launches.values()), "triton_launches": dict(sorted(launches.items()))}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    methods = argv[0].split(",") if argv else ["maple"]
    classes = int(argv[1]) if len(argv) > 1 else 100
    batch = int(argv[2]) if len(argv) > 2 else 2
    torch.set_num_threads(1)
    for method in methods:
        print(json.dumps(host_ms_per_step(method, classes, batch)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
