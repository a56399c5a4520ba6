"""Every Triton kernel configuration compiles for sm_90 and sm_80, without a GPU.

`python -m fastprompt.kernels.aot` runs in a subprocess with TRITON_INTERPRET removed (in
this process the interpreter may have replaced the @triton.jit kernels). The test then checks
its JSON against the specs discovered here: every spec compiled for both architectures, the
matrix kernels use wgmma on sm_90, and the hot kernels do not spill.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys

import pytest

from fastprompt.kernels import aot

ARCHS = (90, 80)


@pytest.fixture(scope="module")
def aot_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # Its own session, so a timeout also ends the compile workers it forked.
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastprompt.kernels.aot", "--arch", *map(str, ARCHS), "--json", str(out)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    print(stdout)
    print(stderr[-4000:])
    assert out.exists(), f"aot wrote no results (exit {proc.returncode}):\n{stderr[-4000:]}"
    return proc.returncode, json.loads(out.read_text())


def test_every_spec_compiles_for_sm90_and_sm80(aot_results):
    _, results = aot_results
    expected = {(spec.name, arch) for specs in aot.discover_specs().values() for spec in specs for arch in ARCHS}
    assert expected, "no AOT specs discovered"
    compiled = {(r["spec"], r["arch"]) for r in results if r["compiled"]}
    failures = {(r["spec"], r["arch"]): r["error"] for r in results if not r["compiled"]}
    assert not failures, failures
    assert expected <= compiled, sorted(expected - compiled)


def test_matrix_kernels_use_wgmma_on_sm90(aot_results):
    _, results = aot_results
    matrix = [r for r in results if r["wgmma_required"] and r["arch"] == 90]
    assert matrix, "no spec is marked as a wgmma matrix kernel"
    assert all(r["uses_wgmma"] for r in matrix), [r["spec"] for r in matrix if not r["uses_wgmma"]]


def test_hot_kernels_do_not_spill(aot_results):
    _, results = aot_results
    hot = [r for r in results if r["hot"]]
    assert hot
    spilling = {(r["spec"], r["arch"]): r["spill_bytes"] for r in hot if r["spill_bytes"] != 0}
    assert not spilling, spilling
    assert all(0 < r["registers"] <= 255 for r in hot)


def test_exit_status_reports_problems(aot_results):
    returncode, results = aot_results
    assert returncode == (1 if any(r["problems"] for r in results) else 0)


def test_refuses_to_run_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="without TRITON_INTERPRET"):
        aot.run(archs=(90,), jobs=1)


def test_spec_validation_names_the_bad_argument():
    spec = next(iter(aot.discover_specs().values()))[0]
    missing = dict(spec.signature)
    dropped = next(iter(missing))
    del missing[dropped]
    with pytest.raises(ValueError, match=f"neither a type nor a constexpr value: \\['{dropped}'\\]"):
        aot._full_signature(dataclasses.replace(spec, signature=missing))
    with pytest.raises(ValueError, match="not arguments of"):
        aot._full_signature(dataclasses.replace(spec, constexprs={**spec.constexprs, "NOT_AN_ARG": 1}))
