"""The GPU session's scripts (bench/device/) stay runnable: each has a CPU smoke mode that CI runs, so a lent GPU's
few minutes are not lost to a script that rotted since it was written."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_glue_ops_smoke_times_both_fusions_against_what_they_replace():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "bench/device/glue_ops.py", "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["case"] for r in records] == ["text_stream_attention", "vision_splice_layer_norm"]
    for record in records:
        assert record["fused_ms_plain"] > 0 and record["composed_ms_plain"] > 0


def test_gemm_shapes_smoke_times_every_plan():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "bench/device/gemm_shapes.py", "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (record,) = [json.loads(line) for line in done.stdout.splitlines()]
    for plan in ("triton", "cublas_plan", "cublas+act", "cublas", "triton_grad", "cublas_plan_grad",
                 "cublas+act_grad"):
        assert record[f"{plan}_ms"] > 0 and record[f"{plan}_tflops"] >= 0
    assert record["faster_plan"] in ("triton", "cublas")


def test_host_gpu_smoke_writes_its_records_and_host_profiles(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    done = subprocess.run([sys.executable, "bench/device/host_gpu.py", "coop", "tiny-c4-b8", "--smoke"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (record,) = json.loads((tmp_path / "host_gpu.json").read_text())
    assert record["method"] == "coop" and record["wall_ms_no_graph"] > 0 and record["gpu_ms_graph"] > 0
    profile = (tmp_path / "host_gpu_profile_coop.txt").read_text()
    assert "5 no-graph steps under cProfile" in profile and "run_backward" in profile


def test_decoder_smoke_times_mcpls_decoder_with_its_step_flops():
    done = subprocess.run([sys.executable, "bench/device/decoder.py", "--smoke"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (record,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert record["case"] == "mcpl_vaipl_decoder" and record["layers"] == 2 and record["classes"] == 4
    assert record["fwd_bwd_ms_plain"] > 0 and record["fwd_bwd_ms_graph"] is None  # no CUDA graph on a CPU
    # The FLOPs are the step geometry's count for the decoder pass, which bench/test_bench_flops.py checks against
    # torch's FlopCounterMode for MCPL's whole step.
    assert record["flops"] > 0 and record["image_tokens"] > 1 and record["batch"] == 2


def test_profile_step_smoke_writes_the_kernel_table_with_its_step_times(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    done = subprocess.run([sys.executable, "bench/device/profile_step.py", "coop", "tiny-c4-b8", "--smoke"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (record,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert record["method"] == "coop" and record["graph_ms_per_step"] > 0 and record["no_graph_ms_per_step"] > 0
    text = (tmp_path / "profile_coop_tiny-c4-b8.txt").read_text().splitlines()
    assert json.loads(text[0]) == record
    assert any("aten::addmm" in line for line in text)  # the table: the step's ops by time
