"""Data-parallel training and evaluation under torchrun: the process group, one gradient all-reduce per step,
the sharded batches, exact evaluation counts, and rank 0 as the only writer.

    torchrun --nproc_per_node 4 -m fastprompt train --method maple --dataset imagenet --root /data

torchrun starts one process per GPU and sets RANK, WORLD_SIZE and LOCAL_RANK (with MASTER_ADDR/PORT); the runner
calls `init_from_env` and, where those are present, joins the process group: NCCL with the device
cuda:LOCAL_RANK on CUDA, gloo on the CPU. Without them every function here is the single-process identity (rank 0
of 1), so the runner has one code path.

What each rank does:
- it holds the frozen CLIP and the prompts, built from the same seed and broadcast from rank 0 once
  (`broadcast_parameters`, as DistributedDataParallel does at construction);
- it draws the epoch's order from the run's loader generator, which every rank seeds alike and restores from
  the same saved state, and takes its slice of each global batch (`ShardedBatches`): the global batch is the
  config's batch_size, each rank takes batch_size / N, and the epoch has the single-process number of steps;
- after the last backward of a step `GradientMean` sums the gradients across ranks in one flat all_reduce and
  divides by N: the mean of N shard means of equal size is the global batch's mean gradient, so a step equals the
  single-process step of the whole batch (up to float summation order), and every rank sees the same gradients,
  hence the same non-finite check and the same update;
- evaluation takes every N-th test image (`shard`), and the per-class counts (integers) are summed
  (`all_reduce_sum_`), so accuracy and macro-F1 equal the single-process ones exactly.

Augmentation: each sample's crop and flip draw from the CPU RNG seeded with a per-sample seed that the order
drawing gives it (`KeyedSamples`), so a sample's augmentation depends on neither the rank that loads it nor the
worker process nor any RNG state not saved with the run: resume is exact on every rank, while rank 0 saves the
state. With one process the runner keeps its single-process loaders (a one-process torchrun run is the plain
run).

Why not torch.nn.parallel.DistributedDataParallel: the trainable parameters are a few million (a prompt learner's
prompts), so one flat all_reduce per step is what DDP's gradient buckets would do anyway; DDP's reducer fires
from autograd hooks during backward and keeps per-iteration state in Python, while the TrainStep (forward,
backward, sync, guarded update) is captured whole in a CUDA graph, which an NCCL all_reduce on the capturing
stream supports (PyTorch's CUDA-graph notes). DDP's per-bucket overlap of communication with backward buys
nothing for gradients this small. (No GPU was available when this was written: the graphed NCCL step is untested
here; a capture failure falls back to eager steps with the reason logged, as TrainStep does on one GPU.)

Decisions against the papers (which train on one GPU and say nothing of several):
- global batch: the config's batch_size, split over the ranks. Follows the papers' batch ("a batch size of 4 is
  used for all other datasets", MMRL; "The batch size for the training dataset is 4", MPL): N GPUs run the
  papers' recipe, they do not change it. A larger batch is the user's choice, with lr scaled by hand.
- learning rate: unchanged for the same global batch (the papers' values; the mean gradient is the same).
- augmentation draws: per-sample seeds when N > 1 (our choice; see above), one-process draws otherwise.
- evaluation: exact per-class counts over shards (the papers' metrics are of the whole test set); the
  eval_batch_size is per process ("that for the test dataset is 100", MPL), which changes no metric.

Writes and failures: only rank 0 writes the run folder, log, checkpoints, state and lock; `on_main` runs such a
write on rank 0 and broadcasts its outcome, so other ranks wait for it (a barrier) and raise `PeerFailed` when it
failed instead of waiting at the next collective. A failure on one rank outside such a section ends that process;
torchrun (and torch.multiprocessing.spawn) then stops the others, and the process group's timeout bounds any wait.
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class PeerFailed(RuntimeError):
    """Rank 0 failed in a step it runs for every rank; its own error names the problem (and rank 0 prints it)."""


# --- the process group -----------------------------------------------------------------------------------------
def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_ENV)


def active() -> bool:
    """A process group is up (torchrun's, or one the caller made)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def _wants_cuda(device: str) -> bool:
    if device == "auto":
        return torch.cuda.is_available()
    try:
        return torch.device(device).type == "cuda"
    except RuntimeError:
        return False  # not a device name: gloo, and the runner's device check names the problem


def init_from_env(device: str = "auto") -> bool:
    """Join torchrun's process group when launched by torchrun (idempotent); returns whether one is up.

    `device` is the config's device ('auto', 'cpu', 'cuda', 'cuda:N'): CUDA gets NCCL with this process bound to
    cuda:LOCAL_RANK, the CPU gets gloo. ValueError: a CUDA device asked for where there is none."""
    if active():
        return True
    if not launched_by_torchrun():
        return False
    if not dist.is_available():
        raise RuntimeError("launched by torchrun, but this torch build has no torch.distributed")
    if _wants_cuda(device):
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} under torchrun, but CUDA is not available; use device=cpu")
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank()))
    else:
        dist.init_process_group("gloo")
    atexit.register(shutdown)
    return True


def shutdown() -> None:
    if active():
        dist.destroy_process_group()


def rank_device(device: torch.device) -> torch.device:
    """The device this rank trains on: cuda:LOCAL_RANK for a CUDA device under torchrun; `device` otherwise.

    Raises ValueError for an explicit cuda:N with several processes (each owns its GPU), on every rank alike, so
    that no rank goes on to wait for one that stopped here."""
    if not active() or device.type != "cuda":
        return device
    own = local_rank()
    if device.index is not None and (world_size() > 1 or device.index != own):
        raise ValueError(f"device={device} under torchrun: each process uses cuda:LOCAL_RANK (this one cuda:{own});"
                         " use device=cuda or auto, and CUDA_VISIBLE_DEVICES to choose the GPUs")
    return torch.device("cuda", own)


def _collective_device() -> torch.device:
    """Where this backend's collectives take tensors: the rank's GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --- collectives ------------------------------------------------------------------------------------------------
def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` across ranks in place (moved to the backend's device and back where they differ)."""
    if world_size() == 1:
        return tensor
    device = _collective_device()
    if tensor.device == device:
        dist.all_reduce(tensor)
        return tensor
    moved = tensor.to(device)
    dist.all_reduce(moved)
    tensor.copy_(moved)
    return tensor


def broadcast_parameters(params) -> None:
    """Give every rank rank 0's values of `params` (the prompts), as DDP does when it wraps a model."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


class GradientMean:
    """`TrainStep(grad_sync=GradientMean())`: the mean of each gradient over the ranks, in one collective.

    The gradients are copied into one flat buffer per dtype (one in practice: the prompts are fp32), summed by one
    all_reduce, divided by the world size and copied back. Called once per step after the last backward, so it
    runs inside the step's CUDA graph when the step is captured."""

    def __init__(self):
        if not active():
            raise RuntimeError("GradientMean needs a process group (torchrun, or torch.distributed.init_process_group)")
        self.world = world_size()

    def __call__(self, grads) -> None:
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for grad in grads:
            by_dtype.setdefault(grad.dtype, []).append(grad)
        for group in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in group])
            dist.all_reduce(flat)
            flat.div_(self.world)
            for grad, part in zip(group, flat.split([g.numel() for g in group]), strict=True):
                grad.copy_(part.view_as(grad))


def on_main(fn, *args, share: bool = False, **kwargs):
    """Run `fn` on rank 0 only and tell every rank how it went (this is also a barrier).

    Rank 0 returns fn's result; the other ranks return it too with `share=True` (it must pickle), else None.
    When fn raises on rank 0, rank 0 re-raises it and the others raise PeerFailed with its message."""
    if world_size() == 1:
        return fn(*args, **kwargs)
    outcome: list = [None]
    error, result = None, None
    if is_main():
        try:
            result = fn(*args, **kwargs)
            outcome[0] = ("ok", result if share else None)
        except BaseException as raised:  # noqa: BLE001 - every failure must reach the waiting ranks
            error = raised
            outcome[0] = ("error", f"{type(raised).__name__}: {raised}")
    dist.broadcast_object_list(outcome, src=0)
    status, value = outcome[0]
    if error is not None:
        raise error
    if status == "error":
        raise PeerFailed(f"rank 0 failed: {value}")
    return result if is_main() else value


def gather_epoch_totals(loss_sum: float, images: int, delivered: int, skipped: int, seconds: float,
                        loader_seconds: float) -> dict:
    """An epoch's totals over every rank: sums of the loss sum and the image counts, the longest times, the
    skipped steps (equal on every rank, since the gradients are; a difference means the prompts diverged)."""
    mine = (float(loss_sum), int(images), int(delivered), int(skipped), float(seconds), float(loader_seconds))
    if world_size() == 1:
        rows = [mine]
    else:
        rows = [None] * world_size()
        dist.all_gather_object(rows, mine)
    skips = {row[3] for row in rows}
    if len(skips) > 1:
        raise RuntimeError(f"the ranks skipped different numbers of non-finite steps ({sorted(skips)}): their prompts"
                           " differ now; a loss was not finite on one rank while every gradient was")
    return {"loss_sum": sum(r[0] for r in rows), "images": sum(r[1] for r in rows),
            "delivered": sum(r[2] for r in rows), "skipped": rows[0][3], "seconds": max(r[4] for r in rows),
            "loader_seconds": max(r[5] for r in rows)}


# --- data ---------------------------------------------------------------------------------------------------------
def check_batch(batch_size: int) -> None:
    """The global batch must split evenly over the ranks (ValueError naming both numbers otherwise)."""
    world = world_size()
    if batch_size % world:
        raise ValueError(f"batch_size={batch_size} (the global batch) does not split over the {world} processes"
                         f" torchrun started: each takes batch_size / {world}; use a multiple of {world}")


class ShardedBatches:
    """Batch sampler: the run's global batches in one order on every rank; each rank yields its contiguous slice of
    each batch as (sample index, augmentation seed) keys. The last incomplete global batch is dropped, as the
    single-process loaders do, so every rank takes the same number of steps."""

    def __init__(self, samples: int, batch_size: int, generator: torch.Generator, rank: int = 0, world: int = 1):
        if batch_size % world:
            raise ValueError(f"batch_size={batch_size} does not split over {world} ranks")
        self.samples, self.batch_size, self.generator = samples, batch_size, generator
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return self.samples // self.batch_size

    def __iter__(self):
        # Drawn when the epoch starts, on every rank alike: the generator is then where the saved state has it.
        order = torch.randperm(self.samples, generator=self.generator)
        seeds = torch.randint(0, 2**62, (self.samples,), generator=self.generator)
        share = self.batch_size // self.world
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            low = start + self.rank * share
            yield list(zip(order[low:low + share].tolist(), seeds[low:low + share].tolist(), strict=True))


def _seeded(seed: int, fn, *args):
    """fn(*args) with the CPU RNG seeded by `seed`, the caller's RNG state untouched (the CUDA RNG is never
    touched: torch.manual_seed would reseed it)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return fn(*args)


class KeyedSamples(Dataset):
    """`dataset[index]` for a key (index, seed): the transform's random draws come from that sample's seed."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        return _seeded(seed, self.dataset.__getitem__, index)


def _placement(rank_: int | None, world: int | None) -> tuple[int, int]:
    return (rank() if rank_ is None else rank_), (world_size() if world is None else world)


def sharded_loader(dataset, batch_size: int, generator: torch.Generator, workers: int = 0,
                   pin_memory: bool = False, rank: int | None = None, world: int | None = None) -> DataLoader:
    """This rank's share of each global batch of `dataset` (a map-style set whose transform draws from torch's CPU
    RNG), in the order `generator` gives every rank; rank and world default to the process group's."""
    batches = ShardedBatches(len(dataset), batch_size, generator, *_placement(rank, world))
    # A private generator for the loader's worker base seed: drawing it from the global RNG would move that state.
    return DataLoader(KeyedSamples(dataset), batch_sampler=batches, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=4 if workers else None, generator=torch.Generator())


class ShardedDeviceBatches:
    """The same slices from a DeviceAugmentedSet (images decoded on the device, augmented there)."""

    def __init__(self, data, batch_size: int, generator: torch.Generator, rank: int | None = None,
                 world: int | None = None):
        self.data = data
        self.batches = ShardedBatches(len(data), batch_size, generator, *_placement(rank, world))

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        data = self.data
        # The epoch's keys at once (ShardedBatches draws them all when the epoch starts), so that the labels are
        # gathered on the device from one copy of the indices, not one blocking copy per batch (DeviceAugmentedSet).
        epoch = list(self.batches)
        labels = data.labels_in_order(torch.tensor([index for keys in epoch for index, _ in keys], dtype=torch.long))
        at = 0
        for keys in epoch:
            boxes = [_seeded(seed, data.draw, data.images[index]) for index, seed in keys]
            yield data.render([index for index, _ in keys], boxes), labels[at:at + len(keys)]
            at += len(keys)


def shard(dataset):
    """This rank's share of an evaluation set: every world_size-th sample from its rank on (all of it alone)."""
    world = world_size()
    if world == 1:
        return dataset
    return Subset(dataset, range(rank(), len(dataset), world))

