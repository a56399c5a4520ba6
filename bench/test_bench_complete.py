"""After every case of the session: each selected case left a complete record in the results file (ran, or skipped /
out of memory with a reason), the ratios the file promises are there, and the default CPU run covers every kind
and every contender within the CPU suite's time budget."""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path

import pytest

from .conftest import OPTIONS
from .results import check_document
from .workloads import CONTENDERS, KINDS, METHODS, select_cases

HERE = Path(__file__).resolve().parent
# `pytest bench/` on a busy 2-core CI machine (DESIGN.md §5); FASTPROMPT_BENCH_CPU_BUDGET_S overrides it.
CPU_BUDGET_S = float(os.environ.get("FASTPROMPT_BENCH_CPU_BUDGET_S", 180))


def _selected(session) -> set[tuple[str, str, str, str]]:
    """(kind, workload, method, contender) of this session's bench cases (only this suite's: other folders may
    have a parameter called `case` too)."""
    out = set()
    for item in session.items:
        kind = getattr(item.module, "KIND", None)
        if kind and item.path.parent == HERE and hasattr(item, "callspec") and "case" in item.callspec.params:
            workload, method, contender = item.callspec.params["case"]
            out.add((kind, workload.name, method, contender))
    return out


def test_each_kind_selects_the_workloads_that_serve_it():
    def names(cases):
        return sorted({(w.name, m, c) for w, m, c in cases})

    gpu_inference = select_cases(True, kind="inference")
    assert {w.name for w, _, _ in gpu_inference} == {"imagenet-b100"} and len(gpu_inference) == 8 * 4
    gpu_epoch = select_cases(True, kind="runner_epoch")
    assert {c for _, _, c in gpu_epoch} == {"fastprompt"}  # an epoch of every contender costs minutes per method
    assert {w.name for w, _, _ in gpu_epoch} == {"imagenet-b32", "c100-b4", "c100-b32"}
    chosen = select_cases(True, "imagenet-b32,imagenet-b100", "maple", "tuned,fastprompt", kind="inference")
    assert names(chosen) == [("imagenet-b100", "maple", "fastprompt"), ("imagenet-b100", "maple", "tuned")]
    assert select_cases(True, "imagenet-b4", kind="runner_epoch") == []  # 4,000 steps per epoch: train steps only
    for kind in KINDS:  # CPU: every method and contender of every kind on the one tiny workload
        assert len(select_cases(False, kind=kind)) == len(METHODS) * len(CONTENDERS)
    with pytest.raises(ValueError, match="unknown kind 'epoch'"):
        select_cases(False, kind="epoch")


@pytest.mark.bench_last
def test_results_file_is_complete(request, results, settings):
    config = request.config
    if config.getoption("benchmark_skip", False):
        pytest.skip("--benchmark-skip: no case ran")
    selected = _selected(request.session)
    if not selected:
        pytest.skip("no benchmark case selected")
    document = json.loads(results.path.read_text())
    assert check_document(document) == []
    by_key = {(r["kind"], r["workload"], r["method"], r["contender"]): r for r in document["results"]}
    assert selected <= set(by_key), f"cases without a record: {sorted(selected - set(by_key))}"
    for key in selected:
        record = by_key[key]
        if record["status"] != "ran":
            continue
        for base, field in (("eager", "speedup_vs_eager"), ("tuned", "speedup_vs_tuned")):
            if by_key.get((*key[:3], base), {}).get("status") == "ran":
                assert record[field] > 0, (key, field)
        step = by_key.get(("train_step", *key[1:]), {})
        if key[0] == "runner_epoch" and step.get("status") == "ran":
            assert record["epoch_vs_train_step"] == pytest.approx(record["images_per_s"] / step["images_per_s"])

    defaults = not any(config.getoption(f"--bench-{name}") or os.environ.get(env)
                       for name, env in OPTIONS.items() if name in ("workloads", "methods", "contenders"))
    whole_suite = {kind for kind, *_ in selected} == set(KINDS)
    if settings.device.type == "cpu" and defaults and whole_suite:
        covered = {(kind, contender) for kind, _, _, contender in selected}
        assert covered == set(itertools.product(KINDS, CONTENDERS))
        if all(item.path.is_relative_to(HERE) for item in request.session.items):  # bench/ alone in the session
            elapsed = time.monotonic() - config._fastprompt_bench_start
            assert elapsed < CPU_BUDGET_S, f"pytest bench/ took {elapsed:.0f} s, over the {CPU_BUDGET_S:.0f} s budget"
