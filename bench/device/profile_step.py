"""Where a fastprompt training step's GPU time goes: the kernels of a few steps by device time (torch.profiler), for
the methods furthest from issue 9's targets. The step is the benchmark's `fastprompt` contender run without its CUDA
graph (a replay would show as one opaque event); its graph replay time is printed beside the profiled steps' device
time, so the table's share of the real step is known. From the repo root:

    python bench/device/profile_step.py mcpl imagenet-b32           # GPU: $OUT/profile_<method>_<workload>.txt
    python bench/device/profile_step.py coop tiny-c4-b8 --smoke     # CPU, tiny (the CI check that it still runs)

Each table's first line is a JSON record: graph and no-graph milliseconds per step and the profiled device time.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
from bench.contenders import build_contender  # noqa: E402
from bench.device.timing import median_ms_per_call  # noqa: E402
from bench.workloads import CPU_WORKLOADS, WORKLOADS  # noqa: E402
from fastprompt.training import TrainStep  # noqa: E402


def profile_method(method: str, workload, device: torch.device, out_dir: str, steps: int = 3) -> dict:
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model, graphed = build_contender("fastprompt", method, workload.classnames(), backbone=workload.backbone,
                                     device=device, amp_dtype=torch.bfloat16 if cuda else None)
    h, w = model.info.image_size
    images = torch.randn(workload.batch, 3, h, w, device=device)
    labels = torch.randint(0, workload.classes, (workload.batch,), device=device)
    for _ in range(5):
        graphed(images, labels)
    n = 10 if cuda else 1
    graph_ms = median_ms_per_call(lambda: graphed(images, labels), device, n)
    eager = TrainStep(model, graphed.optimizer, amp_dtype=graphed.amp_dtype, cuda_graph=False)
    for _ in range(2):
        eager(images, labels)
    eager_ms = median_ms_per_call(lambda: eager(images, labels), device, n)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            eager(images, labels)
        sync()
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    try:
        table = events.table(sort_by=key, row_limit=45, max_name_column_width=80)
    except Exception:  # noqa: BLE001 - torch before 2.4 names it after CUDA
        key = "self_cuda_time_total"
        table = events.table(sort_by=key, row_limit=45, max_name_column_width=80)
    device_ms = sum(getattr(e, key, 0) for e in events) / steps / 1e3
    record = {"method": method, "workload": workload.name, "mode": graphed.mode, "graph_ms_per_step": round(graph_ms, 3),
              "no_graph_ms_per_step": round(eager_ms, 3), "profiled_self_ms_per_step": round(device_ms, 3),
              "profiled": "device" if cuda else "cpu", "device": torch.cuda.get_device_name(device) if cuda else "cpu",
              "torch": torch.__version__}
    path = os.path.join(out_dir, f"profile_{method}_{workload.name}.txt")
    with open(path, "w") as f:
        f.write(json.dumps(record) + f"\n({steps} no-graph steps profiled; sorted by {key})\n{table}\n")
    return record


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    smoke = "--smoke" in argv
    args = [a for a in argv if a != "--smoke"]
    methods = args[0].split(",") if args else ["mcpl"]
    name = args[1] if len(args) > 1 else ("tiny-c4-b8" if smoke else "imagenet-b32")
    workload = {w.name: w for w in CPU_WORKLOADS}[name] if smoke else WORKLOADS[name]
    device = torch.device("cpu" if smoke else "cuda")
    out_dir = os.environ.get("OUT", "/tmp")
    for method in methods:
        print(json.dumps(profile_method(method, workload, device, out_dir, steps=1 if smoke else 3)), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
