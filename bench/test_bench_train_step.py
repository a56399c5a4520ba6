"""Training throughput and peak memory of every method under the three contenders (DESIGN.md §5).

Each case is one pytest-benchmark test (`benchmark.pedantic`, warm-up rounds, device synchronised inside the timed
callable, images/s and peak memory in `extra_info`) and one record in bench/results/<device>-<date>.json. The
last test checks that every selected case left a complete record: ran, or skipped / out of memory with a reason.
"""

from __future__ import annotations

import json
import math

import pytest

from .harness import run_case
from .results import check_document


def test_train_step(case, settings, results, benchmark):
    workload, method, contender = case
    benchmark.group = f"{workload.name}/{method}"
    record = run_case(workload, method, contender, settings, benchmark)
    results.add(record)
    if record["status"] != "ran":
        pytest.skip(f"{record['status']}: {record['reason']}")
    assert math.isfinite(record["loss_first"]) and math.isfinite(record["loss_last"]), record["reason"]
    assert record["step_ms_median"] > 0 and record["images_per_s"] > 0
    if contender == "fastprompt" and settings.device.type != "cuda":
        assert record["train_step_mode"] == "eager" and "CUDA" in record["cuda_graph_reason"]


def test_results_file_is_complete(request, results):
    """Runs last (file order): every selected case has a complete record in the written file."""
    if request.config.getoption("benchmark_skip", False):
        pytest.skip("--benchmark-skip: no case ran")
    selected = {
        (item.callspec.params["case"][0].name, item.callspec.params["case"][1], item.callspec.params["case"][2])
        for item in request.session.items
        # only this suite's cases: other test folders in the same session may have a parameter called "case"
        if item.path == request.path and hasattr(item, "callspec") and "case" in item.callspec.params
    }
    if not selected:
        pytest.skip("no benchmark case selected")
    document = json.loads(results.path.read_text())
    assert check_document(document) == []
    recorded = {(r["workload"], r["method"], r["contender"]) for r in document["results"]}
    assert selected <= recorded, f"cases without a record: {sorted(selected - recorded)}"
    by_key = {(r["workload"], r["method"], r["contender"]): r for r in document["results"]}
    for key in selected:
        record = by_key[key]
        if record["status"] == "ran" and key[2] != "eager" and by_key.get((key[0], key[1], "eager"), {}).get(
                "status") == "ran":
            assert record["speedup_vs_eager"] > 0
