"""A run: every seed of one config, in one folder, with a manifest, results and tables.

    <output_dir>/
        run.json        config, preset and its diff, environment, split hashes per seed, status
        log.txt         the log lines printed during the run
        seed<S>/        checkpoint.safetensors + checkpoint.json, results.json (written last), state/ while
                        training (the resumable state; removed when the seed completes)
        summary.json, summary.md, summary.csv   written when every seed is complete

Bad input (config, dataset, images, batch size, backbone) is checked before the folder is created. A run
that fails or is interrupted is marked so in run.json and has no summary and no results.json for the
unfinished seed; `--resume latest` (or a path) continues it from the last saved epoch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import checkpoint as ckpt
from .config import FIELDS, ConfigError, ResolvedConfig, RunConfig, apply_values, data_on_device, set_field
from .data import check_training_set, load_dataset, plan, split_record, verify_images
from .engine import SeedTrainer, build_model, load_backbone, numerics, progress_bar, resolve_device
from .results import csv_table, markdown_table, summarize_run

RUN_MANIFEST = "run.json"
# Keys that may change when a run is resumed: they do not change the training trajectory.
RESUMABLE_CHANGES = ("num_workers", "eval_batch_size", "output_dir")


class RunError(RuntimeError):
    """A run folder is not in the state the command needs (exists already, nothing to resume, ...)."""


class Echo:
    """Prints a line and appends it to the run's log file once the run folder exists."""

    def __init__(self, printer=print):
        self.printer, self.path = printer, None

    def __call__(self, line: str) -> None:
        self.printer(line)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")


@dataclass
class Prepared:
    config: RunConfig
    clip: object
    device: object
    num: object
    image_size: int
    plans: dict  # seed -> (train splits, targets)


def prepare(config: RunConfig, echo) -> Prepared:
    """Everything that can fail on bad input, before anything is written."""
    device = resolve_device(config.device)
    num = numerics(config.precision, device)
    clip = load_backbone(config.backbone, config.pretrained, num.clip_precision, device, config.kernels)
    image_size = int(clip.visual.image_size[0])
    full = load_dataset(config, config.dataset, image_size)
    loaded: dict = {}
    plans = {seed: plan(config, full, seed, image_size, loaded) for seed in config.seeds}
    for seed, (train, _) in plans.items():
        if config.epochs > 0:  # epochs=0 evaluates the initial prompts (zero-shot CLIP): nothing is trained
            check_training_set(config, train)
            if not data_on_device(config, device):
                with progress_bar(len(train.train), f"checking seed {seed}'s training images") as bar:
                    verify_images(train, bar.update)
    # Build once so bad method options and over-long class names fail now, not after the folder exists.
    first_train, _ = plans[config.seeds[0]]
    build_model(config, clip, first_train.classnames, config.seeds[0])
    echo(f"{config.method} / {config.protocol} on {full.name}: {full.num_classes} classes, {config.shots} shots,"
         f" seeds {list(config.seeds)}, backbone {config.backbone} ({config.pretrained or 'random weights'}),"
         f" {num.name} on {device}")
    return Prepared(config, clip, device, num, image_size, plans)


def _seed_dir(run_dir: str, seed: int) -> str:
    return os.path.join(run_dir, f"seed{seed}")


def _complete(seed_dir: str) -> dict | None:
    path = os.path.join(seed_dir, "results.json")
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(seed_dir, ckpt.MANIFEST)):
        return None
    result = ckpt.read_json(path, "seed results")
    return result if result.get("complete") else None


def _check_new_folder(run_dir: str) -> None:
    if os.path.isfile(os.path.join(run_dir, RUN_MANIFEST)):
        status = ckpt.read_json(os.path.join(run_dir, RUN_MANIFEST), "run manifest").get("status")
        raise RunError(
            f"{run_dir} already holds a run (status {status!r}). Pass --resume latest to continue it, or choose"
            " another output_dir="
        )
    if os.path.isdir(run_dir) and os.listdir(run_dir):
        raise RunError(f"output folder {run_dir} is not empty and holds no fastprompt run; choose another output_dir=")


def resume_folder(path: str) -> str:
    """The run folder for `--resume PATH` (the run folder itself or a seed's state folder inside it)."""
    path = os.path.abspath(os.path.expanduser(path))
    for candidate in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
        if os.path.isfile(os.path.join(candidate, RUN_MANIFEST)):
            return candidate
    raise RunError(f"nothing to resume at {path}: no {RUN_MANIFEST} there (nor in its parents)")


def stored_config(run_dir: str) -> RunConfig:
    manifest = ckpt.read_json(os.path.join(run_dir, RUN_MANIFEST), "run manifest")
    return RunConfig.from_dict(manifest["config"])


def config_for_resume(run_dir: str, overrides: dict | None, candidate: RunConfig | None = None) -> RunConfig:
    """The stored config, with `overrides` applied (or compared with `candidate`); only RESUMABLE_CHANGES may differ."""
    stored = stored_config(run_dir)
    config = candidate
    if config is None:
        config = RunConfig.from_dict(stored.to_dict())
        overrides = dict(overrides or {})
        for key in ("method", "protocol", "dataset", "shots"):  # apply_values leaves these to resolve_config
            if key in overrides:
                set_field(config, key, overrides.pop(key))
        apply_values(config, overrides, "override")
    config.output_dir = run_dir
    before, after = stored.to_dict(), config.to_dict()
    changed = [k for k in FIELDS if before[k] != after[k] and k not in RESUMABLE_CHANGES]
    if changed:
        detail = ", ".join(f"{k}: {before[k]!r} -> {after[k]!r}" for k in changed)
        raise ConfigError(
            f"cannot resume {run_dir} with a different config ({detail}); resuming continues the same run. Only"
            f" {', '.join(RESUMABLE_CHANGES)} may change."
        )
    return config


def train_run(resolved: ResolvedConfig | None = None, resume_dir: str | None = None, config: RunConfig | None = None,
              printer=print, on_epoch_end=None) -> dict:
    """Train every seed of a config; with `resume_dir` continue that run. Returns the summary."""
    config = config or resolved.config
    echo = Echo(printer)
    run_dir = resume_dir or config.resolved_output_dir()
    if resume_dir is None:
        _check_new_folder(run_dir)
    prepared = prepare(config, echo)
    os.makedirs(run_dir, exist_ok=True)
    echo.path = os.path.join(run_dir, "log.txt")
    manifest_path = os.path.join(run_dir, RUN_MANIFEST)
    manifest = ckpt.read_json(manifest_path, "run manifest") if resume_dir else {"started": ckpt.now()}
    splits = {str(seed): split_record(train, targets) for seed, (train, targets) in prepared.plans.items()}
    if resume_dir and manifest.get("splits") not in (None, splits):
        changed = sorted(k for k in splits if manifest["splits"].get(k) != splits[k])
        raise ConfigError(
            f"cannot resume {run_dir}: the data changed since the run started (split hashes of seed(s)"
            f" {', '.join(changed)} differ); start a new run"
        )
    manifest.update({
        "format": "fastprompt.run/1",
        "config": config.to_dict(),
        "status": "running",
        "environment": ckpt.environment(prepared.device),
        "splits": splits,
    })
    if resolved is not None:
        manifest["preset"] = {"name": resolved.preset_name,
                              "diff": {k: list(v) for k, v in resolved.diff().items()}}
    manifest.pop("error", None)
    if resume_dir:
        manifest.setdefault("resumed", []).append(ckpt.now())
    ckpt.atomic_write_json(manifest_path, manifest)
    echo(f"run folder {run_dir}")
    if resolved is not None:
        changes = resolved.diff()
        echo(f"preset {resolved.preset_name}; " + ("no changes" if not changes else "changed: " + ", ".join(
            f"{k} {before!r} -> {after!r}" for k, (before, after) in changes.items())))
    trainer = SeedTrainer(config, prepared.clip, prepared.device, prepared.num, prepared.image_size, echo)
    results = []
    try:
        for seed in config.seeds:
            seed_dir = _seed_dir(run_dir, seed)
            done = _complete(seed_dir) if resume_dir else None
            if done is not None:
                echo(f"seed {seed}: complete already, results reused")
                results.append(done)
                continue
            train, targets = prepared.plans[seed]
            results.append(trainer.train(seed, train, targets, seed_dir, resume=resume_dir is not None,
                                         on_epoch_end=on_epoch_end))
        summary = write_summary(run_dir, config, results)
    except BaseException as error:
        manifest.update(status="interrupted" if isinstance(error, KeyboardInterrupt) else "failed",
                        error=f"{type(error).__name__}: {error}", finished=ckpt.now())
        ckpt.atomic_write_json(manifest_path, manifest)
        raise
    manifest.update(status="complete", finished=ckpt.now())
    ckpt.atomic_write_json(manifest_path, manifest)
    echo("\n" + markdown_table([summary]))
    return summary


def run_name(config: RunConfig) -> str:
    return f"{config.method} {config.dataset}"


def write_summary(run_dir: str, config: RunConfig, results: list[dict]) -> dict:
    summary = summarize_run(config.protocol, run_name(config), results)
    summary["config"] = config.to_dict()
    ckpt.atomic_write_json(os.path.join(run_dir, "summary.json"), summary)
    ckpt.atomic_write_text(os.path.join(run_dir, "summary.md"), markdown_table([summary]))
    ckpt.atomic_write_text(os.path.join(run_dir, "summary.csv"), csv_table([summary]))
    return summary


# --- evaluation of saved checkpoints ------------------------------------------------------------------------
EVAL_OVERRIDES = ("device", "precision", "eval_batch_size", "num_workers", "root", "targets", "pretrained")


def evaluate_checkpoints(folders: list[str], overrides: dict | None = None, dataset: str | None = None,
                         subset: str = "all", mode: str | None = None, printer=print) -> list[dict]:
    """Evaluate saved checkpoints (never trains). Without `dataset`, on the targets of their own protocol
    (same seeds, same splits as training); with it, on that dataset's test split (`subset`)."""
    from ..data import subsample_classes
    from .data import Target

    echo = Echo(printer)
    outputs, backbones = [], {}
    for folder in folders:
        manifest, tensors = ckpt.load_checkpoint(folder)
        if not manifest.get("config"):
            raise ckpt.CheckpointError(f"{folder}: the checkpoint records no run config; evaluate it with predict()")
        config = RunConfig.from_dict(manifest["config"])
        bad = sorted(k for k in overrides or {} if k not in EVAL_OVERRIDES and not k.startswith("dataset."))
        if bad:
            raise ConfigError(f"eval cannot change {', '.join(bad)} (only {', '.join(EVAL_OVERRIDES)}, dataset.*): the"
                              " checkpoint fixes the method, its options and the training data")
        apply_values(config, overrides or {}, "override")
        seed = int(manifest.get("seed", config.seeds[0]))
        config.seeds = (seed,)
        device = resolve_device(config.device)
        num = numerics(config.precision, device)
        key = (manifest["backbone"]["name"], config.pretrained, num.clip_precision, str(device), config.kernels)
        if key not in backbones:  # the seeds of a run share one frozen backbone
            backbones[key] = load_backbone(*key[:3], device, config.kernels)
        clip = backbones[key]
        image_size = int(clip.visual.image_size[0])
        if dataset is None:
            full = load_dataset(config, config.dataset, image_size)
            _, targets = plan(config, full, seed, image_size)
        else:
            splits = subsample_classes(load_dataset(config, dataset, image_size), subset)
            same = list(splits.classnames) == list(manifest["classnames"])
            targets = [Target(splits.name, subset, mode or ("base" if same else "novel"), splits)]
        model = _model_from_checkpoint(clip, manifest, tensors)
        echo(f"evaluating {ckpt.checkpoint_folder(folder)} ({manifest['method']}, seed {seed}, {num.name} on {device})")
        trainer = SeedTrainer(config, clip, device, num, image_size, echo)
        records = trainer.evaluate_targets(model, targets)
        outputs.append({"checkpoint": ckpt.checkpoint_folder(folder), "seed": seed, "targets": records})
    return outputs


def _model_from_checkpoint(clip, manifest: dict, tensors: dict):
    import fastprompt

    model = fastprompt.build(manifest["method"], clip, list(manifest["classnames"]), **manifest["options"])
    ckpt.load_into(model, manifest, tensors)
    return model


def checkpoints_of_run(run_dir: str) -> list[str]:
    run_dir = os.path.abspath(os.path.expanduser(run_dir))
    if not os.path.isfile(os.path.join(run_dir, RUN_MANIFEST)):
        raise RunError(f"{run_dir} is not a run folder (no {RUN_MANIFEST})")
    config = stored_config(run_dir)
    folders = []
    for seed in config.seeds:
        folder = _seed_dir(run_dir, seed)
        if not os.path.isfile(os.path.join(folder, ckpt.MANIFEST)):
            raise ckpt.CheckpointError(
                f"{folder} has no checkpoint (the seed did not finish training); eval never trains: run"
                f" `fastprompt train --resume {run_dir}` first"
            )
        folders.append(folder)
    return folders


def load_summaries(run_dirs: list[str]) -> list[dict]:
    summaries = []
    for run_dir in run_dirs:
        path = os.path.join(os.path.abspath(os.path.expanduser(run_dir)), "summary.json")
        if not os.path.isfile(path):
            raise RunError(f"{run_dir} has no summary.json (the run is not complete)")
        summaries.append(ckpt.read_json(path, "run summary"))
    return summaries
