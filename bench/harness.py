"""One case of the suite: build a contender, time its training steps, measure its memory, count its FLOPs.

Speed and memory come from the same setup and the same steps (STYLE.md §9): peak allocated memory is reset
before the first (warm-up) step, so it covers compilation, graph capture and every timed step. The timed
callable synchronises the device before it returns, so each round is one whole step. Data is created on the
device once (no loader in the loop).
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from fastprompt.memory import StepOptions, options_for_model, predict_peak_memory, step_geometry
from .contenders import CONTENDERS, build_contender

from .flops import step_flops
from .workloads import Workload


@dataclass
class Settings:
    device: torch.device
    amp_dtype: torch.dtype | None
    rounds: int
    warmup: int
    compile: bool  # run the 'compiled' contender
    compile_reason: str | None  # why not, when not
    compile_options: dict = field(default_factory=dict)
    peak_flops: float | None = None
    peak_reason: str | None = None
    memory_check: bool = True  # skip cases whose predicted peak exceeds the device memory

    def describe(self) -> dict:
        out = asdict(self)
        out["device"] = str(self.device)
        out["amp_dtype"] = None if self.amp_dtype is None else str(self.amp_dtype).replace("torch.", "")
        out["optimizer"] = "SGD(lr=2e-3, momentum=0.9, weight_decay=5e-4)"
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _base_record(workload: Workload, method: str, contender: str, settings: Settings) -> dict:
    from .results import RECORD_FIELDS

    spec = CONTENDERS[contender]
    record = dict.fromkeys(RECORD_FIELDS)
    record.update(
        workload=workload.name, backbone=workload.backbone, classes=workload.classes, batch=workload.batch,
        method=method, contender=contender,
        precision="fp32" if settings.amp_dtype is None else str(settings.amp_dtype).replace("torch.", ""),
        clip_precision=spec.clip_precision(settings.amp_dtype), text_path=spec.text_path,
        truncate_text=spec.truncate_text, patched=spec.patched,
        compile_options=settings.compile_options if spec.compile else None,
        warmup_rounds=settings.warmup,
    )
    return record


def _skip(record: dict, status: str, reason: str) -> dict:
    record.update(status=status, reason=reason)
    return record


def _flop_fields(record: dict, model, options: StepOptions, batch: int, step_s: float, settings: Settings) -> None:
    flops = step_flops(step_geometry(model, batch, options))
    exact_options = StepOptions.for_contender("fastprompt", settings.device, settings.amp_dtype)
    exact = step_flops(step_geometry(model, batch, exact_options))
    record.update(flops_per_step=flops.total, flops_by_pass=flops.by_pass, text_tokens_per_layer=flops.text_tokens,
                  achieved_tflops=flops.total / step_s / 1e12, flops_exact=exact.total)
    if settings.peak_flops is None:
        record["floor_reason"] = settings.peak_reason
        return
    record["floor_ms"] = flops.total / settings.peak_flops * 1e3
    record["floor_share"] = record["floor_ms"] / (step_s * 1e3)
    record["floor_ms_exact"] = exact.total / settings.peak_flops * 1e3
    record["floor_share_exact"] = record["floor_ms_exact"] / (step_s * 1e3)


def run_case(workload: Workload, method: str, contender: str, settings: Settings, benchmark) -> dict:
    """Run one (workload, method, contender) case; returns its complete record (status ran/skipped/oom)."""
    record = _base_record(workload, method, contender, settings)
    if contender == "compiled" and not settings.compile:
        return _skip(record, "skipped", settings.compile_reason)
    device = settings.device
    release_memory(device)
    try:
        return _measure(record, workload, method, contender, settings, benchmark)
    except torch.cuda.OutOfMemoryError as error:
        return _skip(record, "oom", f"out of memory: {str(error).splitlines()[0]}")
    finally:
        if contender == "compiled":
            torch._dynamo.reset()  # compiled graphs of this model; also keeps recompile limits per case
        release_memory(device)


def _measure(record, workload, method, contender, settings, benchmark) -> dict:
    device = settings.device
    classnames = workload.classnames()
    model, step = build_contender(contender, method, classnames, backbone=workload.backbone, device=device,
                                  amp_dtype=settings.amp_dtype, compile_options=settings.compile_options)
    options = options_for_model(model, settings.amp_dtype, optimizer="sgd")
    estimate = predict_peak_memory(model, workload.batch, options)
    record.update(predicted_peak_bytes=estimate.total_bytes, predicted_saved_bytes=estimate.saved_bytes)
    if device.type == "cuda" and settings.memory_check:
        capacity = torch.cuda.get_device_properties(device).total_memory
        if estimate.total_bytes > 0.92 * capacity:
            return _skip(record, "skipped", f"predicted peak {estimate.total_bytes / 2**30:.1f} GiB exceeds 92% of"
                                            f" the device's {capacity / 2**30:.1f} GiB (FASTPROMPT_BENCH_MEMORY_CHECK=0"
                                            " to try anyway)")
    height, width = model.info.image_size
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(workload.batch, 3, height, width, device=device, generator=generator)
    labels = torch.randint(0, len(classnames), (workload.batch,), device=device, generator=generator)
    times, losses = [], []

    def one_step():
        start = time.perf_counter()
        loss = step(images, labels)
        _sync(device)
        times.append(time.perf_counter() - start)
        losses.append(loss)

    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    benchmark.pedantic(one_step, rounds=settings.rounds, warmup_rounds=settings.warmup, iterations=1)
    timed = times[settings.warmup:] if len(times) > settings.warmup else times
    if len(times) <= settings.warmup:
        record["reason"] = "pytest-benchmark disabled: one step without warm-up"
    median = statistics.median(timed)
    quantiles = statistics.quantiles(timed, n=5, method="inclusive") if len(timed) > 1 else [median] * 4
    record.update(
        status="ran", rounds=len(timed), first_step_s=times[0], step_ms_median=median * 1e3,
        step_ms_p20=quantiles[0] * 1e3, step_ms_p80=quantiles[3] * 1e3, images_per_s=workload.batch / median,
        loss_first=float(losses[0]), loss_last=float(losses[-1]), train_step_mode=step.mode,
        cuda_graph_reason=step.graph_reason,
    )
    if device.type == "cuda":
        record.update(peak_allocated_bytes=torch.cuda.max_memory_allocated(device),
                      peak_reserved_bytes=torch.cuda.max_memory_reserved(device))
    else:
        record["memory_reason"] = (f"no CUDA device: peak memory is torch.cuda.max_memory_allocated, which {device}"
                                   " lacks; predicted_peak_bytes is the arithmetic estimate")
    _flop_fields(record, model, options, workload.batch, median, settings)
    if not all(math.isfinite(v) for v in (record["loss_first"], record["loss_last"])):
        record["reason"] = f"non-finite loss {record['loss_first']} .. {record['loss_last']}"
    benchmark.extra_info.update({k: v for k, v in record.items() if isinstance(v, (int, float, str, bool))})
    return record
