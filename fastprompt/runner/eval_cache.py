"""The runner's evaluation batches: uint8 pixels from the loader, normalised on the device, kept between evaluations.

Evaluating is decoding: a ViT-B/16 scores thousands of images a second on a GPU, while the loader's workers decode
and resize JPEGs at a few hundred a second each, so an ImageNet test pass (50,000 images) takes tens of seconds of
loading for a few seconds of model. A run evaluates the same test split once per seed (three by default), again
every `eval_every` epochs, and `fastprompt eval` once per checkpoint. So:

- The loader's workers hand over eval_transform's pixels as uint8 (fastprompt.data.eval_pixels_transform): a quarter
  of the bytes of normalised float32 to pass between processes and to copy to the device, where
  `normalise_pixels` gives exactly eval_transform's values (the same fp32 operations; a test holds them equal).
- An EvalCache keeps a test split's pixels and labels in host memory (pinned on a CUDA machine, so that each batch
  goes to the device without blocking) after its first pass, and later passes read them there: no decoding, the
  same batches, bit-identical metrics. A split is kept only within the cache's budget: by default (`eval_cache=
  auto`) half the memory the machine has available (fastprompt.runner.machine.available_memory), shared by the
  processes of this node under torchrun, and only when the process will evaluate a split more than once;
  `eval_cache=true` keeps splits within three quarters of it even for one evaluation, `false` never keeps one.

A split is recognised by its dataset, root, the hash of its (path, label) list and class names, its loader (the
function or object that opens a path: equal loaders give equal images), the image size, and this process's shard
of it under torchrun.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..data import DatasetSplits
from ..parallel import data_parallel
from . import machine
from .data import on_device, split_hash


# Kept pixels live in chunks of at most this many bytes. PyTorch's pinned-memory allocator rounds every allocation up
# to a power of two (and keeps it pinned after it is freed), so one 7.5 GB ImageNet split would pin 8 GB and a 4.1 GB
# one 8 GB; chunks of 256 MiB waste at most the rounding of the last one.
_CHUNK_BYTES = 1 << 28


def _pinned_size(nbytes: int) -> int:
    return 1 << max(0, nbytes - 1).bit_length()


@dataclass
class _Kept:
    chunks: list[torch.Tensor]  # uint8 [n, 3, size, size] each, host; `per_chunk` images in each but the last
    labels: torch.Tensor  # int64 [N], host
    per_chunk: int

    def pieces(self, start: int, end: int):
        """The chunk slices that hold images [start, end), in order."""
        while start < end:
            chunk, at = divmod(start, self.per_chunk)
            stop = min(end, (chunk + 1) * self.per_chunk)
            yield self.chunks[chunk][at:at + stop - start]
            start = stop


class EvalCache:
    """Test splits' pixels kept in host memory, within `budget_bytes` in all."""

    def __init__(self, budget_bytes: int = 0, pin_memory: bool = False):
        self.budget_bytes, self.pin_memory = max(0, int(budget_bytes)), pin_memory
        self.used_bytes = 0  # what the kept splits hold, with the pinned allocator's rounding
        self._kept: dict[tuple, _Kept] = {}
        self.notes: list[str] = []  # what the caller should say (a split that could not be kept), taken by it

    @classmethod
    def for_process(cls, setting, evaluations: int, device: torch.device) -> EvalCache:
        """The cache for a process that evaluates each of its splits `evaluations` times on `device`, as `setting`
        (the eval_cache option: 'auto', True or False) asks."""
        if setting is False or (setting == "auto" and evaluations < 2):
            return cls(0)
        available = machine.available_memory()
        if available is None:  # memory unknown (not Linux): keep nothing rather than risk swapping
            return cls(0)
        share = 2 if setting == "auto" else 4 / 3
        processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # torchrun's processes on this node
        return cls(int(available / share / processes), pin_memory=device.type == "cuda")

    def holds(self, key: tuple) -> bool:
        return key in self._kept

    def batches(self, key: tuple, make_loader, size: int, batch_size: int, device: torch.device):
        """(normalised float32 images, labels) on `device`, batch by batch: from the kept pixels of `key` if held,
        else from `make_loader()` (a DataLoader of (uint8 pixels, labels)), keeping them if they fit."""
        kept = self._kept.get(key)
        if kept is not None:
            for start in range(0, kept.labels.shape[0], batch_size):
                end = min(start + batch_size, kept.labels.shape[0])
                parts = [part.to(device, non_blocking=True) for part in kept.pieces(start, end)]
                yield on_device(parts[0] if len(parts) == 1 else torch.cat(parts), kept.labels[start:end], device)
            return
        loader = make_loader()
        kept, nbytes = self._allocate(len(loader.dataset), size, batch_size)
        at = 0
        for pixels, labels in loader:
            if kept is not None:
                taken = 0
                for part in kept.pieces(at, at + labels.shape[0]):
                    part.copy_(pixels[taken:taken + part.shape[0]])
                    taken += part.shape[0]
                kept.labels[at:at + labels.shape[0]].copy_(labels)
            at += labels.shape[0]
            yield on_device(pixels, labels, device)
        if kept is not None and at == kept.labels.shape[0]:  # a whole pass (an interrupted one keeps nothing)
            self._kept[key] = kept
            self.used_bytes += nbytes

    def _allocate(self, count: int, size: int, batch_size: int) -> tuple[_Kept | None, int]:
        """Room for `count` images in chunks of whole batches, and the bytes it holds; (None, 0) when it does not fit
        in what the budget has left (or the memory cannot be pinned)."""
        image_bytes = 3 * size * size
        per_chunk = max(batch_size, _CHUNK_BYTES // image_bytes // batch_size * batch_size)
        counts = [min(per_chunk, count - start) for start in range(0, count, per_chunk)]
        sizes = [n * image_bytes for n in counts] + [count * 8]
        nbytes = sum(_pinned_size(n) for n in sizes) if self.pin_memory else sum(sizes)
        if count == 0 or nbytes > self.budget_bytes - self.used_bytes:
            return None, 0
        try:
            chunks = [torch.empty(n, 3, size, size, dtype=torch.uint8, pin_memory=self.pin_memory) for n in counts]
            labels = torch.empty(count, dtype=torch.int64, pin_memory=self.pin_memory)
        except RuntimeError as error:  # pinning refused (a locked-memory limit): evaluate without keeping
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            self.notes.append(f"eval_cache: could not {'pin' if self.pin_memory else 'allocate'} {nbytes / 2**30:.2f}"
                              f" GiB for this test split ({first_line}); it is decoded again at every evaluation")
            return None, 0
        return _Kept(chunks, labels, per_chunk), nbytes


def split_key(splits: DatasetSplits, image_size: int) -> tuple:
    """What identifies a test split's pixels (see the module docstring)."""
    return (splits.name, splits.path_prefix, split_hash(splits, "test"), splits.loader, image_size,
            data_parallel.rank(), data_parallel.world_size())
