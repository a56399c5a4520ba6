"""A run: every seed of one config, in one folder, with a manifest, results and tables.

    <output_dir>/
        run.json        config, preset and its diff, environment, split hashes per seed, status
        run.lock        while a process trains the run: its pid, host and start time (see lock.py)
        log.txt         the log lines printed during the run
        seed<S>/        checkpoint.safetensors + checkpoint.json (written when training ends, before the
                        evaluation), results.json (written last), state/ while training (the resumable state;
                        removed when the seed completes)
        summary.json, summary.md, summary.csv   written when every seed is complete

Bad input (config, dataset, images, batch size, backbone) is checked before the folder is created. A run
that fails or is interrupted is marked so in run.json and has no summary and no results.json for the
unfinished seed; `--resume latest` (or a path) continues it from the last saved epoch. One process at a time
holds a run folder (run.lock); a run whose status says `running` but whose lock no live process holds was
killed, and every command that reads it says so.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

from .. import backbone as bb
from ..notes import warnings_as_notes
from ..parallel import data_parallel
from . import checkpoint as ckpt
from . import lock as run_lock
from .config import (FIELDS, ConfigError, ResolvedConfig, RunConfig, apply_values, check_config, configured_vision,
                     set_field)
from .data import (check_targets, check_training_set, count_classes, load_dataset, one_class_targets_note, plan,
                   run_image_paths, short_classes_note, split_record, verify_paths)
from .engine import (SeedTrainer, build_model, load_backbone, numerics, progress_bar, resolve_device,
                     shard_text_if_asked)
from .eval_cache import EvalCache
from .results import csv_table, markdown_table, summarize_run

RUN_MANIFEST = "run.json"
# Keys that may change when a run is resumed: they do not change the training trajectory.
RESUMABLE_CHANGES = ("num_workers", "eval_batch_size", "eval_every", "output_dir")


class RunError(RuntimeError):
    """A run folder is not in the state the command needs (exists already, nothing to resume, ...)."""


class Echo:
    """Prints a line and appends it to the run's log file; the lines printed before the run folder exists (the
    checks' notes) go into the log when its path is set."""

    def __init__(self, printer=print):
        self.printer, self._path, self._early = printer, None, []

    @property
    def path(self) -> str | None:
        return self._path

    @path.setter
    def path(self, path: str) -> None:
        self._path = path
        early, self._early = self._early, []
        self._write(early)

    def __call__(self, line: str) -> None:
        self.printer(line)
        if self._path is None:
            self._early.append(line)
        else:
            self._write([line])

    def _write(self, lines: list[str]) -> None:
        if lines:
            with open(self._path, "a", encoding="utf-8") as handle:
                handle.writelines(line + "\n" for line in lines)


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
    # The data are checked before the backbone loads: a missing root, layout or image must fail in seconds,
    # not after a pretrained download (minutes online, the hub's retries offline). The image size the data
    # plan needs comes from the backbone's config; only where that needs the network (an hf-hub: name) or
    # the name is unknown (an immediate error) does the backbone load first.
    image_size = _configured_image_size(config.backbone)
    clip = None
    if image_size is None:
        clip = load_backbone(config.backbone, config.pretrained, num.clip_precision, device, config.kernels)
        image_size = bb.image_size_of(clip.visual)[0]
    full = load_dataset(config, config.dataset, image_size)
    loaded: dict = {}
    plans = {seed: plan(config, full, seed, image_size, loaded) for seed in config.seeds}
    for seed, (train, targets) in plans.items():
        check_targets(targets)
        if config.epochs > 0:  # epochs=0 evaluates the initial prompts (zero-shot CLIP): nothing is trained
            check_training_set(config, train)
    # Decode every file the run will read, the training set and the evaluation targets, before the run folder
    # exists: a bad image found later would cost a folder or the whole run. With data_on_device the training set
    # is decoded twice (here and onto the device): a few-shot set is small, and nothing is lost for it.
    paths = run_image_paths(plans, train_too=config.epochs > 0)
    if paths:
        with progress_bar(len(paths), "checking the images") as bar:
            verify_paths(paths, bar.update)
    if clip is None:
        clip = load_backbone(config.backbone, config.pretrained, num.clip_precision, device, config.kernels)
        if bb.image_size_of(clip.visual)[0] != image_size:
            raise RunError(f"backbone {config.backbone!r} loaded with image size {clip.visual.image_size}, but its"
                           f" config says {image_size}: the data were planned for {image_size} px")
    # Build once so bad method options and over-long class names fail now, not after the folder exists.
    first_train, _ = plans[config.seeds[0]]
    build_model(config, clip, first_train.classnames, config.seeds[0])
    echo(f"{config.method} / {config.protocol} on {full.name}: {count_classes(full.num_classes)},"
         f" {config.shots} shots, seeds {list(config.seeds)}, backbone {config.backbone}"
         f" ({config.pretrained or 'random weights'}), {num.name} on {device}{_processes_phrase()}")
    short = short_classes_note(full, config.shots) if config.epochs > 0 else None
    for note in (short, one_class_targets_note(plans[config.seeds[0]][1])):
        if note is not None:
            echo(note)
    return Prepared(config, clip, device, num, image_size, plans)


def _processes_phrase() -> str:
    """Under torchrun, what the header line adds: how many processes share each batch (the global batch is the
    config's batch_size, as in the papers)."""
    world = data_parallel.world_size()
    if world == 1:
        return ""
    return f", {world} processes (torchrun), each computing 1/{world} of every batch"


def _configured_image_size(backbone: str) -> int | None:
    """The input size of `backbone` read from its config without building it; None where that is not known
    offline (hf-hub: names, unknown names)."""
    vision = configured_vision(backbone)
    if vision is None:
        return None
    size = vision.get("image_size")
    if isinstance(size, (tuple, list)):
        size = size[0]
    return int(size) if size is not None else None


def _seed_dir(run_dir: str, seed: int) -> str:
    return os.path.join(run_dir, f"seed{seed}")


def _complete(seed_dir: str) -> dict | None:
    path = os.path.join(seed_dir, "results.json")
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(seed_dir, ckpt.MANIFEST)):
        return None
    result = ckpt.read_json(path, "seed results")
    return result if result.get("complete") else None


def status_line(run_dir: str, manifest: dict | None = None) -> str:
    """The run's status as run.json gives it, checked against its lock: 'running' with no live holder is stale."""
    if manifest is None:
        manifest = ckpt.read_json(os.path.join(run_dir, RUN_MANIFEST), "run manifest")
    status = manifest.get("status")
    if status != "running":
        return f"status {status!r}"
    alive, record = run_lock.holder(run_dir)
    if alive:
        return f"status 'running': it is being trained now by {run_lock.describe(record)}"
    who = f"its process ({run_lock.describe(record)}) is gone" if record else "no process holds it"
    return (f"status 'running' is stale: {who}, so the run was killed; continue it with"
            f" `fastprompt train --resume {run_dir}`")


def _check_new_folder(run_dir: str) -> None:
    if os.path.isfile(os.path.join(run_dir, RUN_MANIFEST)):
        raise RunError(
            f"{run_dir} already holds a run ({status_line(run_dir)}). Pass --resume latest to continue it, or choose"
            " another output_dir="
        )
    # run.lock alone is a run that was starting: a live one refuses at the lock, a dead one left it behind.
    if os.path.isdir(run_dir) and set(os.listdir(run_dir)) - {run_lock.LOCK_NAME}:
        raise RunError(f"output folder {run_dir} is not empty and holds no fastprompt run; choose another output_dir=")


def _take_lock(run_dir: str) -> run_lock.RunLock:
    try:
        return run_lock.acquire(run_dir)
    except run_lock.LockHeld as error:
        raise RunError(str(error)) from None


def resume_folder(path: str) -> str:
    """The run folder for `--resume PATH` (the run folder itself or a seed's state folder inside it)."""
    path = os.path.abspath(os.path.expanduser(path))
    for candidate in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
        if os.path.isfile(os.path.join(candidate, RUN_MANIFEST)):
            return candidate
    raise RunError(f"nothing to resume at {path}: no {RUN_MANIFEST} there (nor in its parents){_run_folder_hint(path)}")


def _run_folder_hint(path: str) -> str:
    """For a sweep's folder, or a seed's folder inside a run, given where a run folder is wanted: what to give."""
    from .sweep import is_sweep

    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isfile(os.path.join(parent, RUN_MANIFEST)) and os.path.isdir(path):
        return f"; it is a folder inside the run {parent}: give that"
    if not is_sweep(path):
        return ""
    runs = sorted(name for name in os.listdir(path) if os.path.isfile(os.path.join(path, name, RUN_MANIFEST)))
    example = f" (e.g. {os.path.join(path, runs[0])})" if runs else ""
    return (f"; it is a sweep's folder: run the `fastprompt sweep` command that made it again to continue it, and"
            f" give one of its runs here{example}")


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
    # The same checks as a new run: a bad value saved here would break every later resume.
    check_config(config)
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


def duplicate_names_noted_once(echo):
    """A run builds a model per seed and re-prompts it per target, each time warning about the same duplicate class
    names: each distinct warning becomes one note line of the run's output and log."""
    from ..text import DuplicateClassNamesWarning

    return warnings_as_notes(lambda message: echo(f"note: {message}"), noted_category=DuplicateClassNamesWarning)


def train_run(resolved: ResolvedConfig | None = None, resume_dir: str | None = None, config: RunConfig | None = None,
              printer=print, on_epoch_end=None) -> dict:
    """Train every seed of a config; with `resume_dir` continue that run. Returns the summary."""
    config = config or resolved.config
    join_torchrun(config.device)
    # Under torchrun every process trains, only rank 0 (which holds the lock) writes and prints: the other ranks
    # wait for its writes in data_parallel.on_main and get its failures from there.
    echo = Echo(printer if data_parallel.is_main() else _silent)
    run_dir = resume_dir or config.resolved_output_dir()
    if resume_dir is None:
        data_parallel.on_main(_check_new_folder, run_dir)
    # A resume locks first (the folder exists; a second process is refused before loading anything); a new run
    # after the checks that must fail before its folder exists.
    held = data_parallel.on_main(_take_lock, run_dir) if resume_dir else None
    try:
        with duplicate_names_noted_once(echo):
            prepared = prepare(config, echo)
            if resume_dir is None:
                held = data_parallel.on_main(_new_run_folder, run_dir)
            return _train_locked(resolved, resume_dir, config, prepared, run_dir, echo, held, on_epoch_end)
    finally:
        if held is not None:
            held.release()


def join_torchrun(device: str) -> None:
    """Join torchrun's process group when this process was started by torchrun (nothing otherwise)."""
    try:
        data_parallel.init_from_env(device)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _silent(line: str) -> None:
    """The printer of ranks other than 0: rank 0 prints every line once."""


def _new_run_folder(run_dir: str) -> run_lock.RunLock:
    """Create a new run's folder and take its lock (removing the folder again when that fails and it was ours)."""
    created = not os.path.isdir(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    held = None
    try:
        held = _take_lock(run_dir)
        _check_new_folder(run_dir)  # another process may have started a run here since the first check
    except BaseException:
        if held is not None:
            held.release()
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(run_dir)  # only if still empty: never remove what another process wrote
        raise
    return held


def _train_locked(resolved, resume_dir, config, prepared, run_dir, echo, held, on_epoch_end) -> dict:
    manifest_path = os.path.join(run_dir, RUN_MANIFEST)
    # None on ranks other than 0, which never write run.json.
    manifest = data_parallel.on_main(_start_manifest, resolved, resume_dir, config, prepared, run_dir, echo, held,
                                     share=False)
    # Each seed evaluates the same test splits (and eval_every again during training): kept after the first pass.
    evaluations = len(config.seeds) * (1 + (config.epochs // config.eval_every if config.eval_every else 0))
    trainer = SeedTrainer(config, prepared.clip, prepared.device, prepared.num, prepared.image_size, echo,
                          EvalCache.for_process(config.eval_cache, evaluations, prepared.device))
    results = []
    try:
        for seed in config.seeds:
            seed_dir = _seed_dir(run_dir, seed)
            done = data_parallel.on_main(_complete, seed_dir, share=True) if resume_dir else None
            if done is not None:
                echo(f"seed {seed}: complete already, results reused")
                results.append(done)
                continue
            train, targets = prepared.plans[seed]
            result = trainer.train(seed, train, targets, seed_dir, resume=resume_dir is not None,
                                   on_epoch_end=on_epoch_end)
            data_parallel.on_main(_fail_if_nothing_trained, seed, seed_dir, result)
            results.append(result)
        summary = data_parallel.on_main(write_summary, run_dir, config, results, share=True)
    except BaseException as error:
        if manifest is not None:
            interrupted = isinstance(error, KeyboardInterrupt)
            manifest.update(status="interrupted" if interrupted else "failed",
                            error=f"{type(error).__name__}: {error}", finished=ckpt.now())
            ckpt.atomic_write_json(manifest_path, manifest)
            if interrupted:
                echo(f"run interrupted; continue it from its last saved epoch with: fastprompt train --resume {run_dir}")
        raise
    if manifest is not None:
        manifest.update(status="complete", finished=ckpt.now())
        ckpt.atomic_write_json(manifest_path, manifest)
    echo("\n" + markdown_table([summary]))
    return summary


def _start_manifest(resolved, resume_dir, config, prepared, run_dir, echo, held) -> dict:
    """Rank 0's start of a run: the log file, the checks against a resumed run's manifest, run.json 'running'."""
    echo.path = os.path.join(run_dir, "log.txt")
    manifest_path = os.path.join(run_dir, RUN_MANIFEST)
    manifest = ckpt.read_json(manifest_path, "run manifest") if resume_dir else {"started": ckpt.now()}
    if resume_dir and manifest.get("status") == "running":
        # We hold the lock, so whoever wrote 'running' is gone without marking the run (killed).
        who = f"its process ({run_lock.describe(held.previous)})" if held.previous else "its process"
        echo(f"run.json said 'running', but {who} is gone: the run was killed; resuming from the last saved state")
    splits = {str(seed): split_record(train, targets) for seed, (train, targets) in prepared.plans.items()}
    if resume_dir and manifest.get("splits") not in (None, splits):
        changed = sorted(k for k in splits if manifest["splits"].get(k) != splits[k])
        raise ConfigError(
            f"cannot resume {run_dir}: the data changed since the run started (split hashes of seed(s)"
            f" {', '.join(changed)} differ); start a new run"
        )
    processes = data_parallel.world_size()
    if resume_dir and manifest.get("processes", 1) != processes:
        echo(f"note: the run started with {manifest.get('processes', 1)} process(es) and continues with {processes}:"
             " the same global batch, but the rest of the run is not bit-identical to an uninterrupted one")
    manifest.update({
        "format": "fastprompt.run/1",
        "config": config.to_dict(),
        "status": "running",
        "environment": ckpt.environment(prepared.device),
        "processes": processes,  # torchrun's WORLD_SIZE: the global batch is split over this many
        "splits": splits,
    })
    if resolved is not None:
        manifest["preset"] = {"name": resolved.preset_name,
                              "diff": {k: list(v) for k, v in resolved.diff().items()}, "notes": list(resolved.notes)}
    manifest.pop("error", None)
    if resume_dir:
        manifest.setdefault("resumed", []).append(ckpt.now())
    ckpt.atomic_write_json(manifest_path, manifest)
    echo(f"run folder {run_dir}")
    if resolved is not None:
        changes = resolved.diff()
        echo(f"preset {resolved.preset_name}; " + ("no changes" if not changes else "changed: " + ", ".join(
            f"{k} {before!r} -> {after!r}" for k, (before, after) in changes.items())))
        for note in resolved.notes:
            echo(f"note: {note}")
    return manifest


def _fail_if_nothing_trained(seed: int, seed_dir: str, result: dict) -> None:
    """A seed whose every training step was skipped (non-finite loss or gradient) trained nothing: its checkpoint
    is the initial prompts, not a result. Epochs shorter than max_bad_steps never trip the in-a-row guard, so this
    is checked over the whole history; the seed's results and checkpoint are removed so it does not count as
    complete (results.json first: without it the seed is unfinished whatever else remains)."""
    history = result.get("history") or []
    skipped = sum(int(epoch.get("skipped_steps") or 0) for epoch in history)
    if not skipped or any(int(epoch.get("images") or 0) for epoch in history):
        return
    for name in ("results.json", ckpt.MANIFEST, ckpt.TENSORS):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(seed_dir, name))
    from ..training import NonFiniteLossError

    raise NonFiniteLossError(
        f"seed {seed}: every training step ({skipped}) had a non-finite loss or gradient and was skipped, so"
        " nothing was trained; lower the lr, or use precision=fp32")


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
EVAL_OVERRIDES = ("device", "precision", "eval_batch_size", "num_workers", "root", "targets", "pretrained",
                  "shard_text", "eval_cache")


def check_eval_overrides(overrides: dict) -> None:
    """Only EVAL_OVERRIDES and dataset.* keys: a config key the checkpoint fixes is refused as such, a misspelt one
    is named with the closest key eval takes."""
    from ..keywords import closest

    allowed = f"eval takes only {', '.join(EVAL_OVERRIDES)}, dataset.*"
    for key in sorted(overrides):
        if key in EVAL_OVERRIDES or key.startswith("dataset."):
            continue
        near = closest(key, EVAL_OVERRIDES)
        if key not in FIELDS and near is not None:
            raise ConfigError(f"unknown key {key!r}; did you mean {near!r}? ({allowed})")
        raise ConfigError(f"eval cannot change {key} ({allowed}): the checkpoint fixes the method, its options and"
                          " the training data")


def evaluate_checkpoints(folders: list[str], overrides: dict | None = None, dataset: str | None = None,
                         subset: str = "all", mode: str | None = None, printer=print) -> list[dict]:
    """Evaluate saved checkpoints (never trains). Without `dataset`, on the targets of their own protocol
    (same seeds, same splits as training); with it, on that dataset's test split (`subset`)."""
    check_eval_overrides(overrides or {})
    join_torchrun(str((overrides or {}).get("device", "auto")))
    echo = Echo(printer if data_parallel.is_main() else _silent)  # every rank evaluates its shard; rank 0 prints
    with duplicate_names_noted_once(echo):
        return _evaluate_checkpoints(folders, overrides, dataset, subset, mode, echo)


def _evaluate_checkpoints(folders, overrides, dataset, subset, mode, echo) -> list[dict]:
    from ..data import resolve_dataset_name, subsample_classes
    from .data import Target

    outputs, backbones, caches = [], {}, {}
    for folder in folders:
        manifest, tensors = ckpt.load_checkpoint(folder)
        if not manifest.get("config"):
            raise ckpt.CheckpointError(f"{folder}: the checkpoint records no run config; evaluate it with predict()")
        config = RunConfig.from_dict(manifest["config"])
        if dataset is not None:
            # The dataset evaluated on takes the config's dataset slot, so that its root checks apply to it (a
            # checkpoint trained on the procedural set, as every import-dassl checkpoint records, refused any root);
            # the training data's own options stay behind unless it is the same dataset.
            name = dataset if dataset == "procedural" else resolve_dataset_name(dataset)
            if name != config.dataset:
                config.dataset, config.dataset_options = name, {}
        apply_values(config, overrides or {}, "override")
        check_config(config)  # eval_batch_size=0 and the like: the checks a new run's values get
        seed = int(manifest.get("seed", config.seeds[0]))
        config.seeds = (seed,)
        device = resolve_device(config.device)
        num = numerics(config.precision, device)
        key = (manifest["backbone"]["name"], config.pretrained, num.clip_precision, str(device), config.kernels)
        if key not in backbones:  # the seeds of a run share one frozen backbone
            backbones[key] = load_backbone(*key[:3], device, config.kernels)
        clip = backbones[key]
        image_size = bb.image_size_of(clip.visual)[0]
        if dataset is None:
            full = load_dataset(config, config.dataset, image_size)
            _, targets = plan(config, full, seed, image_size)
        else:
            splits = subsample_classes(load_dataset(config, dataset, image_size), subset)
            same = list(splits.classnames) == list(manifest["classnames"])
            targets = [Target(splits.name, subset, mode or ("base" if same else "novel"), splits)]
        check_targets(targets)
        note = one_class_targets_note(targets)
        if note is not None:
            echo(note)
        other = [t.dataset for t in targets if not ckpt.takes_class_set(manifest, t.splits.classnames)]
        if other:
            raise ckpt.CheckpointError(
                f"{folder}: its prompts are class-specific (one context for each of its {len(manifest['classnames'])}"
                f" training classes), so they cannot score the classes of {', '.join(other)}")
        model = shard_text_if_asked(_model_from_checkpoint(clip, manifest, tensors), config)
        echo(f"evaluating {ckpt.checkpoint_folder(folder)} ({manifest['method']}, seed {seed}, {num.name} on {device})")
        # One cache per device for all the checkpoints (a run's seeds share their test splits).
        cache = caches.setdefault(str(device), EvalCache.for_process(config.eval_cache, len(folders), device))
        trainer = SeedTrainer(config, clip, device, num, image_size, echo, cache)
        records = trainer.evaluate_targets(model, targets)
        outputs.append({"checkpoint": ckpt.checkpoint_folder(folder), "seed": seed, "targets": records})
    return outputs


def _model_from_checkpoint(clip, manifest: dict, tensors: dict):
    import fastprompt

    model = fastprompt.build(manifest["method"], clip, list(manifest["classnames"]), **manifest["options"])
    ckpt.load_into(model, manifest, tensors)
    return model


def finished_checkpoints(path) -> list[str]:
    """A checkpoint folder or checkpoint.json as given; for a run folder (run.json, seed folders) the checkpoints
    of its seeds that finished training, in seed order (none is an error that says so). hf-hub:org/name is fetched
    from the Hugging Face Hub (runner.hub) and read as the folder it is."""
    from .hub import is_hub_reference, local_checkpoint

    path = local_checkpoint(path) if is_hub_reference(path) else os.fspath(path)
    if not os.path.isfile(os.path.join(path, RUN_MANIFEST)) or os.path.isfile(os.path.join(path, ckpt.MANIFEST)):
        return [path]
    seeds = sorted((name for name in os.listdir(path) if os.path.isfile(os.path.join(path, name, ckpt.MANIFEST))),
                   key=lambda name: (len(name), name))  # seed2 before seed10
    if not seeds:
        raise ckpt.CheckpointError(f"{path} is a run folder without a finished checkpoint (no <seed>/checkpoint.json;"
                                   f" run.json: {status_line(path)})")
    return [os.path.join(path, seed) for seed in seeds]


def checkpoints_of_run(run_dir: str) -> list[str]:
    run_dir = os.path.abspath(os.path.expanduser(run_dir))
    if not os.path.isfile(os.path.join(run_dir, RUN_MANIFEST)):
        raise RunError(f"{run_dir} is not a run folder (no {RUN_MANIFEST}){_run_folder_hint(run_dir)}")
    config = stored_config(run_dir)
    folders = []
    training, holder = run_lock.holder(run_dir)
    for seed in config.seeds:
        folder = _seed_dir(run_dir, seed)
        if not os.path.isfile(os.path.join(folder, ckpt.MANIFEST)) and training:
            raise ckpt.CheckpointError(f"{folder} has no checkpoint yet: the run is being trained now by"
                                       f" {run_lock.describe(holder)}; evaluate it when that finishes")
        if not os.path.isfile(os.path.join(folder, ckpt.MANIFEST)):
            raise ckpt.CheckpointError(
                f"{folder} has no checkpoint (the seed did not finish training); eval never trains: run"
                f" `fastprompt train --resume {run_dir}` first (run.json: {status_line(run_dir)})"
            )
        if not os.path.isfile(os.path.join(folder, "results.json")):
            # The checkpoint is written before the seed's evaluation, which did not finish (`eval --run` compares
            # with the logged results, so it needs them).
            raise ckpt.CheckpointError(
                f"{folder} has its final checkpoint but no results.json (its evaluation did not finish); run"
                f" `fastprompt train --resume {run_dir}` to evaluate it, or `fastprompt eval --checkpoint {folder}`"
                f" (run.json: {status_line(run_dir)})"
            )
        folders.append(folder)
    state = status_line(run_dir)
    if state != "status 'complete'":
        # Every seed has its final checkpoint (written before its evaluation), so they can be evaluated; say
        # that the run itself did not finish rather than let it pass for a complete one.
        if data_parallel.is_main():
            print(f"fastprompt: note: {run_dir} is not complete ({state}); evaluating its saved checkpoints",
                  file=sys.stderr)
    return folders


def load_summaries(run_dirs: list[str]) -> list[dict]:
    """The summaries of run folders and of sweep folders (one per dataset of a sweep, its seeds merged)."""
    summaries, origins, seen = [], [], {}
    for run_dir in run_dirs:
        real = os.path.realpath(os.path.expanduser(run_dir))
        if real in seen:
            print(f"fastprompt: note: {run_dir} is {seen[real]} again; its rows are shown once", file=sys.stderr)
            continue
        seen[real] = run_dir
        found = _folder_summaries(run_dir)
        summaries += found
        origins += [run_dir] * len(found)
    return _told_apart(summaries, origins)


def _folder_summaries(run_dir: str) -> list[dict]:
    from .sweep import is_sweep, sweep_summaries

    folder = os.path.abspath(os.path.expanduser(run_dir))
    path = os.path.join(folder, "summary.json")
    if not os.path.isdir(folder):
        raise RunError(f"{run_dir}: no such run folder")
    if is_sweep(folder):
        found, missing = sweep_summaries(folder)
        if not found:
            raise RunError(f"{run_dir}: no dataset of the sweep has all its seeds complete yet (waiting:"
                           f" {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''})")
        if missing:
            print(f"fastprompt: note: {run_dir}: the table leaves out the datasets with runs not complete yet"
                  f" ({', '.join(missing)})", file=sys.stderr)
        return found
    if not os.path.isfile(os.path.join(folder, RUN_MANIFEST)):
        hint = _run_folder_hint(folder) or "; report takes the folders that `fastprompt train` wrote"
        raise RunError(f"{run_dir} is not a run folder (no {RUN_MANIFEST}){hint}")
    if not os.path.isfile(path):
        raise RunError(f"{run_dir} has no summary.json (the run is not complete: {status_line(folder)})")
    return [ckpt.read_json(path, "run summary")]


def _told_apart(summaries: list[dict], origins: list[str]) -> list[dict]:
    """Rows of one name from different folders (two runs of maple on eurosat with other settings) would read
    alike in the table: each such name gets its folder, as given, in brackets (the basename where those
    differ)."""
    folders_of: dict[tuple, set] = {}
    for summary, origin in zip(summaries, origins):
        folders_of.setdefault(_row_key(summary), set()).add(origin)
    shown = []
    for summary, origin in zip(summaries, origins):
        folders = folders_of[_row_key(summary)]
        if len(folders) > 1:
            bases = {os.path.basename(os.path.normpath(f)) for f in folders}
            label = os.path.basename(os.path.normpath(origin)) if len(bases) == len(folders) else origin
            summary = {**summary, "name": f"{summary['name']} [{label}]"}
        shown.append(summary)
    return shown


def _row_key(summary: dict) -> tuple:
    """What a table row shows of a run besides its figures: its name and dataset(s)."""
    datasets = tuple(sorted(target["dataset"] for target in summary.get("targets", {}).values()))
    return summary["name"], datasets
