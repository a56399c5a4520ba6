"""The benchmark's results file: `bench/results/<device>-<date>.json`, rewritten atomically after every case.

One document: what ran where (device, versions, git commit, settings, the FLOP peak used) and one record per
(kind, workload, method, contender); kinds in bench/workloads.py. A later session on the same day with the same
device, versions, commit and settings adds its cases to the file (re-run cases replace theirs), so the GPU suite can
run one workload at a time; anything else starts the file afresh. Ratios are derived whenever the file is written,
from records in the same file: speed and memory vs `eager` (the research repos' computation) and vs `tuned` (the
best stock-PyTorch step, the honest margin), and a runner epoch's images/s as a share of the same case's train step.
So a partial run (a crash, a subset) still leaves a consistent file. `check_document` is what the suite's
completeness tests use to refuse an incomplete file.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import subprocess
import tempfile
from pathlib import Path

import torch

from .workloads import KINDS

SCHEMA = 2  # 2: records carry `kind`, the tuned ratios and the runner-epoch fields
META_FIELDS = ("schema", "created", "device", "versions", "git", "settings", "peak", "results")
DEVICE_FIELDS = ("type", "name")
VERSION_FIELDS = ("torch", "triton", "open_clip", "python", "cuda", "fastprompt")
# Written by with_ratios from the other records of the file, never by a case.
DERIVED_FIELDS = (
    "speedup_vs_eager", "memory_vs_eager", "ratio_reason", "speedup_vs_tuned", "memory_vs_tuned",
    "tuned_ratio_reason", "epoch_vs_train_step", "epoch_vs_train_step_reason",
)
# Every record carries every field; a field that does not apply is null and its `*_reason` says why.
RECORD_FIELDS = (
    "kind", "workload", "backbone", "classes", "batch", "method", "contender", "status", "reason",
    "precision", "clip_precision", "text_path", "truncate_text", "patched", "train_step_mode", "cuda_graph_reason",
    "compile_options", "warmup_rounds", "rounds", "first_step_s", "step_ms_median", "step_ms_p20", "step_ms_p80",
    "images_per_s", "loss_first", "loss_last",
    "peak_allocated_bytes", "peak_reserved_bytes", "memory_reason", "predicted_peak_bytes", "predicted_saved_bytes",
    "flops_per_step", "flops_by_pass", "text_tokens_per_layer", "achieved_tflops", "floor_ms", "floor_share",
    "flops_exact", "floor_ms_exact", "floor_share_exact", "floor_reason",
    "shots", "dataset_bytes", "epoch_steps", "epoch_s", "loader_s",
) + DERIVED_FIELDS
STATUSES = ("ran", "skipped", "oom")
# What a record that ran must hold, per kind (positive numbers).
MEASURED = {
    "train_step": ("step_ms_median", "images_per_s", "flops_per_step", "predicted_peak_bytes"),
    "runner_epoch": ("images_per_s", "epoch_s", "epoch_steps", "dataset_bytes"),
    "inference": ("step_ms_median", "images_per_s"),
}


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": props.name, "memory_bytes": props.total_memory,
                "capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count}
    return {"type": device.type, "name": platform.processor() or platform.machine() or device.type,
            "threads": torch.get_num_threads()}


def device_slug(info: dict) -> str:
    if info["type"] != "cuda":
        return info["type"]
    return re.sub(r"[^a-z0-9]+", "-", info["name"].lower()).strip("-") or "cuda"


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - not installed: recorded as null
        return None


def versions() -> dict:
    import fastprompt

    return {
        "torch": torch.__version__,
        "triton": _version("triton"),
        "open_clip": _version("open_clip_torch"),
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "fastprompt": fastprompt.__version__,
    }


def git_state(root: Path) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip() != ""
        return {"commit": commit, "dirty": dirty, "reason": None}
    except (OSError, subprocess.SubprocessError) as error:
        return {"commit": None, "dirty": None, "reason": f"git unavailable: {error}"}


def atomic_write_json(path: Path, document: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(document, f, indent=1, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _ratios(record: dict, base: dict | None, name: str) -> tuple[float | None, float | None, str | None]:
    """(speed ratio, memory ratio, reason) of `record` to `base`, the `name` record of the same case."""
    if record["status"] != "ran":
        return None, None, f"{record['contender']} did not run"
    if base is None:
        return None, None, f"no {name} record in this run"
    if base["status"] != "ran":
        return None, None, f"{name} did not run ({base['status']}: {base['reason']})"
    speed = record["images_per_s"] / base["images_per_s"]
    if record["peak_allocated_bytes"] is not None and base["peak_allocated_bytes"]:
        return speed, record["peak_allocated_bytes"] / base["peak_allocated_bytes"], None
    return speed, None, "memory ratio needs CUDA peak memory"


def with_ratios(records: list[dict]) -> list[dict]:
    """Each record plus its speed and memory ratios to the eager and the tuned record of the same kind, workload
    and method, and (runner epochs) its images/s as a share of the train step of the same case."""
    by_case = {(r["kind"], r["workload"], r["method"], r["contender"]): r for r in records}
    out = []
    for r in records:
        r = dict(r)
        case = (r["kind"], r["workload"], r["method"])
        r["speedup_vs_eager"], r["memory_vs_eager"], r["ratio_reason"] = _ratios(
            r, by_case.get((*case, "eager")), "eager")
        r["speedup_vs_tuned"], r["memory_vs_tuned"], r["tuned_ratio_reason"] = _ratios(
            r, by_case.get((*case, "tuned")), "tuned")
        r["epoch_vs_train_step"] = None
        if r["kind"] != "runner_epoch":
            r["epoch_vs_train_step_reason"] = "runner_epoch records only"
        else:
            step = by_case.get(("train_step", r["workload"], r["method"], r["contender"]))
            r["epoch_vs_train_step"], _, r["epoch_vs_train_step_reason"] = _ratios(r, step, "train_step")
            if r["epoch_vs_train_step"] is not None:
                r["epoch_vs_train_step_reason"] = None  # the memory part does not apply here
        out.append(r)
    return out


class ResultsFile:
    def __init__(self, directory: Path, device: torch.device, settings: dict, peak: dict, repo: Path):
        info = device_info(device)
        now = dt.datetime.now(dt.timezone.utc)
        self.path = Path(directory) / f"{device_slug(info)}-{now.date().isoformat()}.json"
        self.meta = {"schema": SCHEMA, "created": now.isoformat(timespec="seconds"), "device": info,
                     "versions": versions(), "git": git_state(repo), "settings": settings, "peak": peak}
        self.records: list[dict] = self._earlier_records()

    def _earlier_records(self) -> list[dict]:
        """Records of an earlier session into the same file that measured the same thing (device, versions,
        commit, settings), so a suite run in parts (one workload at a time) adds up to one file."""
        try:
            earlier = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return []
        same = all(earlier.get(k) == self.meta[k] for k in ("schema", "device", "versions", "git", "settings"))
        return [r for r in earlier.get("results", []) if same and isinstance(r, dict)]

    def add(self, record: dict) -> None:
        missing = [f for f in RECORD_FIELDS if f not in record and f not in DERIVED_FIELDS]
        if missing:
            raise ValueError(f"benchmark record lacks {missing}")
        self.records = [r for r in self.records if _key(r) != _key(record)] + [record]
        atomic_write_json(self.path, self.document())

    def document(self) -> dict:
        return {**self.meta, "results": with_ratios(self.records)}


def _key(record: dict) -> tuple:
    return record["kind"], record["workload"], record["method"], record["contender"]


def check_document(document: dict) -> list[str]:
    """Problems that make a results document incomplete (empty list: complete)."""
    problems = [f"missing top-level field {f!r}" for f in META_FIELDS if f not in document]
    if problems:
        return problems
    problems += [f"device lacks {f!r}" for f in DEVICE_FIELDS if f not in document["device"]]
    problems += [f"versions lack {f!r}" for f in VERSION_FIELDS if f not in document["versions"]]
    if "commit" not in document["git"]:
        problems.append("git lacks 'commit'")
    if not document["results"]:
        problems.append("no results")
    for r in document["results"]:
        name = "/".join(str(r.get(k)) for k in ("kind", "workload", "method", "contender"))
        problems += [f"{name}: missing {f!r}" for f in RECORD_FIELDS if f not in r]
        if r.get("kind") not in KINDS:
            problems.append(f"{name}: kind {r.get('kind')!r} not in {KINDS}")
        elif r.get("status") not in STATUSES:
            problems.append(f"{name}: status {r.get('status')!r} not in {STATUSES}")
        elif r["status"] != "ran" and not r.get("reason"):
            problems.append(f"{name}: {r['status']} without a reason")
        elif r["status"] == "ran":
            for f in MEASURED[r["kind"]]:
                if not isinstance(r.get(f), (int, float)) or r[f] <= 0:
                    problems.append(f"{name}: {f} = {r.get(f)!r}")
            if r.get("peak_allocated_bytes") is None and not r.get("memory_reason"):
                problems.append(f"{name}: no peak memory and no reason")
            if r.get("floor_share") is None and not r.get("floor_reason"):
                problems.append(f"{name}: no floor share and no reason")
    return problems
