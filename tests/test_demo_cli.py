"""The demo and the CLI's entry points: the demo must train and beat chance; every subcommand is listed;
`bench` runs pytest on a benchmark folder and says clearly when there is none."""

import subprocess
import sys

import pytest
import torch

from fastprompt.cli import main


@pytest.fixture
def one_thread():
    """The tiny model's ops are microseconds long: on a busy 2-core CI machine two intra-op threads made the demo
    4x slower (87 s vs 20 s measured). Restored after the test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_demo_beats_chance_through_the_cli(capsys, one_thread):
    # Fewer epochs and test images than the default demo, on the tiny backbone, to keep CI fast.
    code = main(["demo", "--backbone", "tiny", "--epochs", "5", "--shots", "8", "--lr", "0.005"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "before training: accuracy" in text and "after training: accuracy" in text
    after = float(text.split("after training: accuracy ")[1].split("%")[0])
    assert after > 2 * 12.5, text  # chance is 12.5 % with 8 classes


def test_console_script_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "fastprompt.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("demo", "info", "prepare", "train", "eval", "report", "bench"):
        assert command in out.stdout


def test_bench_without_a_suite_says_so(tmp_path, capsys):
    code = main(["bench", "--path", str(tmp_path / "bench")])
    assert code == 2
    assert "no benchmark suite at" in capsys.readouterr().err


def test_bench_runs_pytest_on_the_suite(tmp_path, capsys):
    suite = tmp_path / "bench"
    suite.mkdir()
    (suite / "test_one.py").write_text("def test_one():\n    assert True\n\n\ndef test_two():\n    assert False\n")
    # pytest's own exit status comes back: 1 = a test failed (so a passing suite gives 0).
    assert main(["bench", "--path", str(suite), "-q", "-p", "no:cacheprovider"]) == 1
    assert "pytest" in capsys.readouterr().out
