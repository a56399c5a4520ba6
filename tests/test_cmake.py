"""CMakeLists.txt: the CTest project configures anywhere, registers the GPU tiers, and on a machine without a GPU
reports every one of them as skipped (never passed)."""

from __future__ import annotations

import glob
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NAMES = ["fastprompt.gpu_tests", "fastprompt.gpu_tests.memcheck", "fastprompt.gpu_tests.racecheck", "fastprompt.bench"]
pytestmark = pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("ctest") is None,
                                reason="cmake/ctest not installed")


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cmake-build")
    done = subprocess.run(["cmake", "-S", str(REPO), "-B", str(folder), f"-DFASTPROMPT_PYTHON={sys.executable}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return folder, done.stdout


def test_configure_registers_the_gpu_tiers(build):
    folder, _ = build
    listing = subprocess.run(["ctest", "--test-dir", str(folder), "-N"], capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    assert re.findall(r"Test\s+#\d+: (\S+)", listing.stdout) == NAMES


@pytest.mark.skipif(bool(glob.glob("/dev/nvidia[0-9]*")), reason="a GPU is present: the tiers would run")
def test_without_a_gpu_every_tier_reports_skipped_with_the_reason(build):
    folder, configure_output = build
    assert "the GPU tests will report SKIPPED" in configure_output
    done = subprocess.run(["ctest", "--test-dir", str(folder), "--output-on-failure", "-V"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr  # skipped tests do not fail the run...
    did_not_run = done.stdout.split("The following tests did not run:")[-1]
    for name in NAMES:  # ...and none of them counts as passed
        assert re.search(rf"\d+ - {re.escape(name)} \(Skipped\)", did_not_run), done.stdout
    assert done.stdout.count("SKIPPED: needs a CUDA GPU: no NVIDIA GPU device") == len(NAMES)
    assert "Passed" not in done.stdout
