"""Timing for the GPU session's scripts (glue_ops.py, gemm_shapes.py, decoder.py, host_gpu.py, profile_step.py):
milliseconds per call, plain (what a step without a CUDA graph pays, host included) or as a CUDA graph replay (the GPU
time alone)."""

from __future__ import annotations

import statistics
import time

import torch


def ms_per_call(fn, device: torch.device, n: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / n * 1e3


def median_ms_per_call(fn, device: torch.device, n: int, rounds: int = 3) -> float:
    """The median over `rounds` of ms_per_call (no warm-up: the caller has warmed fn up): a whole training step,
    timed where one slow round should not decide the figure."""
    return statistics.median(ms_per_call(fn, device, n, warmup=0) for _ in range(rounds))


def graphed_ms_per_call(fn, device: torch.device, n: int) -> float | None:
    """fn captured once in a CUDA graph (after one call on a side stream: lazy state, allocator pools), then timed
    as replays; None off CUDA."""
    if device.type != "cuda":
        return None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return ms_per_call(graph.replay, device, n)


def conditions(device: torch.device, dtype: torch.dtype) -> dict:
    """What every record carries: the device, torch and the dtype it was timed in."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)"
    return {"device": name, "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch.")}
