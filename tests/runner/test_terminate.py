"""SIGTERM (a scheduler's time limit or preemption, `kill`, torchrun stopping the other processes) ends `fastprompt
train` as Ctrl-C does: exit status 143, one line on stderr, run.json marked 'interrupted' (not left 'running'), the
resume command printed, and `--resume` continuing from the last saved epoch to a complete run."""

import os
import signal
import subprocess
import sys

from runner_support import FAST, PROCEDURAL, read_json, wait_for

ARGS = ["--method", "coop", *PROCEDURAL, "--shots", "2", "--seeds", "1", *FAST, "epochs=60", "batch_size=4"]



def test_sigterm_marks_the_run_interrupted_and_it_resumes(tmp_path, cli):
    run = tmp_path / "run"
    log = run / "log.txt"
    process = subprocess.Popen([sys.executable, "-m", "fastprompt", "train", *ARGS, f"output_dir={run}"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        # Epoch 2 logged: epoch 1's state is saved and the run is well inside its 60 epochs.
        wait_for(lambda: log.exists() and "epoch 2/60" in log.read_text(), 180, "epoch 2 in the log")
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, (out, err)
    assert err.strip().splitlines()[-1] == "fastprompt: terminated (SIGTERM)", err
    assert "Traceback" not in err
    assert f"continue it from its last saved epoch with: fastprompt train --resume {run}" in out

    manifest = read_json(run / "run.json")
    assert manifest["status"] == "interrupted" and manifest["error"].startswith("Terminated")
    saved = read_json(run / "seed1" / "state" / "state.json")["epoch"]
    assert 1 <= saved < 60
    assert not (run / "seed1" / "results.json").exists()

    code, out, err = cli("train", "--resume", run)
    assert code == 0, err
    assert f"seed 1: resuming after epoch {saved}" in out
    assert read_json(run / "run.json")["status"] == "complete"
    assert len(read_json(run / "seed1" / "results.json")["history"]) == 60


def test_sigterm_handler_is_restored_after_the_command(cli):
    before = signal.getsignal(signal.SIGTERM)
    code, _, _ = cli("train", "--method", "nosuchmethod")
    assert code == 2
    assert signal.getsignal(signal.SIGTERM) is before
