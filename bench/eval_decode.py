"""What keeping a test split's pixels saves per evaluation, measured on a CPU (fastprompt.runner.eval_cache).

A folder of JPEGs the size of ImageNet's validation images (500 x 375, quality 90) is evaluated twice through the
runner's evaluation batches (EvalCache.batches, the loader `fastprompt.runner.data.eval_loader` builds, in-process):
the first pass decodes, resizes and crops every image (eval_pixels_transform) and keeps the pixels, the second reads
them back. Both passes normalise on the CPU here (the device, on a GPU). One loader process, so the times are one
core's; a run's workers divide the first pass's time among the cores they get, and nothing divides the work away.

    python -m bench.eval_decode [images] [size]    # a JSON line: seconds and ms per image of each pass
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image


def _write_jpegs(folder: str, count: int) -> list[str]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (375 // 8 + 1, 500 // 8 + 1, 3), dtype=np.uint8)
    paths = []
    for n in range(count):
        # Smooth content with noise, so that the JPEGs are of a photograph's size rather than a flat field's.
        image = Image.fromarray(np.roll(base, n, axis=1)).resize((500, 375), Image.BICUBIC)
        noisy = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (375, 500, 3))
        path = os.path.join(folder, f"{n}.jpg")
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def passes(count: int = 200, size: int = 224) -> dict:
    from fastprompt.data import DatasetSplits
    from fastprompt.data.splits import Sample
    from fastprompt.runner.config import RunConfig
    from fastprompt.runner.data import eval_loader
    from fastprompt.runner.eval_cache import EvalCache, split_key

    with tempfile.TemporaryDirectory() as folder:
        paths = _write_jpegs(folder, count)
        samples = tuple(Sample(path, n % 10, f"class {n % 10}") for n, path in enumerate(paths))
        splits = DatasetSplits(name="jpegs", classnames=tuple(f"class {n}" for n in range(10)), train=(), val=(),
                               test=samples)
        config = RunConfig(eval_batch_size=50)
        cache = EvalCache(1 << 40)
        key = split_key(splits, size)
        seconds = []
        for _ in range(2):
            start = time.perf_counter()
            delivered = sum(labels.shape[0] for _, labels in cache.batches(
                key, lambda: eval_loader(config, splits, size, 0), size, config.eval_batch_size, torch.device("cpu")))
            seconds.append(time.perf_counter() - start)
            if delivered != count:
                raise RuntimeError(f"a pass delivered {delivered} of the {count} images")
        jpeg_bytes = sum(os.path.getsize(path) for path in paths) / count
    return {"images": count, "size": size, "jpeg_kb": round(jpeg_bytes / 1024, 1), "threads": torch.get_num_threads(),
            "decode_pass_s": round(seconds[0], 5), "kept_pass_s": round(seconds[1], 5),
            "decode_ms_per_image": round(seconds[0] / count * 1e3, 2),
            "kept_ms_per_image": round(seconds[1] / count * 1e3, 3)}


def main(argv=None) -> int:
    from .proxy import run_measurement

    return run_measurement(passes, (200, 224), argv)


if __name__ == "__main__":
    sys.exit(main())
