"""Training and evaluating one seed: the papers' loop (METHODS.md §2) with checkpoints and exact resume.

Numerics (`precision`):
    fp32         fp32 weights, no autocast (the CPU default).
    bf16         frozen CLIP weights in bf16, bf16 autocast, trainable parameters and optimizer state in fp32
                 (the GPU default).
    fp16-parity  the research repos' "fp16": CLIP weights and activations in fp16, no autocast, no grad
                 scaler; prompts kept as fp32 master copies and cast to fp16 where they enter the towers.
"""

from __future__ import annotations

import dataclasses
import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch

import fastprompt

from ..backbone import UnsupportedModelError
from ..evaluation import evaluate
from ..parallel import data_parallel
from ..training import EpochStats, TrainStep, fit, lr_at, make_optimizer, peak_memory, reset_peak_memory
from . import checkpoint as ckpt
from .config import ConfigError, RunConfig, data_on_device
from .data import NormalisedBatches, Target, eval_loader, template_for, train_loader, worker_count
from .eval_cache import EvalCache, split_key
from .device_data import DeviceAugmentedSet


@dataclass(frozen=True)
class Numerics:
    clip_precision: str  # create_clip precision
    amp_dtype: torch.dtype | None
    input_dtype: torch.dtype | None
    name: str


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not a device name (auto, cpu, cuda, cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        # torch names more device types (mps, xla, meta, ...) than the runner has a path for.
        raise ConfigError(f"device={name!r}: the runner runs on auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available on this machine; use device=cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ConfigError(f"device={name!r} but this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    try:
        return data_parallel.rank_device(device)  # under torchrun: this process's own GPU
    except ValueError as error:
        raise ConfigError(str(error)) from None


def numerics(precision: str, device: torch.device) -> Numerics:
    if precision == "auto":
        # bf16 where the GPU computes it natively; before Ampere (V100, T4) the papers' own fp16 numerics, which
        # they were trained with on such GPUs; fp32 on a CPU.
        from ..ops.backends import computes_bf16

        precision = "fp32" if device.type != "cuda" else "bf16" if computes_bf16(device) else "fp16-parity"
    if precision == "fp32":
        return Numerics("fp32", None, None, "fp32")
    if precision == "bf16":
        return Numerics("bf16", torch.bfloat16, None, "bf16")
    if precision == "fp16-parity":
        return Numerics("fp16", None, torch.float16, "fp16-parity")
    raise ConfigError(f"precision must be auto, fp32, bf16 or fp16-parity, got {precision!r}")


def load_backbone(name: str, pretrained: str | None, precision: str, device: torch.device, kernels: str = "auto"):
    """create_clip with its errors (unknown name, missing file, unknown tag) as ConfigErrors naming the keys,
    patched onto fastprompt's fast path unless `kernels` is 'eager' (exact either way; see fastprompt.patch)."""
    from ..backbones import create_clip
    from ..fast import patch

    try:
        clip = create_clip(name, pretrained=pretrained, precision=precision, device=device)
    except FileNotFoundError:
        raise
    except (ValueError, RuntimeError) as error:
        raise ConfigError(f"backbone={name!r}, pretrained={pretrained!r}: {error}") from None
    if kernels == "eager":
        return clip
    try:
        return patch(clip, backend=kernels)
    except (ValueError, RuntimeError) as error:
        raise ConfigError(f"kernels={kernels!r}: {error}") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def method_options(config: RunConfig, template: str | None) -> dict:
    options = dict(config.options)
    if template is not None:
        options["template"] = template
    return options


def build_model(config: RunConfig, clip, classnames, seed: int, template: str | None = None):
    seed_everything(seed)
    try:
        model = fastprompt.build(config.method, clip, list(classnames), **method_options(config, template))
    except UnsupportedModelError as error:  # the backbone cannot run this method (it names the method)
        raise ConfigError(f"backbone {config.backbone!r}: {error}") from None
    except (TypeError, ValueError) as error:  # a bad option or combination, named by the method
        raise ConfigError(f"method {config.method!r}: {error}") from None
    return shard_text_if_asked(model, config)


def shard_text_if_asked(model, config: RunConfig):
    """Class-sharded text under torchrun when `shard_text` is on (with one process the plain text pass)."""
    if config.shard_text and data_parallel.world_size() > 1:
        processes, classes = data_parallel.world_size(), len(model.classnames)
        if classes < processes:  # checked here, before a run starts, rather than at the first text pass
            raise ConfigError(f"shard_text=true gives each of the {processes} processes a share of the classes, but"
                              f" there are {classes}; use shard_text=false")
        try:
            model.shard_text_classes()
        except ValueError as error:  # a method whose text depends on the image
            raise ConfigError(f"shard_text: {error}") from None
    return model


def progress_bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=not sys.stderr.isatty() or not data_parallel.is_main(),
                dynamic_ncols=True)


def _format_duration(seconds: float) -> str:
    if seconds < 0.5:
        return "<1s"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def time_left(epoch_seconds: list[float], epochs_left: int) -> float:
    """Seconds the run's remaining epochs take at this session's pace: the mean epoch, leaving out the first
    where there are later ones (it holds the CUDA graph capture and the kernels' compilation)."""
    pace = epoch_seconds[1:] or epoch_seconds
    return sum(pace) / len(pace) * epochs_left


_RESAMPLER_WORDS = {"kernel": "fastprompt's crop_resize kernel, one launch per batch",
                    "torchvision": "torchvision's ops, image by image"}


def _format_bytes(value: float) -> str:
    if value != value:  # NaN: not measurable here
        return "n/a"
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"


class SeedTrainer:
    """Trains one seed's model and evaluates it; the run (run.py) owns folders, seeds and tables."""

    def __init__(self, config: RunConfig, clip, device: torch.device, num: Numerics, image_size: int, echo=print,
                 eval_cache: EvalCache | None = None):
        self.config, self.clip, self.device, self.num = config, clip, device, num
        self.image_size, self.echo = image_size, echo
        self.workers, self.eval_workers = worker_count(config, device), worker_count(config, device, evaluation=True)
        # The test splits' pixels kept between evaluations (eval_cache.py); the run shares one across its seeds.
        self.eval_cache = eval_cache if eval_cache is not None else EvalCache(0)

    def _memory_line(self, model, batch_size: int) -> str:
        """The predicted peak of this run's step on this GPU (fastprompt.memory), per process under torchrun."""
        from ..memory import memory_line, options_for_model, train_step_blas_workspaces

        options = options_for_model(model, self.num.amp_dtype, self.config.optimizer,
                                    blas_workspaces=train_step_blas_workspaces(cuda_graph=True))
        options = dataclasses.replace(options, accumulate=self.config.accumulate)
        _, total = torch.cuda.mem_get_info(self.device)
        return memory_line(model, batch_size // data_parallel.world_size(), options, total)

    # --- evaluation -----------------------------------------------------------------------------------
    def evaluate_targets(self, model, targets: list[Target]) -> list[dict]:
        config, records = self.config, []
        trained = (model.classnames, getattr(model.method, "template", None))
        for target in targets:
            template = template_for(config, target.splits)
            if template is not None:
                model.method.template = template
            model.set_classnames(target.splits.classnames)
            # Under torchrun this process evaluates its share of the test set and the counts are summed.
            key = split_key(target.splits, self.image_size)
            kept = self.eval_cache.holds(key)
            batches = self.eval_cache.batches(
                key, lambda: eval_loader(config, target.splits, self.image_size, self.eval_workers,
                                         self.device.type == "cuda"),
                self.image_size, config.eval_batch_size, self.device)
            sharded = data_parallel.world_size() > 1
            with progress_bar(len(data_parallel.shard(target.splits.test)), f"eval {target.key}") as bar:
                metrics = evaluate(model, batches, self.device, mode=target.mode, amp_dtype=self.num.amp_dtype,
                                   input_dtype=self.num.input_dtype, progress=bar.update,
                                   reduce=data_parallel.all_reduce_sum_ if sharded else None)
            for note in self.eval_cache.notes:
                self.echo(f"  note: {note}")
            self.eval_cache.notes.clear()
            records.append({"dataset": target.dataset, "subset": target.subset, "mode": target.mode,
                            "classes": target.splits.num_classes, **metrics})
            self.echo(f"  {target.key:<28} ({target.mode:5}) accuracy {metrics['accuracy']:6.2f}%  "
                      f"macro-F1 {metrics['macro_f1']:6.2f}%  ({metrics['images']} images"
                      + (", pixels kept from an earlier pass)" if kept else ")"))
        if trained[1] is not None:
            model.method.template = trained[1]
        model.set_classnames(trained[0])
        return records

    def _evaluate_during_training(self, model, targets: list[Target], seed: int, epoch: int) -> list[dict]:
        """eval_every: the targets scored with this epoch's weights, the model left in training mode with its
        training class set (TrainStep re-captures its graph for the rebuilt prompt buffers). Nothing here draws from
        the training's random streams, so the run trains exactly as without it."""
        self.echo(f"seed {seed} epoch {epoch}: evaluating the targets (eval_every={self.config.eval_every})")
        records = self.evaluate_targets(model, targets)
        model.train()
        return [{key: record[key] for key in ("dataset", "subset", "mode", "accuracy", "macro_f1")}
                for record in records]

    # --- training -------------------------------------------------------------------------------------
    def _loader(self, train, generator, config: RunConfig):
        if data_on_device(config, self.device):
            with progress_bar(len(train.train), "decoding onto the device") as bar:
                data = DeviceAugmentedSet(train, self.image_size, config.crop_scale, self.device,
                                          config.device_cache_side, progress=lambda it: _tick(it, bar))
            self.echo(f"  few-shot set on {self.device}: {len(data)} images, {_format_bytes(data.nbytes())}, "
                      f"augmented there by {_RESAMPLER_WORDS[data.resampler]}")
            if data_parallel.world_size() > 1:
                return data_parallel.ShardedDeviceBatches(data, config.batch_size, generator)
            return data.batches(config.batch_size, generator)
        # The workers hand over uint8 crops; they are normalised on the device.
        return NormalisedBatches(train_loader(config, train, self.image_size, generator, self.workers,
                                              self.device.type == "cuda"), self.device)

    def train(self, seed: int, train, targets: list[Target], seed_dir: str, resume: bool = False,
              on_epoch_end=None) -> dict:
        """Train seed `seed` on `train` (a DatasetSplits), evaluate `targets`, write checkpoint and results.

        Every step goes through fastprompt.training.TrainStep (the library's one engine): CUDA graph on a GPU,
        non-finite steps skipped on the device, the learning rate in a device tensor set once per epoch. The
        loaders drop the last incomplete batch, and a training set smaller than one batch is one batch of all its
        images per epoch, as Dassl's loader has it (drop_last only when the set holds a whole batch)."""
        config, device = self.config, self.device
        template = template_for(config, train)
        model = build_model(config, self.clip, train.classnames, seed, template)
        params = model.trainable_parameters()
        optimizer = None
        if params and config.epochs > 0:
            optimizer = make_optimizer(params, config.optimizer, config.lr, config.weight_decay, config.momentum)
        gpa = None
        if config.gpa:
            from ..methods.promptsrc import GaussianPromptAggregation

            named = {n: p for n, p in model.method.named_parameters() if p.requires_grad}
            gpa = GaussianPromptAggregation(named, config.epochs, model.method.gpa_mean, model.method.gpa_std)
        generator = torch.Generator().manual_seed(seed)
        state_dir = os.path.join(seed_dir, "state")
        start, history = 1, []
        data_parallel.barrier()  # rank 0's writes (the state of an earlier seed or run) land before anyone reads
        found = ckpt.find_state(state_dir) if resume else None
        if found is not None:
            manifest, tensors = ckpt.load_state(state_dir)
            done = ckpt.restore_state(manifest, tensors, model, optimizer, generator, device, gpa)
            start, history = done + 1, list(manifest["history"])
            self.echo(f"seed {seed}: resuming after epoch {done} from {found}")
        # Every rank built (or loaded) the same prompts; rank 0's are made everyone's, as DDP does.
        data_parallel.broadcast_parameters(params)
        if optimizer is not None and start <= config.epochs:
            sync = data_parallel.GradientMean() if data_parallel.world_size() > 1 else None
            step = TrainStep(model, optimizer, amp_dtype=self.num.amp_dtype, accumulate=self.config.accumulate,
                             grad_sync=sync)
            loader_config = config
            if len(train.train) < config.batch_size:
                loader_config = dataclasses.replace(config, batch_size=len(train.train))
                self.echo(f"seed {seed}: the training set holds {len(train.train)} images, fewer than"
                          f" batch_size={config.batch_size}: each epoch is one batch of all of them, as in Dassl")
            if device.type == "cuda":  # before the first step: an out-of-memory run says so, with the way out
                self.echo(f"seed {seed}: {self._memory_line(model, loader_config.batch_size)}")
            loader = self._loader(train, generator, loader_config)

            def progress_for_epoch(epoch):
                reset_peak_memory(device)
                return _epoch_bar(len(loader), f"seed {seed} epoch {epoch}/{config.epochs}")

            epoch_seconds = []  # this session's epochs, for the time left
            later_seeds = len(config.seeds) - 1 - list(config.seeds).index(seed) if seed in config.seeds else 0

            def epoch_end(epoch, lr, stats):
                stats = _over_ranks(stats)
                epoch_seconds.append(stats.seconds)
                epochs_left = config.epochs - epoch + later_seeds * config.epochs
                peak, peak_kind = peak_memory(device)
                if gpa is not None:
                    gpa.update(epoch)
                history.append({"epoch": epoch, "lr": lr, "loss": stats.loss, "images": stats.images,
                                "seconds": stats.seconds, "images_per_second": stats.images_per_second,
                                "loader_images_per_second": _finite_or_none(stats.loader_images_per_second),
                                # batches that found the GPU out of work (None on a CPU): the data kept it waiting
                                "starved_steps": stats.starved_steps,
                                "skipped_steps": stats.skipped_steps, "peak_memory_bytes": peak})
                loader_rate = stats.loader_images_per_second
                self.echo(f"seed {seed} epoch {epoch}/{config.epochs}: loss {stats.loss:.4f}, lr {lr:.3g},"
                          f" {stats.images_per_second:.1f} images/s (loader "
                          f"{'never waited on' if loader_rate == float('inf') else f'{loader_rate:.0f} images/s'}),"
                          f" {peak_kind} {_format_bytes(peak)}"
                          + (f", {stats.skipped_steps} steps skipped" if stats.skipped_steps else "")
                          + (f"; run ends in about {_format_duration(time_left(epoch_seconds, epochs_left))}"
                             if epochs_left else ""))
                if stats.loader_bound:
                    self.echo(f"  warning: the data loader is the limit ({stats.loader_seconds:.1f} s of"
                              f" {stats.seconds:.1f} s waiting for batches); try data_on_device=true or more"
                              " num_workers")
                if config.eval_every and epoch % config.eval_every == 0 and epoch < config.epochs:
                    history[-1]["targets"] = self._evaluate_during_training(model, targets, seed, epoch)
                if epoch % config.save_every == 0 or epoch == config.epochs:
                    data_parallel.on_main(ckpt.save_state, state_dir, epoch, model, optimizer, generator, device,
                                          gpa, history)
                if on_epoch_end is not None:
                    on_epoch_end(seed, epoch)

            fit(step, loader, config.epochs,
                lambda epoch: lr_at(epoch, config.epochs, config.lr, config.warmup_epochs, config.warmup_lr),
                start_epoch=start, device=device, on_epoch_end=epoch_end, progress_for_epoch=progress_for_epoch,
                max_bad_steps=config.max_bad_steps, input_dtype=self.num.input_dtype)
        if gpa is not None:
            gpa.apply()
        # The checkpoint comes before the evaluation, so a failure there loses no training; the resumable state
        # stays until results.json is written (a resume then restores the final epoch and only evaluates).
        backbone = ckpt.backbone_record(model, config.backbone, config.pretrained)
        # Every option is recorded, defaults included: a later release that changes a default (MCPL's sa_to_text,
        # MuDPT's injection) must not change what this checkpoint means when it is rebuilt from its manifest.
        options = {**fastprompt.method_options(config.method), **method_options(config, template)}
        data_parallel.on_main(ckpt.save_checkpoint, seed_dir, model, config.method, options, backbone,
                              config.to_dict(), extra={"seed": seed, "precision": self.num.name})
        self.echo(f"seed {seed}: evaluating the final weights")
        records = self.evaluate_targets(model, targets)
        results = {"seed": seed, "complete": True, "targets": records, "history": history}

        def publish():
            ckpt.atomic_write_json(os.path.join(seed_dir, "results.json"), results)
            ckpt.remove_state(state_dir)

        data_parallel.on_main(publish)
        return results


class _epoch_bar:
    """A tqdm bar over an epoch's steps as a context manager yielding the per-step callable train_epoch takes."""

    def __init__(self, total: int, desc: str):
        self.bar = progress_bar(total, desc)

    def __enter__(self):
        return lambda images: self.bar.update(1)

    def __exit__(self, *exc):
        self.bar.close()


def _over_ranks(stats: EpochStats) -> EpochStats:
    """An epoch's stats over every rank (each TrainStep counts its own shard): one gather per epoch."""
    if data_parallel.world_size() == 1:
        return stats
    total = data_parallel.gather_epoch_totals(stats.loss * stats.images if stats.images else 0.0, stats.images,
                                              stats.delivered, stats.skipped_steps, stats.seconds,
                                              stats.loader_seconds)
    loss = total["loss_sum"] / total["images"] if total["images"] else float("nan")
    return dataclasses.replace(stats, loss=loss, images=total["images"], delivered=total["delivered"],
                               skipped_steps=total["skipped"], seconds=total["seconds"],
                               loader_seconds=total["loader_seconds"])


def _finite_or_none(value: float):
    return value if value == value and value not in (float("inf"), float("-inf")) else None


def _tick(iterable, bar):
    for item in iterable:
        yield item
        bar.update(1)
