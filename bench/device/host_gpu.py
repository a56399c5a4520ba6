"""Host time vs GPU time of the fastprompt training step (target: wall time without a graph <= 1.3x GPU time).

GPU time = the CUDA-graph replay of the step (no host work inside it); wall = the same step, same model and
optimizer, through TrainStep(cuda_graph=False); host = the CPU time of issuing it. GPU only. From the repo root:
    python bench/device/host_gpu.py maple,coop imagenet-b32        # writes $OUT/host_gpu.json (or /tmp)
"""
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
from bench.contenders import build_contender  # noqa: E402
from bench.workloads import WORKLOADS  # noqa: E402
from fastprompt.training import TrainStep  # noqa: E402

methods, workload = sys.argv[1].split(","), WORKLOADS[sys.argv[2]]
dev = torch.device("cuda")
out = []


def timed(step, images, labels, n=20, rounds=3):
    per = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            step(images, labels)
        torch.cuda.synchronize()
        per.append((time.perf_counter() - t) / n * 1e3)
    return statistics.median(per)


for method in methods:
    model, step = build_contender("fastprompt", method, workload.classnames(), backbone=workload.backbone,
                                  device=dev, amp_dtype=torch.bfloat16)
    h, w = model.info.image_size
    images = torch.randn(workload.batch, 3, h, w, device=dev)
    labels = torch.randint(0, workload.classes, (workload.batch,), device=dev)
    for _ in range(5):
        step(images, labels)
    graph_ms = timed(step, images, labels)
    mode = step.mode
    eager = TrainStep(model, step.optimizer, amp_dtype=torch.bfloat16, cuda_graph=False)
    for _ in range(3):
        eager(images, labels)
    wall_ms = timed(eager, images, labels)
    # host time alone: the CPU time of issuing one step (the GPU queue is deep enough not to block for a few steps)
    torch.cuda.synchronize()
    t = time.process_time()
    for _ in range(5):
        eager(images, labels)
    host_ms = (time.process_time() - t) / 5 * 1e3
    torch.cuda.synchronize()
    rec = dict(method=method, workload=workload.name, graph_mode=mode, gpu_ms_graph=round(graph_ms, 3),
               wall_ms_no_graph=round(wall_ms, 3), host_cpu_ms_no_graph=round(host_ms, 3),
               ratio=round(wall_ms / graph_ms, 3))
    print(json.dumps(rec), flush=True)
    out.append(rec)
    del model, step, eager
    torch.cuda.empty_cache()
with open(os.path.join(os.environ.get("OUT", "/tmp"), "host_gpu.json"), "w") as f:
    json.dump(out, f, indent=1)
