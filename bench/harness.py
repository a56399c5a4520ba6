"""One case of the suite: build a contender and measure one kind (bench/workloads.py) of its work.

- train_step: time its TrainStep on one batch held on the device, measure its memory, count its FLOPs.
- runner_epoch: one epoch of fastprompt.training.train_epoch (the runner's loop) over the synthetic 16-shot set
  held on the device (bench/synthetic.py), after a few warm-up steps of the same loop (compilation, graph capture).
- inference: the class logits of a batch in eval mode under no_grad (and autocast on a GPU) at the workload's
  batch, through fastprompt.evaluation.EvalStep for the contenders that do not compile.

Speed and memory come from the same setup and the same work (STYLE.md §9): peak allocated memory is reset before
the first (warm-up) call, so it covers compilation, graph capture and every timed call. Timed callables synchronise
the device before they return. A contender that compiles is skipped, with the reason, when compilation is off.
"""

from __future__ import annotations

import gc
import itertools
import math
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from fastprompt.fast import fast_path
from fastprompt.memory import StepOptions, options_for_model, predict_peak_memory
from fastprompt.training import train_epoch

from .contenders import CONTENDERS, build_contender, build_model, contender_options
from .flops import inference_flops, train_step_flops
from .synthetic import device_set
from .workloads import SHOTS, Workload

LR = 2e-3
NO_FLOOR = "the FLOP floor is computed for train_step and inference records (bench/flops.py)"


@dataclass
class Settings:
    device: torch.device
    amp_dtype: torch.dtype | None
    rounds: int
    warmup: int
    compile: bool  # run the contenders that compile ('compiled', 'tuned')
    compile_reason: str | None  # why not, when not
    compile_options: dict = field(default_factory=dict)
    peak_flops: float | None = None
    peak_reason: str | None = None
    memory_check: bool = True  # skip cases whose predicted peak exceeds the device memory

    def describe(self) -> dict:
        out = asdict(self)
        out["device"] = str(self.device)
        out["amp_dtype"] = None if self.amp_dtype is None else str(self.amp_dtype).replace("torch.", "")
        out["optimizer"] = f"SGD(lr={LR:g}, momentum=0.9, weight_decay=5e-4)"
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_fields(record: dict, device: torch.device) -> None:
    if device.type == "cuda":
        record.update(peak_allocated_bytes=torch.cuda.max_memory_allocated(device),
                      peak_reserved_bytes=torch.cuda.max_memory_reserved(device))
    else:
        record["memory_reason"] = (f"no CUDA device: peak memory is torch.cuda.max_memory_allocated, which {device}"
                                   " lacks; predicted_peak_bytes is the arithmetic estimate")


def _base_record(kind: str, workload: Workload, method: str, contender: str, settings: Settings) -> dict:
    from .results import RECORD_FIELDS

    spec = CONTENDERS[contender]
    record = dict.fromkeys(RECORD_FIELDS)
    record.update(
        kind=kind, workload=workload.name, backbone=workload.backbone, classes=workload.classes,
        batch=workload.batch, method=method, contender=contender,
        precision="fp32" if settings.amp_dtype is None else str(settings.amp_dtype).replace("torch.", ""),
        clip_precision=spec.clip_precision(settings.amp_dtype), text_path=spec.text_path,
        truncate_text=spec.truncate_text, patched=spec.patched,
        compile_options=settings.compile_options if spec.compile else None,
        warmup_rounds=settings.warmup,
    )
    if kind == "runner_epoch":
        record["floor_reason"] = NO_FLOOR
    return record


def _timed(record: dict, call, settings: Settings, batch: int, benchmark) -> list:
    """pytest-benchmark rounds of `call()`, each synchronised with the device before its time is taken, from a
    reset peak-memory counter (warm-up rounds included); fills the timing fields and returns every round's output."""
    device = settings.device
    times, outputs = [], []

    def one_round():
        start = time.perf_counter()
        outputs.append(call())
        _sync(device)
        times.append(time.perf_counter() - start)

    _reset_peak(device)
    benchmark.pedantic(one_round, rounds=settings.rounds, warmup_rounds=settings.warmup, iterations=1)
    _timing_fields(record, times, settings, batch)
    return outputs


def record_case(kind: str, case, settings: Settings, results, benchmark) -> dict:
    """What every bench test does first: run the case, add its record to the results file, and skip the test
    (with the record's status and reason) unless the case ran."""
    import pytest

    workload, method, contender = case
    benchmark.group = f"{kind}/{workload.name}/{method}"
    record = run_case(kind, workload, method, contender, settings, benchmark)
    results.add(record)
    if record["status"] != "ran":
        pytest.skip(f"{record['status']}: {record['reason']}")
    return record


def _skip(record: dict, status: str, reason: str) -> dict:
    record.update(status=status, reason=reason)
    return record


def run_case(kind: str, workload: Workload, method: str, contender: str, settings: Settings, benchmark) -> dict:
    """Run one (kind, workload, method, contender) case; returns its complete record (status ran/skipped/oom)."""
    record = _base_record(kind, workload, method, contender, settings)
    spec = CONTENDERS[contender]
    if spec.compile and not settings.compile:
        return _skip(record, "skipped", settings.compile_reason)
    measure = {"train_step": _train_step, "runner_epoch": _runner_epoch, "inference": _inference}[kind]
    device = settings.device
    release_memory(device)
    try:
        return measure(record, workload, method, contender, settings, benchmark)
    except torch.cuda.OutOfMemoryError as error:
        return _skip(record, "oom", f"out of memory: {str(error).splitlines()[0]}")
    finally:
        if spec.compile:
            torch._dynamo.reset()  # compiled graphs of this model; also keeps recompile limits per case
        release_memory(device)


def _too_big(record: dict, predicted_bytes: int, settings: Settings) -> str | None:
    """Why the case is skipped on memory grounds, or None."""
    if settings.device.type != "cuda" or not settings.memory_check:
        return None
    capacity = torch.cuda.get_device_properties(settings.device).total_memory
    if predicted_bytes <= 0.92 * capacity:
        return None
    return (f"predicted peak {predicted_bytes / 2**30:.1f} GiB exceeds 92% of the device's {capacity / 2**30:.1f} GiB"
            " (FASTPROMPT_BENCH_MEMORY_CHECK=0 to try anyway)")


def _finite_losses(record: dict) -> None:
    if not all(math.isfinite(v) for v in (record["loss_first"], record["loss_last"])):
        record["reason"] = f"non-finite loss {record['loss_first']} .. {record['loss_last']}"


def _timing_fields(record: dict, times: list[float], settings: Settings, batch: int) -> None:
    """Median, quintiles and images/s of the timed calls (those after the warm-up ones)."""
    timed = times[settings.warmup:] if len(times) > settings.warmup else times
    if len(times) <= settings.warmup:
        record["reason"] = "pytest-benchmark disabled: one call without warm-up"
    median = statistics.median(timed)
    quantiles = statistics.quantiles(timed, n=5, method="inclusive") if len(timed) > 1 else [median] * 4
    record.update(status="ran", rounds=len(timed), first_step_s=times[0], step_ms_median=median * 1e3,
                  step_ms_p20=quantiles[0] * 1e3, step_ms_p80=quantiles[3] * 1e3, images_per_s=batch / median)


# --- train_step ------------------------------------------------------------------------------------------
def _flop_fields(record: dict, model, options: StepOptions, batch: int, step_s: float, settings: Settings,
                 count=train_step_flops) -> None:
    """FLOPs of the contender's computation (`count`: bench.flops.train_step_flops or inference_flops), the FLOPs
    of fastprompt's (the exact floor) and the floor shares at the step time `step_s`."""
    flops = count(model, batch, options)
    exact = count(model, batch, contender_options("fastprompt", settings.device, settings.amp_dtype))
    record.update(flops_per_step=flops.total, flops_by_pass=flops.by_pass, text_tokens_per_layer=flops.text_tokens,
                  achieved_tflops=flops.total / step_s / 1e12, flops_exact=exact.total)
    if settings.peak_flops is None:
        record["floor_reason"] = settings.peak_reason
        return
    record["floor_ms"] = flops.total / settings.peak_flops * 1e3
    record["floor_share"] = record["floor_ms"] / (step_s * 1e3)
    record["floor_ms_exact"] = exact.total / settings.peak_flops * 1e3
    record["floor_share_exact"] = record["floor_ms_exact"] / (step_s * 1e3)


def _build(record, workload, method, contender, settings):
    model, step = build_contender(contender, method, workload.classnames(), backbone=workload.backbone,
                                  device=settings.device, amp_dtype=settings.amp_dtype,
                                  compile_options=settings.compile_options, lr=LR)
    options = options_for_model(model, settings.amp_dtype, optimizer="sgd")
    estimate = predict_peak_memory(model, workload.batch, options)
    record.update(predicted_peak_bytes=estimate.total_bytes, predicted_saved_bytes=estimate.saved_bytes)
    record["kernels"] = _kernel_plan(model)
    return model, step, options


def _kernel_plan(model) -> dict | None:
    """The fast path's kernel choice of a contender's model (None: not patched), so a record says which plan made
    its figure (e.g. the frozen MLP's first GEMM, fastprompt.ops.gemm_plan), and which towers ran their last block
    on the pooled rows only (PromptedCLIP.last_layer)."""
    path = fast_path(model.clip)
    if path is None:
        return None
    kernels = path.kernels
    return {"norm_mlp": kernels.norm_mlp, "attention": kernels.attention,
            "mlp_gemm": kernels.mlp_gemm if kernels.norm_mlp == "triton" else None,
            "pooled_last_layer": [tower for tower in ("vision", "text") if model.pools_last_layer(tower)]}


def _train_step(record, workload, method, contender, settings, benchmark) -> dict:
    device = settings.device
    model, step, options = _build(record, workload, method, contender, settings)
    reason = _too_big(record, record["predicted_peak_bytes"], settings)
    if reason:
        return _skip(record, "skipped", reason)
    height, width = model.info.image_size
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(workload.batch, 3, height, width, device=device, generator=generator)
    labels = torch.randint(0, workload.classes, (workload.batch,), device=device, generator=generator)
    losses = _timed(record, lambda: step(images, labels), settings, workload.batch, benchmark)
    record.update(loss_first=float(losses[0]), loss_last=float(losses[-1]), train_step_mode=step.mode,
                  cuda_graph_reason=step.graph_reason)
    _peak_fields(record, device)
    _flop_fields(record, model, options, workload.batch, record["step_ms_median"] / 1e3, settings)
    _finite_losses(record)
    _extra_info(benchmark, record)
    return record


# --- runner_epoch ----------------------------------------------------------------------------------------
def _runner_epoch(record, workload, method, contender, settings, benchmark) -> dict:
    """The runner's loop as `fastprompt train` runs it with data_on_device: TrainStep over the device set's
    batches, the learning rate set per epoch, train_epoch's one host sync per log interval."""
    device = settings.device
    model, step, _ = _build(record, workload, method, contender, settings)
    data = device_set(workload.classnames(), SHOTS, model.info.image_size[0], device)
    predicted = record["predicted_peak_bytes"] + data.nbytes()
    record.update(shots=SHOTS, dataset_bytes=data.nbytes(), predicted_peak_bytes=predicted)
    reason = _too_big(record, predicted, settings)
    if reason:
        return _skip(record, "skipped", reason)
    if len(data) < workload.batch:
        return _skip(record, "skipped", f"{len(data)} images make no batch of {workload.batch}")
    generator = torch.Generator().manual_seed(0)  # the runner's: a CPU generator for the batch order
    step.set_lr(LR)
    _reset_peak(device)
    # Warm-up: the first steps of an epoch, enough for the step to compile or capture its graph.
    warm_steps = max(settings.warmup, step.warmup_steps + 1)
    warm = train_epoch(step, itertools.islice(iter(data.batches(workload.batch, generator)), warm_steps),
                       device=device)
    epochs = []  # train_epoch times itself (synchronised at both ends); pytest-benchmark shows the same epoch

    def one_epoch():
        epochs.append(train_epoch(step, data.batches(workload.batch, generator), device=device))

    benchmark.pedantic(one_epoch, rounds=1, warmup_rounds=0, iterations=1)
    stats = epochs[0]
    record.update(status="ran", images_per_s=stats.images_per_second, epoch_s=stats.seconds,
                  epoch_steps=stats.steps, loader_s=stats.loader_seconds, first_step_s=warm.seconds,
                  rounds=1, loss_first=warm.loss, loss_last=stats.loss, train_step_mode=step.mode,
                  cuda_graph_reason=step.graph_reason)
    if stats.skipped_steps:
        record["reason"] = f"{stats.skipped_steps} non-finite steps skipped"
    _peak_fields(record, device)
    _finite_losses(record)
    _extra_info(benchmark, record)
    return record


# --- inference -------------------------------------------------------------------------------------------
def _inference(record, workload, method, contender, settings, benchmark) -> dict:
    """Class logits of a batch as evaluation computes them: eval mode, no_grad, autocast in the run's precision.
    `fastprompt` runs the library's evaluation engine (fastprompt.evaluation.EvalStep: cached text and prompt
    tokens, CUDA graph where shapes are static) — what `fastprompt eval`/`predict` run; `eager` the same forward
    without a graph (the research repos' loop, though with the text cache they lack: a conservative baseline);
    the contenders that compile run torch.compile(model)."""
    from fastprompt.evaluation import EvalStep

    device, amp = settings.device, settings.amp_dtype
    spec = CONTENDERS[contender]
    model = build_model(contender, method, workload.classnames(), backbone=workload.backbone, device=device,
                        amp_dtype=amp).eval()
    if spec.compile:
        forward = torch.compile(model, **settings.compile_options)

        def logits_of(images):
            with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                return model.predict(forward(images))
        mode = "compiled"
    else:
        step = EvalStep(model, amp_dtype=amp, cuda_graph="auto" if spec.patched else False, device=device)
        logits_of = step
        mode = None
    height, width = model.info.image_size
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(workload.batch, 3, height, width, device=device, generator=generator)
    logits = _timed(record, lambda: logits_of(images), settings, workload.batch, benchmark)  # what evaluation reads
    record["train_step_mode"] = mode or step.mode_name
    record["kernels"] = _kernel_plan(model)
    _peak_fields(record, device)
    _flop_fields(record, model, options_for_model(model, amp), workload.batch, record["step_ms_median"] / 1e3,
                 settings, count=inference_flops)
    if not torch.isfinite(logits[-1]).all():
        record["reason"] = "non-finite logits"
    _extra_info(benchmark, record)
    return record


def _extra_info(benchmark, record: dict) -> None:
    benchmark.extra_info.update({k: v for k, v in record.items() if isinstance(v, (int, float, str, bool))})
