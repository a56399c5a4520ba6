"""Host time vs GPU time of the fastprompt training step (target: wall time without a graph <= 1.3x GPU time).

GPU time = the CUDA-graph replay of the step (no host work inside it); wall = the same step, same model and
optimizer, through TrainStep(cuda_graph=False); host = the CPU time of issuing it; and the wall time of that step
with every Triton launch through Triton's own launch path (fastprompt.kernels._launch off). On a GPU; from the repo
root:
    python bench/device/host_gpu.py maple,coop imagenet-b32        # writes $OUT/host_gpu.json (or /tmp)
    python bench/device/host_gpu.py maple tiny-c4-b8 --smoke        # CPU, tiny: CI keeps the script runnable
It also writes $OUT/host_gpu_profile_<method>.txt: cProfile of a few no-graph steps on the GPU machine's own host
(the functions by own time and by cumulative time), which says where the host time goes there: Triton's launcher,
the autograd engine, aten ops, our wrappers. cProfile slows Python calls, so read shares, not milliseconds.
"""
import cProfile
import io
import json
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
from bench.contenders import build_contender  # noqa: E402
from bench.device.timing import median_ms_per_call  # noqa: E402
from bench.workloads import CPU_WORKLOADS, WORKLOADS  # noqa: E402
from fastprompt.training import TrainStep  # noqa: E402

smoke = "--smoke" in sys.argv
methods = sys.argv[1].split(",")
workload = {w.name: w for w in CPU_WORKLOADS}[sys.argv[2]] if smoke else WORKLOADS[sys.argv[2]]
dev = torch.device("cpu" if smoke else "cuda")
amp = None if smoke else torch.bfloat16
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
out = []


def timed(step, images, labels, n=2 if smoke else 20):
    return median_ms_per_call(lambda: step(images, labels), dev, n)


for method in methods:
    model, step = build_contender("fastprompt", method, workload.classnames(), backbone=workload.backbone,
                                  device=dev, amp_dtype=amp)
    h, w = model.info.image_size
    images = torch.randn(workload.batch, 3, h, w, device=dev)
    labels = torch.randint(0, workload.classes, (workload.batch,), device=dev)
    for _ in range(5):
        step(images, labels)
    graph_ms = timed(step, images, labels)
    mode = step.mode
    eager = TrainStep(model, step.optimizer, amp_dtype=amp, cuda_graph=False)
    for _ in range(3):
        eager(images, labels)
    wall_ms = timed(eager, images, labels)
    # host time alone: the CPU time of issuing one step (the GPU queue is deep enough not to block for a few steps)
    sync()
    t = time.process_time()
    for _ in range(5):
        eager(images, labels)
    host_ms = (time.process_time() - t) / 5 * 1e3
    sync()
    # The same no-graph step with every Triton launch through Triton's own JITFunction.run (fastprompt.kernels.
    # _launch off): what the direct launch path saves on this host.
    from fastprompt.kernels import _launch

    direct = _launch.ENABLED
    _launch.ENABLED = False
    try:
        wall_triton_ms = timed(eager, images, labels)
    finally:
        _launch.ENABLED = direct
    rec = dict(method=method, workload=workload.name, graph_mode=mode, gpu_ms_graph=round(graph_ms, 3),
               wall_ms_no_graph=round(wall_ms, 3), host_cpu_ms_no_graph=round(host_ms, 3),
               ratio=round(wall_ms / graph_ms, 3), direct_launch=direct,
               wall_ms_no_graph_triton_launch=round(wall_triton_ms, 3))
    print(json.dumps(rec), flush=True)
    out.append(rec)
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(5):
        eager(images, labels)
    sync()
    profile.disable()
    text = io.StringIO()
    stats = pstats.Stats(profile, stream=text)
    text.write(f"{method} {workload.name}: 5 no-graph steps under cProfile\n")
    stats.sort_stats("tottime").print_stats(45)
    stats.sort_stats("cumulative").print_stats(30)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), f"host_gpu_profile_{method}.txt"), "w") as f:
        f.write(text.getvalue())
    del model, step, eager
    if dev.type == "cuda":
        torch.cuda.empty_cache()
with open(os.path.join(os.environ.get("OUT", "/tmp"), "host_gpu.json"), "w") as f:
    json.dump(out, f, indent=1)
