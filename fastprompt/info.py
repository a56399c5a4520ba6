"""Environment and capability report: ``python -m fastprompt.info`` (or ``info()`` for a dict).

Lists the devices, the versions that matter (python, torch, CUDA, triton, open_clip, xformers, and the
onnx extra's packages),
what each op of the fast path (LayerNorm, MLP, coupling maps, attention, prefix attention) runs on for
each device under ``fastprompt.patch(clip)``'s default ``backend="auto"``, and every attention backend as
available or unavailable with the reasons. Paste its output into bug reports.
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys

import torch

from fastprompt.ops import backends, gemm_plan


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
        # What `fastprompt export --output x.onnx` needs (the onnx extra); a .pt2 program needs only torch.
        "onnx": _package_version("onnx"),
        "onnxscript": _package_version("onnxscript"),
        "onnxruntime": _package_version("onnxruntime"),
    }
    devices = _devices()
    rows, ops = [], []
    for device in devices:
        name = "cpu" if device["type"] == "cpu" else f"cuda:{device['index']}"
        dtype = torch.float32 if device["type"] == "cpu" else (
            torch.bfloat16 if backends.computes_bf16(name) else torch.float16)  # what 'auto' precision computes in
        report = backends.backend_report(name, dtype)
        rows.extend(report)
        ops.extend(_op_plan(name, dtype, report))
    return {"platform": platform.platform(), "versions": versions, "triton_mode": _triton_mode(devices),
            "devices": devices, "ops": ops, "attention_backends": rows}


def _triton_mode(devices: list[dict]) -> str:
    """Whether fastprompt's Triton kernels can run here, and how. Compiled Triton needs a CUDA GPU: on a
    machine without one, saying "compiled" would claim kernels that never run."""
    problem = backends.triton_import_problem()
    if problem:
        return f"unusable: {problem}"
    if backends.triton_interpreted():
        return ("interpreter (TRITON_INTERPRET=1): the kernels run on the CPU, slowly, and only where"
                " patch(clip, backend='triton') asks for them; auto never picks them")
    if any(d["type"] == "cuda" for d in devices):
        from .kernels import _launch

        launches = ("launched through the compiled kernels' launchers once Triton has chosen them"
                    " (fastprompt.kernels._launch)" if _launch.ENABLED else
                    f"launched through Triton's own path (fastprompt.kernels._launch was checked against Triton"
                    f" {', '.join(_launch.CHECKED_RELEASES[:-1])} and {_launch.CHECKED_RELEASES[-1]}, not this one)")
        return f"compiled, on the CUDA devices below; {launches}"
    return ("installed, but no kernel runs: Triton compiles for CUDA GPUs and there is none here"
            " (TRITON_INTERPRET=1 runs the kernels on the CPU, for tests)")


def _op_plan(device: str, dtype: torch.dtype, attention_rows: list[dict]) -> list[dict]:
    """What each op of a CLIP patched with backend='auto' on `device` runs on, and why.

    The LayerNorm/MLP rule is the one fastprompt.fast.patch applies (backends.block_kernels_problem): the Triton
    kernels on a CUDA device of compute capability >= 8.0 where they import, PyTorch ops elsewhere; coupling maps
    are grouped into one launch exactly when LayerNorm/MLP run on Triton (FastPath.groups_coupling_maps). Attention is the backend
    that fastprompt.ops.backends' auto selection picks for a head_dim-64 request on that device.
    tests/test_info.py checks these claims against a really patched CLIP."""
    problem = backends.block_kernels_problem(device)
    on_cuda = device.startswith("cuda")
    triton = problem is None
    why = (f"fastprompt's Triton kernels ({'interpreted' if backends.triton_interpreted() else 'compiled'})"
           if triton else problem)
    plan = [
        ("LayerNorm", "triton" if triton else "pytorch",
         "fp32 statistics, input gradient only for frozen weights" if triton else why),
        ("MLP", *(_mlp_plan(device) if triton else ("pytorch", why))),
        ("coupling maps", "triton, grouped" if triton else "pytorch, one Linear per layer",
         "every prompted layer's map in one launch each way" if triton
         else "the grouped launch is a Triton kernel, used on CUDA devices only" if not on_cuda
         else f"the grouped launch is a Triton kernel ({why})"),
    ]
    for op, label in (("attention", "attention"), ("prefix_varlen_attention", "prefix attention")):
        by_backend = {r["backend"]: r for r in attention_rows if r["op"] == op}
        order = backends.get_backend_order(op, device.split(":")[0])
        chosen = next((name for name in order if by_backend[name]["auto_choice"]), None)
        # Why auto passed over the backends before the chosen one in its order (e.g. triton on a CPU).
        passed = [f"{name} skipped: {(by_backend[name]['reasons'] + by_backend[name]['auto_skips'])[0]}"
                  for name in order[:order.index(chosen) if chosen else len(order)]
                  if by_backend[name]["reasons"] or by_backend[name]["auto_skips"]]
        note = f"auto's order here: {', '.join(order)}" + ("; " + "; ".join(passed) if passed else "")
        plan.append((label, chosen or "none (no backend can run it)", note))
    dtype_name = str(dtype).replace("torch.", "")
    return [{"device": device, "dtype": dtype_name, "op": op, "runs_on": runs_on, "why": why}
            for op, runs_on, why in plan]


def _mlp_plan(device: str) -> tuple[str, str]:
    """(runs on, why) of the frozen MLP with the Triton kernels: its first GEMM's plan is fastprompt.ops.gemm_plan's."""
    plan, why = gemm_plan.resolve("auto", device.split(":")[0])
    runs_on = "triton" if plan == "triton" else "cublas fc1 + triton activation"
    return runs_on, f"frozen MLP saving only its input, hidden recomputed in backward; {why}"


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
    lines += ["", "what each op runs on with fastprompt.patch(clip) (backend='auto'):"]
    for row in report["ops"]:
        lines.append(f"  {row['device'] + ' (' + row['dtype'] + ')':<18} {row['op']:<17} {row['runs_on']:<30}"
                     f" {row['why']}")
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
