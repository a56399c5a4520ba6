"""Settings of `pytest bench/` (each option has an environment variable of the same meaning).

    pytest bench/                                   # the device's default workloads, every kind, method, contender
    FASTPROMPT_BENCH_WORKLOADS=imagenet-b32 FASTPROMPT_BENCH_METHODS=maple,coop pytest bench/
    pytest bench/test_bench_inference.py            # one kind: train_step, runner_epoch or inference (one file each)

--bench-workloads / FASTPROMPT_BENCH_WORKLOADS     comma-separated names (bench/workloads.py); default: the GPU
                                                   set with CUDA, the tiny CPU set without; each kind runs the
                                                   chosen workloads that serve it
--bench-methods / FASTPROMPT_BENCH_METHODS          subset of the methods
--bench-contenders / FASTPROMPT_BENCH_CONTENDERS    subset of eager, compiled, tuned, fastprompt; default all, but
                                                   on a GPU the runner epoch runs fastprompt only
--bench-compile / FASTPROMPT_BENCH_COMPILE          auto (on with CUDA, off on CPU, where inductor takes minutes
                                                   per method), on, off; off skips the contenders that compile
                                                   (compiled, tuned), recorded with why
FASTPROMPT_BENCH_COMPILE_MODE                       torch.compile mode of compiled and tuned (default mode)
--bench-rounds, --bench-warmup                      timed and warm-up steps or batches (GPU 50 / 5, CPU 2 / 1);
                                                   the runner epoch times one whole epoch after its warm-up
--bench-precision / FASTPROMPT_BENCH_PRECISION      bf16 (autocast) or fp32; default bf16 with CUDA, fp32 on CPU
                                                   (CPU autocast is emulated and several times slower)
--bench-results / FASTPROMPT_BENCH_RESULTS          results folder (default bench/results)
FASTPROMPT_BENCH_MEMORY_CHECK=0                     run cases whose predicted peak exceeds the device memory
FASTPROMPT_BENCH_PEAK_TFLOPS                        peak for the FLOP floor on devices other than the H200
FASTPROMPT_BENCH_THREADS                            CPU threads (default 1 on CPU: the tiny shapes gain nothing
                                                   from more, and a busy 2-core CI machine loses 10x to
                                                   oversubscribed thread pools)

No TRITON_INTERPRET here: on CPU the fastprompt contender runs PyTorch ops (patch(backend='auto')). This file
imports nothing that imports triton (open_clip does, through torch._dynamo) at module level, so that in a session
that also collects tests/ (`pytest bench tests`), tests/conftest.py still decides triton's mode before its import.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from .workloads import select_cases

REPO = Path(__file__).resolve().parent.parent
OPTIONS = {
    "workloads": "FASTPROMPT_BENCH_WORKLOADS",
    "methods": "FASTPROMPT_BENCH_METHODS",
    "contenders": "FASTPROMPT_BENCH_CONTENDERS",
    "compile": "FASTPROMPT_BENCH_COMPILE",
    "rounds": "FASTPROMPT_BENCH_ROUNDS",
    "warmup": "FASTPROMPT_BENCH_WARMUP",
    "precision": "FASTPROMPT_BENCH_PRECISION",
    "results": "FASTPROMPT_BENCH_RESULTS",
}


def pytest_addoption(parser):
    group = parser.getgroup("fastprompt bench", "fastprompt benchmark suite (see bench/conftest.py)")
    for name, env in OPTIONS.items():
        group.addoption(f"--bench-{name}", default=None, help=f"see bench/conftest.py (env {env})")


def _option(config, name: str) -> str | None:
    return config.getoption(f"--bench-{name}") or os.environ.get(OPTIONS[name]) or None


def _int(config, name: str, default: int, minimum: int) -> int:
    value = _option(config, name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise pytest.UsageError(f"--bench-{name} must be an integer, got {value!r}") from None
    if number < minimum:
        raise pytest.UsageError(f"--bench-{name} must be >= {minimum}, got {number}")
    return number


def _settings(config):
    from .flops import peak_flops
    from .harness import Settings
    from .results import device_info

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    precision = _option(config, "precision") or ("bf16" if cuda else "fp32")
    if precision not in ("bf16", "fp32"):
        raise pytest.UsageError(f"--bench-precision must be bf16 or fp32, got {precision!r}")
    compile_choice = _option(config, "compile") or "auto"
    if compile_choice not in ("auto", "on", "off"):
        raise pytest.UsageError(f"--bench-compile must be auto, on or off, got {compile_choice!r}")
    compile_on = compile_choice == "on" or (compile_choice == "auto" and cuda)
    reason = None
    if not compile_on:
        reason = ("--bench-compile=off" if compile_choice == "off" else
                  "no CUDA: torch.compile (inductor) takes minutes per method and kind on CPU, more than the CPU"
                  " suite's budget; --bench-compile=on runs it")
    mode = os.environ.get("FASTPROMPT_BENCH_COMPILE_MODE")
    threads = os.environ.get("FASTPROMPT_BENCH_THREADS") or (None if cuda else "1")
    if threads:
        torch.set_num_threads(int(threads))
    peak, peak_reason = peak_flops(device_info(device)["name"])
    return Settings(
        device=device, amp_dtype=torch.bfloat16 if precision == "bf16" else None,
        rounds=_int(config, "rounds", 50 if cuda else 2, 1), warmup=_int(config, "warmup", 5 if cuda else 1, 0),
        compile=compile_on, compile_reason=reason, compile_options={"mode": mode} if mode else {},
        peak_flops=peak, peak_reason=peak_reason,
        memory_check=os.environ.get("FASTPROMPT_BENCH_MEMORY_CHECK", "1") != "0",
    )


def pytest_configure(config):
    config._fastprompt_bench = None  # built lazily: only when a bench test is collected
    config._fastprompt_bench_start = time.monotonic()  # the CPU suite's time budget is checked against it
    config.addinivalue_line("markers", "bench_last: run after every other test of the session (bench/ checks)")


def pytest_collection_modifyitems(config, items):
    # The completeness check reads the records every case wrote, so it runs after all of them, whatever the order
    # of the files.
    items.sort(key=lambda item: item.get_closest_marker("bench_last") is not None)


def bench_settings(config):
    if config._fastprompt_bench is None:
        config._fastprompt_bench = _settings(config)
    return config._fastprompt_bench


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    kind = getattr(metafunc.module, "KIND", "train_step")  # each test file measures one kind
    try:
        cases = select_cases(torch.cuda.is_available(), _option(config, "workloads"), _option(config, "methods"),
                             _option(config, "contenders"), kind)
    except ValueError as error:
        raise pytest.UsageError(str(error)) from None
    metafunc.parametrize("case", cases, ids=[f"{w.name}-{m}-{c}" for w, m, c in cases])


@pytest.fixture(scope="session")
def settings(pytestconfig):
    return bench_settings(pytestconfig)


@pytest.fixture(scope="session")
def results(pytestconfig, settings):
    from .results import ResultsFile

    directory = Path(_option(pytestconfig, "results") or REPO / "bench" / "results")
    peak = {"flops": settings.peak_flops, "source": settings.peak_reason}
    return ResultsFile(directory, settings.device, settings.describe(), peak, REPO)
