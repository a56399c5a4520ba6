"""The demo through the real CLI entry point: it must train and beat chance."""

import subprocess
import sys

from fastprompt.cli import main


def test_demo_beats_chance_through_the_cli(capsys):
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
    for command in ("demo", "info", "prepare"):
        assert command in out.stdout
