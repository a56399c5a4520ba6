"""bench/render.py: the table from a results document, the plot, and the clear stop without matplotlib."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .results import RECORD_FIELDS, with_ratios

RENDER = Path(__file__).with_name("render.py")


def _record(contender, images_per_s, peak, status="ran", reason=None, kind="train_step", batch=32):
    record = dict.fromkeys(RECORD_FIELDS)
    record.update(kind=kind, workload="imagenet-b32" if batch == 32 else "imagenet-b100", backbone="ViT-B-16",
                  classes=1000, batch=batch, method="maple", contender=contender, status=status, reason=reason,
                  images_per_s=images_per_s, peak_allocated_bytes=peak, predicted_peak_bytes=peak,
                  step_ms_median=None if images_per_s is None else batch * 1e3 / images_per_s)
    return record


@pytest.fixture()
def results_file(tmp_path):
    epoch = _record("fastprompt", 2700.0, 5 * 2**30, kind="runner_epoch")
    epoch.update(step_ms_median=None, epoch_s=5.926, epoch_steps=500, loader_s=0.5, dataset_bytes=2**31)
    records = with_ratios([
        _record("eager", 500.0, 16 * 2**30), _record("fastprompt", 3000.0, 4 * 2**30),
        _record("compiled", None, None, "oom", "out of memory: 140 GiB"), _record("tuned", 1000.0, 8 * 2**30), epoch,
        _record("eager", 6000.0, 3 * 2**30, kind="inference", batch=100),
        _record("fastprompt", 15000.0, 2**30, kind="inference", batch=100),
    ])
    document = {"schema": 2, "created": "2026-01-01T00:00:00+00:00", "device": {"type": "cuda", "name": "NVIDIA H200"},
                "versions": {"torch": "2.11"}, "git": {"commit": "abc"}, "settings": {"amp_dtype": "bfloat16"},
                "peak": {"flops": 790e12}, "results": records}
    path = tmp_path / "nvidia-h200-2026-01-01.json"
    path.write_text(json.dumps(document))
    return path


def _render(*args):
    return subprocess.run([sys.executable, str(RENDER), *map(str, args)], capture_output=True, text=True, timeout=120)


def test_markdown_tables_per_kind_have_ratios_and_reasons(results_file):
    done = _render(results_file, "--markdown-only")
    assert done.returncode == 0, done.stderr
    table = results_file.with_suffix(".md").read_text()
    assert [line for line in table.splitlines() if line.startswith("## ")] == [
        "## Training step", "## Runner epoch", "## Inference"]
    # step ms, img/s, vs eager (3000/500), vs tuned (3000/1000), peak GiB, memory vs eager (4/16)
    assert "| imagenet-b32 | maple | fastprompt | 10.7 | 3000.0 | 6.00× | 3.00× | 4.00 | 0.25× |" in table
    assert "oom: out of memory: 140 GiB" in table
    # epoch s, steps, img/s, vs train step (2700/3000), no eager or tuned epoch, loader s, data GiB, peak GiB
    assert "| imagenet-b32 | maple | fastprompt | 5.93 | 500 | 2700.0 | 90% | – | – | 0.50 | 2.00 | 5.00 |" in table
    assert "| imagenet-b100 | maple | fastprompt | 100 | 6.7 | 15000.0 | 2.50× | – | 1.00 |" in table
    paper = [line for line in table.splitlines() if line.startswith("| reference | maple | MMRL Table 6 |")]
    assert len(paper) == 1 and "| 1758.0 |" in paper[0] and "RTX 4090" in paper[0] and "the paper's figure" in paper[0]
    assert not results_file.with_suffix(".png").exists()


def test_a_file_written_before_kinds_renders_as_training_steps(results_file):
    document = json.loads(results_file.read_text())
    document["results"] = [{k: v for k, v in r.items() if k != "kind"} for r in document["results"][:2]]
    results_file.write_text(json.dumps(document))
    assert _render(results_file, "--markdown-only").returncode == 0
    table = results_file.with_suffix(".md").read_text()
    assert "## Training step" in table and "## Inference" not in table


def test_plot_is_written(results_file, tmp_path):
    pytest.importorskip("matplotlib")
    done = _render(results_file, "--out", tmp_path / "out" / "bench")
    assert done.returncode == 0, done.stderr
    png = tmp_path / "out" / "bench.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_it_stops_with_the_install_hint(results_file):
    # A None entry in sys.modules makes `import matplotlib` raise ImportError, as if it were not installed.
    code = ("import runpy, sys; sys.modules['matplotlib'] = None; "
            f"sys.argv = ['render.py', {str(results_file)!r}]; runpy.run_path({str(RENDER)!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "needs matplotlib" in done.stderr and "fastprompt[bench]" in done.stderr
    assert not results_file.with_suffix(".md").exists()  # nothing written before the stop


def test_a_file_that_is_not_a_results_file_is_refused(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{}")
    done = _render(path, "--markdown-only")
    assert done.returncode == 1 and "not a benchmark results file" in done.stderr
