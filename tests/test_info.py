"""``python -m fastprompt.info`` and ``fastprompt.info.info()``: devices, versions, and every
attention backend with its status and reasons."""

import os
import subprocess
import sys

import torch

from fastprompt.info import format_info, info


def test_module_prints_versions_devices_and_backends():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the user's view
    result = subprocess.run([sys.executable, "-m", "fastprompt.info"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for needle in ("versions:", f"torch       {torch.__version__}", "triton ", "open_clip ", "xformers ",
                   "devices:", "cpu:", "attention backends", "prefix_varlen_attention"):
        assert needle in text, f"{needle!r} missing from:\n{text}"
    for backend in ("triton", "xformers", "sdpa", "eager"):
        assert f" {backend} " in text
    if torch.cuda.is_available():
        assert torch.cuda.get_device_name(0) in text
    else:
        assert "no CUDA device" in text
        # compiled Triton needs a GPU; the reason says how the interpreter would run it
        assert "Triton kernels run on CPU only in the interpreter" in text
        assert "runs on cuda only, not cpu" in text  # xformers
        sdpa_rows = [line for line in text.splitlines() if " sdpa " in line and "on cpu" in line]
        assert len(sdpa_rows) == 2 and all("available  <- auto" in line for line in sdpa_rows)


def test_info_returns_the_same_as_data():
    report = info()
    assert report["versions"]["torch"] == torch.__version__
    assert report["versions"]["python"] == sys.version.split()[0]
    assert report["devices"][0]["type"] == "cpu"
    assert len([d for d in report["devices"] if d["type"] == "cuda"]) == torch.cuda.device_count()
    rows = report["attention_backends"]
    cpu_rows = {(r["op"], r["backend"]): r for r in rows if r["device"] == "cpu"}
    assert set(cpu_rows) == {(op, b) for op in ("attention", "prefix_varlen_attention")
                             for b in ("triton", "xformers", "sdpa", "eager")}
    for op in ("attention", "prefix_varlen_attention"):
        assert cpu_rows[op, "sdpa"]["available"] and cpu_rows[op, "sdpa"]["auto_choice"]
        assert not cpu_rows[op, "xformers"]["available"] and cpu_rows[op, "xformers"]["reasons"]
        triton = cpu_rows[op, "triton"]
        assert not triton["auto_choice"]  # auto never picks the interpreter
        assert triton["reasons"] or triton["auto_skips"]
    assert "attention backends" in format_info(report)


def test_mlp_row_names_the_first_gemm_plan_patch_takes():
    """The MLP row of the op plan says which first-GEMM plan `patch(clip)` takes on the device type and why: the
    plan and the evidence of fastprompt.ops.gemm_plan (CUDA: a measurement named by device, date and commit)."""
    from fastprompt.info import _mlp_plan
    from fastprompt.ops import gemm_plan

    for device in ("cuda:0", "cpu"):
        plan, why = gemm_plan.resolve("auto", device.split(":")[0])
        runs_on, said = _mlp_plan(device)
        assert runs_on == ("triton" if plan == "triton" else "cublas fc1 + triton activation")
        assert said.endswith(why)
    cuda = gemm_plan.measurement_for("cuda")
    assert all(part in _mlp_plan("cuda")[1] for part in (cuda.device, cuda.date, cuda.commit))


def test_triton_mode_on_a_gpu_says_how_kernels_are_launched(monkeypatch):
    """With a CUDA device, the report says whether launches take the compiled kernels' launchers directly (a checked
    Triton release) or Triton's own path, naming the checked releases."""
    from fastprompt import info as info_module
    from fastprompt.kernels import _launch

    gpu = [{"type": "cuda", "index": 0}]
    monkeypatch.setattr(_launch, "ENABLED", True)
    assert info_module._triton_mode(gpu) == ("compiled, on the CUDA devices below; launched through the compiled"
                                             " kernels' launchers once Triton has chosen them"
                                             " (fastprompt.kernels._launch)")
    monkeypatch.setattr(_launch, "ENABLED", False)
    assert info_module._triton_mode(gpu).endswith("launched through Triton's own path (fastprompt.kernels._launch"
                                                  " was checked against Triton 3.6, 3.7 and 3.8, not this one)")


def test_the_onnx_extras_versions_are_listed():
    """What `fastprompt export --output x.onnx` needs, as the installed distributions say (or 'not installed')."""
    import importlib.metadata

    text = format_info(info())
    for dist in ("onnx", "onnxscript", "onnxruntime"):
        try:
            expected = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            expected = "not installed"
        assert f"  {dist:<11} {expected}\n" in text
