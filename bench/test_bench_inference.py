"""Inference throughput: the class logits of a batch in eval mode under no_grad (bf16 autocast on a GPU) at the
workload's batch (100 on a GPU, MMRL Table 6's setting), through fastprompt.evaluation.EvalStep (what `fastprompt
eval` and `predict` run) or, for the contenders that compile, torch.compile(model); images/s and peak memory for
every method and contender, one record of kind `inference` per case.
"""

from __future__ import annotations

import pytest

from .harness import record_case

KIND = "inference"


def test_inference(case, settings, results, benchmark):
    workload = case[0]
    record = record_case(KIND, case, settings, results, benchmark)
    assert record["reason"] != "non-finite logits"
    assert record["step_ms_median"] > 0
    assert record["images_per_s"] == pytest.approx(workload.batch / record["step_ms_median"] * 1e3)
    # FLOPs of what depends on the images (bench/flops.py inference_flops): fastprompt's own computation is the exact
    # floor; every other contender computes at least that much (its last vision block on every row).
    assert record["flops_exact"] > 0 and record["flops_per_step"] >= record["flops_exact"]
    if case[2] == "fastprompt":
        assert record["flops_per_step"] == record["flops_exact"]
    assert record["achieved_tflops"] == pytest.approx(record["flops_per_step"] / record["step_ms_median"] / 1e9)
