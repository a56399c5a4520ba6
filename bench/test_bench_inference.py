"""Inference throughput: `model(images)` in eval mode under no_grad (bf16 autocast on a GPU) at the workload's
batch (100 on a GPU, MMRL Table 6's setting), images/s and peak memory, for every method and contender; one record
of kind `inference` per case. The contenders that compile run torch.compile(model).
"""

from __future__ import annotations

import pytest

from .harness import run_case

KIND = "inference"


def test_inference(case, settings, results, benchmark):
    workload, method, contender = case
    benchmark.group = f"{KIND}/{workload.name}/{method}"
    record = run_case(KIND, workload, method, contender, settings, benchmark)
    results.add(record)
    if record["status"] != "ran":
        pytest.skip(f"{record['status']}: {record['reason']}")
    assert record["reason"] != "non-finite logits"
    assert record["step_ms_median"] > 0
    assert record["images_per_s"] == pytest.approx(workload.batch / record["step_ms_median"] * 1e3)
