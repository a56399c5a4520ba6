"""On a GPU machine: `torchrun --nproc_per_node 1 -m fastprompt train` equals the plain `fastprompt train` (issue 12).

Runs the same tiny procedural run three times on cuda: plain, plain again, and under a one-process torchrun, then
compares the checkpoints. GPU kernels may sum in a different order from run to run (atomics in some backward
kernels), so the torchrun run must be as close to the plain run as the plain run is to itself (plus float
rounding), not necessarily bit-identical. Prints one JSON line; exit 1 when the comparison fails.

    python3 bench/device/torchrun_one.py [OUT_DIR]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

ARGS = ["train", "--method", "maple", "--dataset", "procedural", "dataset.num_test_per_class=2",
        "dataset.num_val_per_class=1", "--shots", "4", "--seeds", "1", "backbone=tiny", "pretrained=none",
        "device=cuda", "num_workers=0", "precision=bf16", "epochs=2", "batch_size=4"]


def _run(prefix: list[str], out: str) -> None:
    subprocess.run([*prefix, *ARGS, f"output_dir={out}"], check=True, stdout=subprocess.DEVNULL)


def _max_difference(a: str, b: str) -> float:
    from safetensors.torch import load_file

    x, y = (load_file(os.path.join(path, "seed1", "checkpoint.safetensors")) for path in (a, b))
    assert x.keys() == y.keys(), (sorted(x), sorted(y))
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x) if x else 0.0


def main() -> int:
    root = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()
    plain = [sys.executable, "-m", "fastprompt"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m",
                "fastprompt"]
    runs = {name: os.path.join(root, name) for name in ("plain", "plain-again", "torchrun-1")}
    _run(plain, runs["plain"])
    _run(plain, runs["plain-again"])
    _run(torchrun, runs["torchrun-1"])
    noise = _max_difference(runs["plain"], runs["plain-again"])
    gap = _max_difference(runs["plain"], runs["torchrun-1"])
    ok = gap <= 2 * noise + 1e-6
    print(json.dumps({"plain_vs_plain": noise, "plain_vs_torchrun_1": gap, "equal": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
