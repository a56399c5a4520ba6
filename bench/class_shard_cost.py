"""What class-sharded text (fastprompt.parallel.class_shard) saves per rank, measured on this CPU.

Rank 0 holds the largest slice (ceil(C / N) classes), so its text pass sets the step. For each N this script
builds the model over that slice alone: it is exactly the model the sharded rank runs (the same packed text
tower, with PyTorch ops), with no process group needed. It reports:

- text rows: the token rows every text layer computes (the shared prefix once, plus the slice's packed
  SOS..EOT suffixes). Exact, and independent of the machine.
- saved MiB: the bytes autograd keeps for the text pass's backward (fastprompt.memory.saved_tensor_bytes).
  Exact for this dtype.
- fwd+bwd ms: the median wall time of the text forward and backward on this CPU. Use it for the trend in N
  only, not as a GPU number.
- gather MiB: what the sharding adds per step, the all_gather of the [C, E] features plus the fp32 all_reduce
  of their gradient (each counted once, as the tensor size).

    python -m bench.class_shard_cost                           # MaPLe, ViT-B/16 text, 1000 ImageNet classes
    python -m bench.class_shard_cost --classes 200 --ranks 1 2 4 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastprompt
from fastprompt.backbones import create_clip
from fastprompt.memory import saved_tensor_bytes
from fastprompt.parallel.class_shard import class_slices


def imagenet_names(count: int) -> list[str]:
    from open_clip import IMAGENET_CLASSNAMES

    if count > len(IMAGENET_CLASSNAMES):
        raise SystemExit(f"--classes {count}: only {len(IMAGENET_CLASSNAMES)} ImageNet class names exist")
    return list(IMAGENET_CLASSNAMES[:count])


def measure(clip, method: str, names: list[str], ranks: int, repeats: int) -> dict:
    start, stop = class_slices(len(names), ranks)[0]
    model = fastprompt.build(method, clip, names[start:stop], text_path="packed")
    model.train()
    packed = model.packed_text()
    # Every weight is left out (frozen ones are saved for the input gradient, but they exist anyway).
    saved, (features, _) = saved_tensor_bytes(model.encode_text, exclude=list(model.parameters()))
    del features
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        features, _ = model.encode_text()
        features.float().sum().backward()
        times.append(time.perf_counter() - began)
    embed = clip.text_projection.shape[1]
    gather = len(names) * embed * (features.element_size() + 4)
    return {"ranks": ranks, "classes": stop - start, "rows": packed.prefix_len + packed.total_tokens,
            "saved_mib": saved / 2**20, "ms": 1e3 * statistics.median(times), "gather_mib": gather / 2**20}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="maple")
    parser.add_argument("--backbone", default="ViT-B-16")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--repeats", type=int, default=2)
    # One thread by default: on a small shared CPU, intra-op thread hand-offs cost more than these matmuls.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clip = create_clip(args.backbone)
    names = imagenet_names(args.classes)
    print(f"{args.method}, {args.backbone} text, C = {args.classes}, fp32, this CPU"
          f" ({torch.get_num_threads()} threads)")
    print("| N | classes on rank 0 | text rows | saved MiB | fwd+bwd ms | gather MiB |")
    print("|---|---|---|---|---|---|")
    for ranks in args.ranks:
        r = measure(clip, args.method, names, ranks, args.repeats)
        print(f"| {r['ranks']} | {r['classes']} | {r['rows']} | {r['saved_mib']:.1f} | {r['ms']:.0f} |"
              f" {r['gather_mib']:.2f} |")


if __name__ == "__main__":
    main()
