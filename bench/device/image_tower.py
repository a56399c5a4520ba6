"""What bounds inference at batch 100: MaPLe's forward in eval mode under bf16 autocast with four plans
(fastprompt.patch auto = Triton on CUDA; the same with last_layer='full', i.e. the image tower's last block on every
row instead of the CLS rows; patch(backend='sdpa'); unpatched), each plain and CUDA-graphed. GPU only.
From the repo root:  python bench/device/image_tower.py [method] [batch]
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
import fastprompt  # noqa: E402
from bench.workloads import WORKLOADS  # noqa: E402
from fastprompt.backbones import create_clip  # noqa: E402

method = sys.argv[1] if len(sys.argv) > 1 else "maple"
batch = int(sys.argv[2]) if len(sys.argv) > 2 else 100
names = WORKLOADS["imagenet-b32"].classnames()
dev = torch.device("cuda")


def timed(fn, n=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n


images = torch.randn(batch, 3, 224, 224, device=dev)
for plan in ("auto", "auto-full", "sdpa", "unpatched"):
    clip = create_clip("ViT-B-16", precision="bf16", device=dev)
    if plan != "unpatched":
        fastprompt.patch(clip, backend=plan.removesuffix("-full"))
    model = fastprompt.build(method, clip, names, last_layer="full" if plan.endswith("-full") else "auto").eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        plain = timed(lambda: model(images))
        static = images.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model(static)  # fills the inference cache outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(static)
        graphed = timed(graph.replay)
    print(f"{method} B={batch} plan={plan:9} model(x) {batch / plain:7.0f} img/s ({plain * 1e3:5.2f} ms)  "
          f"graphed {batch / graphed:7.0f} img/s ({graphed * 1e3:5.2f} ms)", flush=True)
    del model, clip
    torch.cuda.empty_cache()
