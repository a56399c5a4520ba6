"""Training throughput and peak memory of every method under the four contenders (DESIGN.md §5).

Each case is one pytest-benchmark test (`benchmark.pedantic`, warm-up rounds, device synchronised inside the timed
callable, images/s and peak memory in `extra_info`) and one record of kind `train_step` in
bench/results/<device>-<date>.json; bench/test_bench_complete.py checks the records once every case has run.
"""

from __future__ import annotations

import math


from .harness import record_case

KIND = "train_step"


def test_train_step(case, settings, results, benchmark):
    contender = case[2]
    record = record_case(KIND, case, settings, results, benchmark)
    assert math.isfinite(record["loss_first"]) and math.isfinite(record["loss_last"]), record["reason"]
    assert record["step_ms_median"] > 0 and record["images_per_s"] > 0
    if contender == "fastprompt" and settings.device.type != "cuda":
        assert record["train_step_mode"] == "eager" and "CUDA" in record["cuda_graph_reason"]
    # The record names the kernel plan behind its figure: patched contenders only (on a CPU auto patches onto
    # PyTorch ops, so no first-GEMM plan applies); on CUDA the MLP's first GEMM is gemm_plan's.
    patched = record["kernels"]
    assert (patched is None) == (contender in ("eager", "tuned", "compiled"))
    if patched is not None:  # the pooled last blocks: text always (packed), vision unless the method reads its tokens
        reads = case[1] == "mmrl" or case[1] == "mcpl"
        assert patched["pooled_last_layer"] == (["text"] if reads else ["vision", "text"])
    if patched is not None and settings.device.type == "cuda":
        from fastprompt.ops import gemm_plan

        assert patched["mlp_gemm"] == gemm_plan.default_plan("cuda")
