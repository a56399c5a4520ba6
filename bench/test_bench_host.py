"""The host-overhead proxy (bench/host.py) in CI: its op counter, and a record per method and contender.

CI-sized: every method under every contender at the proxy's few classes (2 timed steps), and the real 1,000 ImageNet
class names for the fastprompt step of MaPLe, whose op count must not grow with the class set. Records of kind
`host_overhead` go into the suite's results file when bench/workloads.py lists that kind, and always into
bench/results/host-<device>-<date>.json. The full proxy (7 steps, op counts at C = 1000 for every case) is
`python -m bench.host`; bench/results/host-proxy-before.json and host-proxy-after.json hold its runs.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from . import host
from .contenders import CONTENDERS
from .workloads import METHODS

_records: list[dict] = []


def test_op_counter_counts_dispatched_ops():
    a = torch.randn(3, 4, requires_grad=True)
    with host.OpCounter() as counter:
        (a.view(12) * 2).sum().backward()
    ops = counter.ops
    # forward: view, mul, sum; backward adds at least the ones-like seed, the expand and the mul's gradient
    assert ops["aten::view"] >= 1 and ops["aten::mul"] >= 2 and ops["aten::sum"] == 1
    summary = counter.summary()
    assert summary["ops_per_step"] == sum(ops.values())
    assert summary["ops_view"] >= 2 and summary["ops_custom"] == 0
    assert summary["ops_launch"] == summary["ops_per_step"] - summary["ops_view"]


@pytest.mark.parametrize("method", METHODS)
def test_host_records(method):
    torch.set_num_threads(1)
    for contender in CONTENDERS:
        record = host.host_record(method, contender, steps=2, warmup=1, count_classes=host.HOST_CLASSES)
        _records.append(record)
        if CONTENDERS[contender].compile:
            assert record["status"] == "skipped" and record["reason"] == host.COMPILE_REASON
            continue
        assert record["status"] == "ran", record
        assert record["host_ms_per_step"] > 0 and record["ops_per_step"] > record["ops_launch"] > 0
        assert record["ops_custom"] == 0  # on CPU the fast path runs PyTorch ops


def test_fast_path_ops_do_not_grow_with_classes():
    torch.set_num_threads(1)
    full = host.count_ops("fastprompt", "maple", host.COUNT_CLASSES)
    few = host.count_ops("fastprompt", "maple", host.HOST_CLASSES)
    assert full["ops_per_step"] == few["ops_per_step"], (full, few)


def test_write_records(results, settings):
    if not _records:
        pytest.skip("no host record was made")
    from .results import atomic_write_json, device_info, device_slug
    from .workloads import KINDS

    if host.KIND in KINDS:
        for record in _records:
            results.add(record)
    name = f"host-{device_slug(device_info(settings.device))}-{dt.date.today().isoformat()}.json"
    path = results.path.parent / name
    atomic_write_json(path, host.document(_records, "pytest bench/test_bench_host.py (CI size: 2 timed steps)"))
    assert path.exists()


def test_kernel_path_counts_the_eager_steps_launches_without_running_a_kernel():
    """bench/kernel_path.py: the kernels an eager step launches on the Triton path, under fake tensors, in a process
    of its own (the patch takes backend='triton' on a CPU only under TRITON_INTERPRET=1, which this suite does not
    set). The counts must not grow with the class set: everything per class is packed into the same launches."""

    def run(classes):
        env = dict(os.environ, TRITON_INTERPRET="1")
        done = subprocess.run([sys.executable, "-m", "bench.kernel_path", "coop,maple", str(classes), "2", "small"],
                              capture_output=True, text=True, env=env, cwd=str(Path(__file__).resolve().parent.parent),
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return {r["method"]: r for r in map(json.loads, done.stdout.splitlines())}

    few, more = run(4), run(12)
    for method in ("coop", "maple"):
        record = few[method]
        ops, triton = record["kernel_path_ops"], record["kernel_path_triton"]
        # The eager path: the implementations are called directly, no registered op is dispatched (a custom op would
        # hide the GEMMs and launches inside it from the count).
        assert record["kernel_path_ops_custom"] == 0 and record["path"] == "eager"
        assert record["kernel_path_launches_per_step"] == record["kernel_path_triton_launches"] + \
            record["kernel_path_ops_launch"]
        assert record["kernel_path_triton_launches"] == sum(triton.values())
        # Every block of both towers (12 + 12) runs its two LayerNorms forward; CoOp trains only text prompts, so
        # only the text tower's LayerNorms run backward.
        assert triton["layer_norm_fwd_kernel"] == 48
        assert triton["layer_norm_bwd_kernel"] == (48 if method == "maple" else 24)
        # The GEMMs, from the block's structure (cuBLAS plan: fc1 is an addmm and the activation a Triton pass):
        # forward qkv, out_proj, fc1, fc2 (four addmm) in every block; backward, in each block that passes a
        # gradient down, the qkv and out_proj input gradients, fc2's and fc1's (four mm) and fc1 recomputed (an
        # addmm). Outside the blocks: the two tower projections and the logits' GEMM forward, and the backward of
        # those that lead to a prompt (MaPLe: all three, the logits' both ways; CoOp: the text projection and the
        # logits' text side).
        backward_blocks = 24 if method == "maple" else 12
        assert ops["aten::addmm"] == 4 * 24 + backward_blocks
        assert ops["aten::mm"] == 4 * backward_blocks + 3 + (4 if method == "maple" else 2)
        assert triton["activation_kernel"] == 24 + backward_blocks
        assert more[method]["kernel_path_launches_per_step"] == record["kernel_path_launches_per_step"]


def test_kernel_path_host_time_runs_the_real_wrappers_without_kernels():
    """bench/kernel_host.py: a MaPLe step on the Triton kernel path with every launch stubbed, timed (CI keeps the
    proxy runnable; its figures are in bench/results/host-kernel-path-cpu.json)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "bench.kernel_host", "maple", "10", "2"], capture_output=True,
                          text=True, env=env, cwd=str(Path(__file__).resolve().parent.parent), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(done.stdout.splitlines()[-1])
    assert record["method"] == "maple" and 0 < record["host_ms_min"] <= record["host_ms_per_step"]
    assert 1000 < record["python_calls_per_step"] < 20000 and record["c_calls_per_step"] > 1000
    # MaPLe trains through all 12 + 12 blocks. Per block: two LayerNorms each way, the MLP's fc1 GEMM forward and
    # its recompute in backward; per vision block (the interpreter's auto: Triton dense attention) a forward, dq
    # (which also writes the softmax's row-dot) and dk/dv; per text block the stream attention's forward and its
    # backward (dq with the row-dot, suffix dk/dv, the prefix keys' partial sums and their reduction); the
    # coupling functions of all layers as one grouped GEMM each way.
    # The MLP's fc1 launches are the plan's a CUDA device takes (fastprompt.ops.gemm_plan): the Triton GEMM, or
    # cuBLAS (no Triton launch) with the activation pass.
    from fastprompt.ops import gemm_plan

    plan = gemm_plan.default_plan("cuda")
    assert record["mlp_gemm"] == plan
    fc1_kernel = "activation_kernel" if plan == "cublas" else "linear_act_kernel"
    blocks, layers = 24, 12
    assert record["triton_launches"] == {
        "layer_norm_fwd_kernel": 2 * blocks, "layer_norm_bwd_kernel": 2 * blocks, fc1_kernel: 2 * blocks,
        "_dense_fwd_kernel": layers, "_dense_bwd_dq_kernel": layers, "_dense_bwd_dkdv_kernel": layers,
        "_prefix_fwd_kernel": layers, "_prefix_bwd_dq_kernel": layers, "_prefix_bwd_dkdv_suffix_kernel": layers,
        "_prefix_bwd_partial_kernel": layers, "_prefix_bwd_reduce_kernel": layers,
        "grouped_linear_fwd_kernel": 1, "grouped_linear_bwd_kernel": 1,
    }
    assert record["triton_launches_per_step"] == 242


def test_kernel_host_jit_launches_take_the_compiled_kernels_launch_paths():
    """`--launch jit-triton`: the same MaPLe and CoOp steps with each launch going through Triton's JITFunction.run
    (binding, specialisation, cache key, launch metadata) to a no-op launcher, in a process without TRITON_INTERPRET
    (compiled @triton.jit kernels, nothing compiled): the same launches as the stubbed interpreter's, each adding
    Triton's own Python calls (at least JITFunction.run and its grid lambda). `--launch jit`, fastprompt's direct
    path (fastprompt.kernels._launch), makes the same launches with fewer Python calls than Triton's path."""
    repo = str(Path(__file__).resolve().parent.parent)
    runs = {}
    for launch in ("stub", "jit", "jit-triton"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        if launch == "stub":
            env["TRITON_INTERPRET"] = "1"
        done = subprocess.run([sys.executable, "-m", "bench.kernel_host", "maple,coop", "10", "1", "--launch", launch],
                              capture_output=True, text=True, env=env, cwd=repo, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        runs[launch] = [json.loads(line) for line in done.stdout.splitlines()[-2:]]
    for stub, jit, triton_path in zip(runs["stub"], runs["jit"], runs["jit-triton"]):
        assert (stub["launch"], jit["launch"], triton_path["launch"]) == ("stub", "jit", "jit-triton")
        assert stub["method"] == jit["method"] == triton_path["method"]
        # the same launches, each method counted in its own context
        assert jit["triton_launches"] == triton_path["triton_launches"] == stub["triton_launches"]
        launches = jit["triton_launches_per_step"]
        assert launches == (242 if jit["method"] == "maple" else 180)
        assert triton_path["python_calls_per_step"] >= stub["python_calls_per_step"] + 2 * launches
        assert triton_path["c_calls_per_step"] > stub["c_calls_per_step"] and triton_path["host_ms_min"] > 0
        assert jit["python_calls_per_step"] < triton_path["python_calls_per_step"]
    refused = subprocess.run([sys.executable, "-m", "bench.kernel_host", "maple", "--launch", "fast"],
                             capture_output=True, text=True, cwd=repo, timeout=120)
    assert refused.returncode != 0 and "--launch takes stub" in refused.stderr


def test_kernel_host_tree_imports_fastprompt_and_its_kernels_from_the_other_checkout(tmp_path):
    """`--tree DIR` (an A/B against an older commit): fastprompt comes from DIR/fastprompt and fastprompt.kernels
    from DIR/kernels, not from this checkout's editable install; a directory that is not a checkout is refused."""
    import shutil

    repo = Path(__file__).resolve().parent.parent
    tree = tmp_path / "old"
    for part in ("fastprompt", "kernels"):
        shutil.copytree(repo / part, tree / part, ignore=shutil.ignore_patterns("__pycache__"))
    probe = ("import sys; from bench.kernel_host import use_tree; use_tree(sys.argv[1]); "
             "import fastprompt, fastprompt.kernels.layer_norm as ln, fastprompt.ops.layer_norm as op; "
             "print(fastprompt.__file__); print(ln.__file__); print(op._kernel.__file__)")
    done = subprocess.run([sys.executable, "-c", probe, str(tree)], capture_output=True, text=True, cwd=str(repo),
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    paths = done.stdout.split()
    assert paths == [str(tree / "fastprompt" / "__init__.py"), str(tree / "kernels" / "layer_norm.py"),
                     str(tree / "kernels" / "layer_norm.py")]
    refused = subprocess.run([sys.executable, "-m", "bench.kernel_host", "maple", "--tree", str(tmp_path)],
                             capture_output=True, text=True, cwd=str(repo), timeout=120)
    assert refused.returncode != 0 and "not a fastprompt checkout" in refused.stderr


def test_python_calls_counts_one_step():
    """bench.host.python_calls counts the Python functions one step calls, and nothing outside it."""
    def helper(x):
        return x + 1

    def step(images, labels):
        for _ in range(7):
            helper(images)

    counts = host.python_calls(step, torch.zeros(1), None)
    assert counts["python_calls_per_step"] == 1 + 7  # the step and seven helper calls
    assert counts["c_calls_per_step"] >= 1  # range()


def test_data_host_times_both_renderings_of_a_batch():
    """bench/data_host.py: a batch of the runner's on-device augmentation rendered by torchvision's ops image by image
    and by the crop_resize kernel (one launch, to a no-op launcher); CI keeps the proxy runnable, its figures are in
    bench/results/host-data-cpu.json."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "bench.data_host", "8", "16"], capture_output=True, text=True, env=env,
                          cwd=str(Path(__file__).resolve().parent.parent), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(done.stdout.splitlines()[-1])
    assert (record["batch"], record["images"], record["size"]) == (8, 16, 16)
    assert record["kernel_launches_per_batch"] == 1.0
    assert 0 < record["draws_us_per_batch"] and 0 < record["kernel_us_per_batch"]
    assert 0 < record["torchvision_us_per_batch"]


def test_eval_decode_times_a_decoding_pass_and_a_kept_pass():
    """bench/eval_decode.py: the runner's evaluation batches over ImageNet-sized JPEGs, decoded once and then read
    from the kept pixels (figures in bench/results/eval-decode-cpu.json)."""
    done = subprocess.run([sys.executable, "-m", "bench.eval_decode", "12", "64"], capture_output=True, text=True,
                          cwd=str(Path(__file__).resolve().parent.parent), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(done.stdout.splitlines()[-1])
    assert (record["images"], record["size"]) == (12, 64) and record["jpeg_kb"] > 20
    # Decoding a 500 x 375 JPEG takes milliseconds; reading 64 x 64 kept pixels, microseconds.
    assert 0 < record["kept_pass_s"] < record["decode_pass_s"]
