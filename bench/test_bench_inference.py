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
