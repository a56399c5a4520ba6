"""A sweep: methods x protocol over datasets x shots x seeds, packed onto the machine's devices.

The papers' tables are many small runs (the base-to-novel table alone is 11 datasets x 3 seeds per method), each
using a fraction of a GPU. A sweep makes every (method, dataset, shots, seed) a run of its own, trained by
`fastprompt train` in a process of its own, and keeps `--jobs-per-device` of them running on each device until all
are done:

    <output>/
        sweep.json      what the sweep trains (methods, protocol, datasets, shots, seeds, root, config values)
        config.json     the --config file's values, as every job reads them
        run.lock        while a sweep process drives the folder (lock.py)
        sweep.log       the sweep's own lines
        <method>-<dataset>-<shots>shot-seed<S>/   one run folder per job (run.py)
        logs/<job>.log  each job's own output
        summary.json, summary.md, summary.csv   one row per method and dataset (and shots), its seeds merged;
                        written when every job is complete, and what `fastprompt report <output>` reads
        paper.md        the same runs beside the papers' published figures, when any ran the papers' setting

A job is a separate process so that a crash, an out-of-memory error or a bad dataset ends that job only: the others
go on, and the failures are listed at the end. Running the same command again continues the sweep: complete runs are
kept, interrupted and failed ones resume from their last saved epoch (`fastprompt train --resume`), the rest start.
SIGTERM or Ctrl-C is passed on to the running jobs, which mark their runs interrupted (as `fastprompt train` does).
Each job's device is chosen with CUDA_VISIBLE_DEVICES, so its config keeps `device=auto` and resumes on any GPU; the
jobs running at once split this process's cores between them (each pinned to its share, with as many threads).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import subprocess
import sys
import time

from . import checkpoint as ckpt
from . import lock as run_lock
from .config import ConfigError
from .engine import _format_duration
from .run import Echo

SWEEP_MANIFEST = "sweep.json"
SWEEP_FORMAT = "fastprompt.sweep/1"
# Set per job by the sweep (flags of its own, or the job's place in the sweep): refused as overrides.
SET_PER_JOB = {"method": "--method", "protocol": "--protocol", "dataset": "--datasets", "shots": "--shots",
               "seeds": "--seeds", "output_dir": "--output", "device": "--devices", "root": "--root"}
STOP_GRACE_S = 120.0  # how long stopped jobs get to save and mark their runs before they are killed


@dataclasses.dataclass(frozen=True)
class Job:
    name: str
    method: str
    dataset: str
    shots: int
    seed: int
    run_dir: str
    classes: int  # the dataset's class count (0 where unknown): bigger jobs start first


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where a job runs: `label` for the log lines, `env` the variables its process gets, `cpus` the cores it is
    pinned to (None: not pinned)."""
    label: str
    env: dict
    cpus: tuple[int, ...] | None = None


@dataclasses.dataclass
class Sweep:
    methods: tuple[str, ...]
    protocol: str
    datasets: tuple[str, ...]
    shots: tuple[int, ...]
    seeds: tuple[int, ...]
    root: str | None
    file_values: dict
    overrides: dict
    output_dir: str

    @classmethod
    def from_definition(cls, stored: dict, output_dir: str) -> Sweep:
        """The sweep a sweep.json describes (definition's inverse)."""
        return cls(tuple(stored["methods"]), stored["protocol"], tuple(stored["datasets"]), tuple(stored["shots"]),
                   tuple(stored["seeds"]), stored["root"], stored["config_file_values"], stored["overrides"],
                   output_dir)

    def definition(self) -> dict:
        """What sweep.json stores and a later run of the same command must match."""
        return {"format": SWEEP_FORMAT, "methods": list(self.methods), "protocol": self.protocol,
                "datasets": list(self.datasets), "shots": list(self.shots), "seeds": list(self.seeds),
                "root": self.root, "config_file_values": self.file_values, "overrides": self.overrides}

    def jobs(self) -> list[Job]:
        """Every (method, dataset, shots, seed), the largest class sets first (ImageNet's runs take longest:
        started first, they do not end the sweep alone), then more shots first, then by method and seed."""
        from ..data.layouts import BENCHMARKS

        def job(method, dataset, shots, seed):
            name = f"{method}-{dataset}-{shots}shot-seed{seed}"
            return Job(name, method, dataset, shots, seed, os.path.join(self.output_dir, name),
                       getattr(BENCHMARKS.get(dataset), "num_classes", 0))

        jobs = [job(method, dataset, shots, seed) for method in self.methods for dataset in self.datasets
                for shots in self.shots for seed in self.seeds]
        return sorted(jobs, key=lambda j: (-j.classes, -j.shots, self.datasets.index(j.dataset),
                                           self.methods.index(j.method), j.seed))

    def train_arguments(self, job: Job) -> list[str]:
        """`fastprompt train` arguments that start `job`'s run."""
        arguments = ["--method", job.method, "--protocol", self.protocol, "--dataset", job.dataset,
                     "--shots", str(job.shots), "--seeds", str(job.seed), "--output", job.run_dir]
        if self.root is not None and job.dataset != "procedural":  # drawn in memory: it refuses a root
            arguments += ["--root", self.root]
        if self.file_values:
            arguments += ["--config", os.path.join(self.output_dir, "config.json")]
        return arguments + [f"{key}={value}" for key, value in self.job_overrides(job).items()]

    def job_overrides(self, job: Job) -> dict:
        """The overrides `job` gets: a `dataset.<option>` goes to the datasets that take that option only (the
        procedural set's num_test_per_class, a split file's generate_split), a method option (n_ctx, depth) to the
        methods that take it only, the config keys to every job."""
        from ..data.registry import dataset_options
        from ..methods import method_options
        from .config import FIELDS

        takes = {f"dataset.{name}" for name in dataset_options(job.dataset)} | set(method_options(job.method))
        return {key: value for key, value in self.overrides.items() if key in FIELDS or key in takes}


def _split_list(text: str, what: str, convert=str) -> tuple:
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    if not items:
        raise ConfigError(f"{what} is empty")
    try:
        values = tuple(convert(item) for item in items)
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated integers, got {text!r}") from None
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise ConfigError(f"{what} names {', '.join(repeated)} twice")
    return values


def plan_sweep(methods: str, protocol: str, datasets: str, shots: str, seeds: str, root: str | None,
               file_values: dict, overrides: dict, output_dir: str | None) -> Sweep:
    """The sweep the command line asks for, every job's config checked as `fastprompt train` checks it (a bad
    override is one error before anything starts, not one failure per job)."""
    from ..data import resolve_dataset_name
    from ..data.protocols import CROSS_DATASET_TARGETS, FEW_SHOT_SHOTS, protocol_plan
    from ..data.splits import DatasetError
    from .config import resolve_config

    # Read as train reads them (case, '-'); several methods: one table with an Average row per method.
    method_names = _split_list(",".join(m.strip().lower().replace("-", "_") for m in methods.split(",")), "--method")
    protocol = protocol.strip().lower()
    for key in overrides:
        if key in SET_PER_JOB:
            raise ConfigError(f"{key}= is set per job by the sweep; give {SET_PER_JOB[key]} instead")
        if key == "targets":
            raise ConfigError("targets= is the protocol's in a sweep (its table needs the same targets in every run)")
    for key in file_values:
        if key in SET_PER_JOB:
            raise ConfigError(f"{key} in --config is set per job by the sweep; give {SET_PER_JOB[key]} instead")
    if protocol in ("xd", "dg") and datasets == "all":
        datasets = "imagenet"  # the transfer protocols train on ImageNet only
    if datasets == "all":
        names = ("imagenet", *CROSS_DATASET_TARGETS)
    else:
        names = []
        for name in _split_list(datasets, "--datasets"):
            try:
                names.append(resolve_dataset_name(name) if name != "procedural" else name)
            except DatasetError as error:
                raise ConfigError(f"--datasets: {error}") from None
        names = _split_list(",".join(names), "--datasets")  # a name given twice under two spellings
    shot_counts = FEW_SHOT_SHOTS if shots == "all" else _split_list(shots, "--shots", int)
    if any(count < 1 for count in shot_counts):
        raise ConfigError(f"--shots must be positive integers, got {shots!r}")
    if len(shot_counts) > 1 and protocol != "fewshot":
        raise ConfigError(f"several --shots make the fewshot protocol's table; a {protocol} sweep trains one shot"
                          " count (give one value)")
    seed_values = _split_list(seeds, "--seeds", int)
    output = os.path.abspath(os.path.expanduser(output_dir or os.path.join(
        "runs", f"sweep-{'-'.join(method_names)}-{protocol}")))
    # Absolute, as every job's command and sweep.json hold it: the same sweep run again from another folder.
    root = os.path.abspath(os.path.expanduser(root)) if root is not None else None
    # The xd / dg runs evaluate on other datasets: their folders are needed as much as the training one.
    needed = [name for dataset in names for name, _ in protocol_plan(protocol, dataset).targets]
    _check_dataset_folders(list(dict.fromkeys(needed)), root)
    sweep = Sweep(method_names, protocol, tuple(names), tuple(shot_counts), seed_values, root, dict(file_values),
                  {key: str(value) for key, value in overrides.items()}, output)
    jobs = sweep.jobs()
    for key in sweep.overrides:
        if not any(key in sweep.job_overrides(job) for job in jobs):
            what = (f"no dataset of the sweep ({', '.join(names)}) has the option {key.removeprefix('dataset.')!r}"
                    if key.startswith("dataset.") else
                    f"neither a config key nor an option of {', '.join(method_names)}")
            raise ConfigError(f"{key}: {what}")
    for job in jobs:
        values = dict(sweep.job_overrides(job), method=job.method, protocol=protocol, dataset=job.dataset,
                      shots=str(job.shots), seeds=str(job.seed), output_dir=job.run_dir)
        if root is not None and job.dataset != "procedural":
            values["root"] = root
        try:
            resolve_config(file_values, values)
        except ConfigError as error:
            raise ConfigError(f"{job.name}: {error}") from None
    return sweep


def _check_dataset_folders(names, root: str | None) -> None:
    """The most common reason for every job of a sweep to fail: a dataset folder that is not under --root. Checked
    once here (each job checks its dataset's layout in full when it starts)."""
    from ..data.layouts import BENCHMARKS

    folders = {name: BENCHMARKS[name].folder for name in names if name in BENCHMARKS}
    if folders and root is None:
        raise ConfigError(f"--root is needed: the folder that holds the dataset folders ({', '.join(folders)})")
    if root is not None and not os.path.exists(root):
        raise ConfigError(f"--root {root} does not exist")
    missing = [f"{name} ({os.path.join(root, folder)})" for name, folder in folders.items()
               if not os.path.isdir(os.path.join(root, folder))]
    if missing:
        raise ConfigError(f"no dataset folder for {', '.join(missing)}; `fastprompt prepare NAME --root {root}`"
                          " checks or downloads one")


# --- devices ------------------------------------------------------------------------------------------------------
def device_slots(devices: str, jobs_per_device: int) -> list[Slot]:
    """`jobs_per_device` slots on each device: 'auto' (every visible GPU, else the CPU), 'cpu', or GPU indices
    '0,1,3' (as numbered in this process, i.e. within CUDA_VISIBLE_DEVICES where that is set)."""
    if isinstance(jobs_per_device, bool) or not isinstance(jobs_per_device, int) or jobs_per_device < 1:
        raise ConfigError(f"--jobs-per-device must be a positive integer, got {jobs_per_device!r}")
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if devices == "auto":
        devices = ",".join(str(i) for i in range(count)) if count else "cpu"
    if devices == "cpu":
        return _share_cores([Slot(f"cpu#{k}", {"CUDA_VISIBLE_DEVICES": ""}) for k in range(jobs_per_device)])
    indices = _split_list(devices, "--devices", int)
    if not count:
        raise ConfigError(f"--devices {devices} names GPUs, but this machine has no CUDA device; use --devices cpu")
    wrong = [i for i in indices if not 0 <= i < count]
    if wrong:
        raise ConfigError(f"--devices: no GPU {', '.join(map(str, wrong))} here (GPUs 0 to {count - 1} are visible)")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    physical = [part.strip() for part in visible.split(",")] if visible else [str(i) for i in range(count)]
    # Round-robin over the GPUs: the first jobs (and the last, when fewer remain than slots) spread over every GPU
    # before any GPU takes a second one.
    return _share_cores([Slot(f"cuda:{i}" + ("" if k == 0 else f"#{k}"), {"CUDA_VISIBLE_DEVICES": physical[i]})
                         for k in range(jobs_per_device) for i in indices])


def device_names(slots: list[Slot]) -> str:
    """'cuda:0, cuda:1' (or 'cpu'): the devices the slots run on."""
    return ", ".join(sorted({slot.label.split("#")[0] for slot in slots}))


def _share_cores(slots: list[Slot]) -> list[Slot]:
    """Each slot its own equal share of this process's cores (pinned, and as many intra-op threads), so that the
    jobs' training threads, image decoding and loader workers do not fight over the same cores; with fewer cores
    than slots, one thread each and no pinning."""
    from .machine import usable_cores

    cores = usable_cores()
    if len(cores) < len(slots):
        return [dataclasses.replace(slot, env=dict(slot.env, OMP_NUM_THREADS="1")) for slot in slots]
    share = len(cores) // len(slots)
    return [dataclasses.replace(slot, env=dict(slot.env, OMP_NUM_THREADS=str(share)),
                                cpus=tuple(cores[k * share:(k + 1) * share])) for k, slot in enumerate(slots)]


# --- the jobs' states -------------------------------------------------------------------------------------------
def job_state(job: Job) -> str:
    """'complete', 'resume' (a run that stopped before it ended), 'running' (a live process holds it), or 'new'."""
    from .run import RUN_MANIFEST

    manifest_path = os.path.join(job.run_dir, RUN_MANIFEST)
    if not os.path.isfile(manifest_path):
        return "new"
    alive, _ = run_lock.holder(job.run_dir)
    if alive:
        return "running"
    status = ckpt.read_json(manifest_path, "run manifest").get("status")
    if status == "complete" and os.path.isfile(os.path.join(job.run_dir, "summary.json")):
        return "complete"
    return "resume"


def _check_same_sweep(sweep: Sweep) -> None:
    path = os.path.join(sweep.output_dir, SWEEP_MANIFEST)
    stored = ckpt.read_json(path, "sweep manifest")
    wanted = sweep.definition()
    changed = [key for key in wanted if stored.get(key) != wanted[key]]
    if changed:
        detail = "; ".join(_difference(key, stored.get(key), wanted[key]) for key in changed)
        raise ConfigError(f"{sweep.output_dir} holds a sweep started with other settings ({detail}); run it with"
                          " the settings it started with to continue it, or give another --output")


def _difference(key: str, before, after) -> str:
    if isinstance(before, dict) and isinstance(after, dict):  # config values: name the keys that differ
        parts = [f"{k}={before[k]} now {after[k]}" for k in before if k in after and before[k] != after[k]]
        parts += [f"{k}={after[k]} is new" for k in after if k not in before]
        parts += [f"{k}={before[k]} is missing" for k in before if k not in after]
        return f"{key}: {', '.join(parts)}"
    return f"{key}: {before!r} now {after!r}"


def _prepare_folder(sweep: Sweep) -> None:
    """Create the sweep's folder (or check that the one there is this sweep) before the lock is taken."""
    path = os.path.join(sweep.output_dir, SWEEP_MANIFEST)
    if os.path.isfile(path):
        _check_same_sweep(sweep)
        return
    if os.path.isdir(sweep.output_dir) and set(os.listdir(sweep.output_dir)) - {run_lock.LOCK_NAME}:
        raise ConfigError(f"output folder {sweep.output_dir} is not empty and holds no sweep; give another --output")
    os.makedirs(os.path.join(sweep.output_dir, "logs"), exist_ok=True)
    if sweep.file_values:
        ckpt.atomic_write_json(os.path.join(sweep.output_dir, "config.json"), sweep.file_values)
    ckpt.atomic_write_json(path, sweep.definition())


def _job_result(job: Job) -> str:
    summary = ckpt.read_json(os.path.join(job.run_dir, "summary.json"), "run summary")
    parts = [f"{key} {value['accuracy'][0]:.2f}" for key, value in summary["targets"].items()]
    return ", ".join(parts[:4]) + (f" (+{len(parts) - 4} targets)" if len(parts) > 4 else "")


def time_left(pending: list[Job], running: list[tuple[Job, float]], took: dict, slots: int,
              sizes: dict | None = None) -> float | None:
    """Seconds until the sweep ends, roughly: each job not done is expected to take what the finished jobs of its
    method, dataset and shots took; a kind not finished yet, its size (classes x shots, the training images up to
    the protocol's split) at the rate of the finished jobs of its method per unit of size (else of all finished
    jobs), so that the small datasets after ImageNet are not expected to take ImageNet's time (the presets'
    epochs per dataset and the evaluation are left out of this size). `sizes` maps a finished job's key to its
    classes x shots. A running job has run for its elapsed seconds already. The work left is spread over the
    slots. None before any job finished."""
    if not took:
        return None
    sizes = sizes or {}

    def rate(keys) -> float | None:
        known = [key for key in keys if sizes.get(key)]
        return sum(took[k] for k in known) / sum(sizes[k] for k in known) if known else None

    overall = sum(took.values()) / len(took)
    any_rate = rate(list(took))

    def expected(job: Job) -> float:
        alike = [seconds for (method, dataset, shots, _), seconds in took.items()
                 if (method, dataset, shots) == (job.method, job.dataset, job.shots)]
        if alike:
            return sum(alike) / len(alike)
        per_unit = rate([key for key in took if key[0] == job.method]) or any_rate
        size = job.classes * job.shots
        return per_unit * size if per_unit is not None and size else overall

    work = sum(expected(job) for job in pending) + sum(max(0.0, expected(job) - ran) for job, ran in running)
    return work / max(1, slots)


def _killed(returncode: int) -> str | None:
    """What a job ended by a signal it did not handle was told (None for an exit of its own)."""
    if returncode >= 0:
        return None
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    if name == "SIGKILL":
        return ("killed by SIGKILL: out of host memory (the kernel's OOM killer) or kill -9 (running the sweep again"
                " resumes it)")
    return f"killed by {name} (running the sweep again resumes it)"


def _last_error(log_path: str) -> str:
    """The job's error line (`fastprompt: error: ...`), else its last line."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as handle:
            lines = [line.strip() for line in handle.read().splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    errors = [line for line in lines if line.startswith("fastprompt: error")]
    return (errors or lines or ["(empty log)"])[-1]


# --- running ----------------------------------------------------------------------------------------------------
def run_sweep(sweep: Sweep, slots: list[Slot], poll_s: float = 0.5,
              printer=functools.partial(print, flush=True)) -> dict:
    """Train every job not complete yet, `len(slots)` at a time; returns {'complete', 'failed', 'summaries'}.
    Ctrl-C / SIGTERM (cli.Terminated) stops the running jobs gracefully and is raised again."""
    _prepare_folder(sweep)
    try:
        held = run_lock.acquire(sweep.output_dir)
    except run_lock.LockHeld as error:
        raise ConfigError(str(error)) from None
    try:
        echo = Echo(printer)  # the run's echo: each line printed and appended to sweep.log
        echo.path = os.path.join(sweep.output_dir, "sweep.log")
        return _run_locked(sweep, slots, poll_s, echo)
    finally:
        held.release()


def _run_locked(sweep: Sweep, slots: list[Slot], poll_s: float, echo) -> dict:
    jobs = sweep.jobs()
    states = {job.name: job_state(job) for job in jobs}
    held = [job for job in jobs if states[job.name] == "running"]
    if held:
        from .run import status_line

        raise ConfigError(f"{held[0].run_dir} is being trained by another process ({status_line(held[0].run_dir)});"
                          " stop it or wait for it, then run the sweep again")
    pending = [job for job in jobs if states[job.name] != "complete"]
    done = len(jobs) - len(pending)
    resumed = sum(states[job.name] == "resume" for job in pending)
    def count(n: int, what: str) -> str:
        return f"{n} {what}" + ("s" if n != 1 else "")

    axes = [count(len(sweep.methods), "method")] if len(sweep.methods) > 1 else []
    axes += [count(len(sweep.datasets), "dataset"), count(len(sweep.shots), "shot count"),
             count(len(sweep.seeds), "seed")]
    echo(f"sweep {','.join(sweep.methods)} {sweep.protocol}: {count(len(jobs), 'run')} ({' x '.join(axes)})"
         f" in {sweep.output_dir}; {done} complete already,"
         f" {resumed} to resume, {len(pending) - resumed} to start; {len(slots)} at a time on {device_names(slots)}")
    free = list(slots)
    running: dict = {}  # Popen -> (job, slot, start time)
    failed: list[tuple[Job, str]] = []
    took: dict = {}  # (method, dataset, shots, seed) -> seconds, of the jobs this process saw complete
    sizes: dict = {}  # the same keys -> classes x shots
    try:
        while pending or running:
            while free and pending:
                job, slot = pending.pop(0), free.pop(0)
                running[_start(sweep, job, slot, states[job.name])] = (job, slot, time.monotonic())
                echo(f"  started {job.name} on {slot.label}" + (" (resuming)" if states[job.name] == "resume" else ""))
            time.sleep(poll_s)
            for process in [p for p in running if p.poll() is not None]:
                job, slot, started = running.pop(process)
                free.append(slot)
                free.sort(key=slots.index)  # every GPU's first slot before any second one, as at the start
                seconds = time.monotonic() - started
                took_text = _format_duration(seconds)
                if process.returncode == 0 and job_state(job) == "complete":
                    done += 1
                    key = (job.method, job.dataset, job.shots, job.seed)
                    took[key], sizes[key] = seconds, job.classes * job.shots
                    now = time.monotonic()
                    left = time_left(pending, [(j, now - t) for j, _, t in running.values()], took, len(slots),
                                     sizes)
                    echo(f"  {job.name} complete in {took_text}: {_job_result(job)} ({done}/{len(jobs)} complete"
                         + (f"; the sweep ends in about {_format_duration(left)})" if left and (pending or running)
                            else ")"))
                else:
                    why = _killed(process.returncode) or _last_error(_log_path(sweep, job))
                    failed.append((job, why))
                    echo(f"  {job.name} FAILED after {took_text} (exit {process.returncode}): {why}"
                         f" [log: {_log_path(sweep, job)}]")
    except BaseException as error:  # Ctrl-C, SIGTERM (cli.Terminated), or a failure of the sweep itself
        _stop(running, echo)
        if isinstance(error, KeyboardInterrupt):
            echo(f"sweep stopped: {len(running)} runs interrupted (each resumes from its last saved epoch),"
                 f" {len(pending)} not started; run the same command again to continue")
        raise
    summaries = None
    if failed:
        echo(f"{len(failed)} of {len(jobs)} runs failed: {', '.join(job.name for job, _ in failed)}. Each log"
             " is in logs/; fix the cause and run the same command again (complete runs are kept, failed ones resume)")
    else:
        summaries = write_sweep_summary(sweep.output_dir)
        from .paper import paper_comparison
        from .results import markdown_table

        echo("\n" + markdown_table(summaries))
        comparison = paper_comparison(summaries)
        if comparison.startswith("|"):  # some run of the papers' setting: its figures beside the papers'
            ckpt.atomic_write_text(os.path.join(sweep.output_dir, "paper.md"), comparison)
            echo(comparison)
    return {"complete": done, "failed": [job.name for job, _ in failed], "summaries": summaries}


def _log_path(sweep: Sweep, job: Job) -> str:
    return os.path.join(sweep.output_dir, "logs", f"{job.name}.log")


def _start(sweep: Sweep, job: Job, slot: Slot, state: str) -> subprocess.Popen:
    arguments = ["--resume", job.run_dir] if state == "resume" else sweep.train_arguments(job)
    command = [sys.executable, "-m", "fastprompt", "train", *arguments]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **slot.env)  # the log shows each line as it is printed
    pin = (lambda: os.sched_setaffinity(0, slot.cpus)) if slot.cpus else None
    # Its own session: a Ctrl-C in the terminal reaches the sweep only, which stops each job once (SIGTERM).
    with open(_log_path(sweep, job), "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(command)}   [{slot.label}" + (f", cores {_ranges(slot.cpus)}]\n" if slot.cpus
                                                               else "]\n"))
        log.flush()
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=pin)


def _ranges(cores: tuple[int, ...]) -> str:
    return f"{cores[0]}-{cores[-1]}" if cores == tuple(range(cores[0], cores[-1] + 1)) else ",".join(map(str, cores))


def _stop(running: dict, echo) -> None:
    """SIGTERM to every running job (each marks its run interrupted and exits), SIGKILL after STOP_GRACE_S."""
    if not running:
        return
    echo(f"  stopping {len(running)} running jobs ...")
    for process in running:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for process in running:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- the merged table ---------------------------------------------------------------------------------------------
def is_sweep(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, SWEEP_MANIFEST))


def sweep_summaries(sweep_dir: str) -> tuple[list[dict], list[str]]:
    """One summary per (method, dataset, shots) of the sweep whose seeds are all complete, the seeds merged as one
    run's (results.aggregate_seeds); and the names of the jobs not complete yet."""
    from .results import summarize_run
    from .run import RUN_MANIFEST, _complete, _seed_dir

    stored = ckpt.read_json(os.path.join(sweep_dir, SWEEP_MANIFEST), "sweep manifest")
    if stored.get("format") != SWEEP_FORMAT:
        raise ConfigError(f"{sweep_dir}/{SWEEP_MANIFEST} is not a fastprompt sweep ({stored.get('format')!r})")
    sweep = Sweep.from_definition(stored, os.path.abspath(sweep_dir))
    several_shots = len(sweep.shots) > 1
    summaries, missing = [], []
    all_jobs = sweep.jobs()
    for method, dataset, shots in ((m, d, k) for m in sweep.methods for d in sweep.datasets for k in sweep.shots):
        jobs = [j for j in all_jobs if (j.method, j.dataset, j.shots) == (method, dataset, shots)]
        results = [_complete(_seed_dir(j.run_dir, j.seed)) if job_state(j) == "complete" else None for j in jobs]
        if any(result is None for result in results):
            missing += [j.name for j, result in zip(jobs, results, strict=True) if result is None]
            continue
        name = f"{method} {dataset}" + (f" {shots}-shot" if several_shots else "")
        summary = summarize_run(sweep.protocol, name, results)
        config = ckpt.read_json(os.path.join(jobs[0].run_dir, RUN_MANIFEST), "run manifest")["config"]
        summary["config"] = dict(config, seeds=list(sweep.seeds), output_dir=sweep.output_dir)
        summaries.append(summary)
    return summaries, missing


def write_sweep_summary(sweep_dir: str) -> list[dict]:
    from .results import csv_table, markdown_table

    summaries, missing = sweep_summaries(sweep_dir)
    if missing:
        raise ConfigError(f"{sweep_dir}: runs not complete: {', '.join(missing)}")
    ckpt.atomic_write_json(os.path.join(sweep_dir, "summary.json"), {"format": SWEEP_FORMAT, "summaries": summaries})
    ckpt.atomic_write_text(os.path.join(sweep_dir, "summary.md"), markdown_table(summaries))
    ckpt.atomic_write_text(os.path.join(sweep_dir, "summary.csv"), csv_table(summaries))
    return summaries
