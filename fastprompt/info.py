"""Environment and capability report: ``python -m fastprompt.info`` (or ``info()`` for a dict).

Lists the devices, the versions that matter (python, torch, CUDA, triton, open_clip, xformers)
and, per device, every attention backend as available or unavailable with the reasons, plus the
backend ``auto`` picks. Paste its output into bug reports.
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys

import torch

from fastprompt.ops import backends


def _package_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _devices() -> list[dict]:
    devices = [{"type": "cpu", "name": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads()}]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            devices.append({"type": "cuda", "index": index, "name": props.name,
                            "capability": f"{props.major}.{props.minor}",
                            "memory_gib": round(props.total_memory / 2**30, 1),
                            "multiprocessors": props.multi_processor_count})
    return devices


def info() -> dict:
    """Devices, versions and attention backends, as plain data."""
    versions = {
        "fastprompt": _package_version("fastprompt"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _package_version("triton"),
        "open_clip": _package_version("open_clip_torch"),
        "xformers": _package_version("xformers"),
    }
    problem = backends.triton_import_problem()
    triton_mode = problem or ("interpreter (TRITON_INTERPRET=1)" if backends.triton_interpreted()
                              else "compiled")
    rows = []
    for device in _devices():
        name = "cpu" if device["type"] == "cpu" else f"cuda:{device['index']}"
        dtype = torch.float32 if device["type"] == "cpu" else torch.bfloat16
        rows.extend(backends.backend_report(name, dtype))
    return {"platform": platform.platform(), "versions": versions, "triton_mode": triton_mode,
            "devices": _devices(), "attention_backends": rows}


def format_info(report: dict) -> str:
    lines = ["fastprompt environment", "", "versions:"]
    for name, version in report["versions"].items():
        lines.append(f"  {name:<11} {version if version is not None else 'not installed'}")
    lines.append(f"  {'platform':<11} {report['platform']}")
    lines.append(f"  {'triton mode':<11} {report['triton_mode']}")
    lines += ["", "devices:"]
    for device in report["devices"]:
        if device["type"] == "cpu":
            lines.append(f"  cpu: {device['name']} ({device['threads']} threads)")
        else:
            lines.append(f"  cuda:{device['index']}: {device['name']}, capability {device['capability']}, "
                         f"{device['memory_gib']} GiB, {device['multiprocessors']} SMs")
    if not any(d["type"] == "cuda" for d in report["devices"]):
        lines.append("  no CUDA device")
    lines += ["", "attention backends (head_dim 64):"]
    for row in report["attention_backends"]:
        where = f"{row['op']} on {row['device']} ({row['dtype']})"
        status = "available" if row["available"] else "unavailable"
        pick = "  <- auto" if row["auto_choice"] else ""
        lines.append(f"  {where:<48} {row['backend']:<9} {status}{pick}")
        for reason in row["reasons"] + row["auto_skips"]:
            lines.append(f"  {'':<48}   - {reason}")
    return "\n".join(lines)


def main() -> int:
    print(format_info(info()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
