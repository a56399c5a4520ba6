"""The run lock: while one process trains a run folder, a second `fastprompt train` (new or --resume latest) is
refused with a message naming the holder; a process killed with SIGKILL blocks nothing, and the run it left
marked 'running' is reported as stale by train --resume, eval and report."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from fastprompt.runner import lock as run_lock
from fastprompt.runner import resolve_config, train_run
from fastprompt.runner.run import config_for_resume
from runner_support import FAST, PROCEDURAL, read_json

# Many epochs: the first process is still training when the second one tries (it is killed at the end).
SLOW = ["train", "--method", "coop", *PROCEDURAL, "--shots", "2", "--seeds", "1", *FAST, "epochs=100000",
        "batch_size=4", "n_ctx=4"]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Stop(Exception):
    pass


def fastprompt_process(*args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return [sys.executable, "-m", "fastprompt.cli", *map(str, args)], dict(cwd=REPO, env=env, **kwargs)


def wait_until_training(run, process, timeout=180):
    """Until `process` holds the run's lock and run.json says running (it is past its checks)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        record = run_lock.read_record(str(run))
        if record and record.get("pid") == process.pid and (run / "run.json").exists():
            if read_json(run / "run.json")["status"] == "running":
                return record
        time.sleep(0.2)
    raise AssertionError("the first process never started training")


def test_a_second_train_is_refused_and_a_killed_one_is_stale(tmp_path, cli):
    run = tmp_path / "run"
    command, options = fastprompt_process(*SLOW, f"output_dir={run}")
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **options)
    try:
        record = wait_until_training(run, first)
        holder = f"pid {first.pid} on host {socket.gethostname()}, started {record['started']}"

        # A second real process resuming the same folder is refused at once, naming the holder.
        command, options = fastprompt_process(*SLOW, f"output_dir={run}", "--resume", "latest")
        second = subprocess.run(command, capture_output=True, text=True, timeout=120, **options)
        assert second.returncode == 2, second
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fastprompt: error: "), second.stderr
        assert "in use by another fastprompt process" in lines[0] and holder in lines[0], lines[0]

        # A new run into the folder, and eval of it, say who is training it.
        code, _, err = cli(*SLOW, f"output_dir={run}")
        assert code == 2 and f"status 'running': it is being trained now by {holder}" in err, err
        code, _, err = cli("eval", "--run", run)
        assert code == 2 and f"has no checkpoint yet: the run is being trained now by {holder}; evaluate it when" \
            " that finishes" in err, err
        assert first.poll() is None  # the refusals did not disturb the first process
    finally:
        first.kill()  # SIGKILL: no handler runs, run.json keeps status 'running'
        first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL
    assert read_json(run / "run.json")["status"] == "running"
    assert run_lock.holder(str(run)) == (False, record)

    for args in (("report", run), ("eval", "--run", run)):
        code, _, err = cli(*args)
        assert code == 2 and err.count("\n") == 1, err
        assert f"status 'running' is stale: its process ({holder}) is gone, so the run was killed" in err, err

    # The stale lock does not block: a resume takes the folder over and says what it found.
    lines = []

    def stop(seed, epoch):
        raise Stop  # after the first epoch it trains (the killed process may have saved several)

    overrides = {"method": "coop", "dataset": "procedural", "dataset.num_test_per_class": "2",
                 "dataset.num_val_per_class": "1", "shots": "2", "seeds": "1", "epochs": "100000",
                 "batch_size": "4", "n_ctx": "4", "output_dir": str(run), **dict(a.split("=") for a in FAST)}
    config = config_for_resume(str(run), None, candidate=resolve_config(overrides=overrides).config)
    with pytest.raises(Stop):
        train_run(config=config, resume_dir=str(run), printer=lines.append, on_epoch_end=stop)
    assert f"run.json said 'running', but its process ({holder}) is gone: the run was killed" in "\n".join(lines)
    assert read_json(run / "run.json")["status"] == "failed"
    assert not (run / "run.lock").exists()  # released (and removed) when the process ends normally


def test_the_lock_is_exclusive_and_released(tmp_path):
    held = run_lock.acquire(str(tmp_path))
    assert run_lock.holder(str(tmp_path))[0] is True
    with pytest.raises(run_lock.LockHeld, match=f"pid {os.getpid()} on host {socket.gethostname()}"):
        run_lock.acquire(str(tmp_path))  # flock conflicts between two open files, even in one process
    held.release()
    assert not (tmp_path / "run.lock").exists() and run_lock.holder(str(tmp_path)) == (None, None)
    again = run_lock.acquire(str(tmp_path))
    assert again.previous is None
    again.release()


def test_without_flock_the_recorded_pid_decides(tmp_path, monkeypatch):
    """Where flock is unavailable, a holder on this host with a dead pid is stale; a live one blocks."""
    monkeypatch.setattr(run_lock, "fcntl", None)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        live = {"pid": sleeper.pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00"}
        (tmp_path / "run.lock").write_text(json.dumps(live))
        with pytest.raises(run_lock.LockHeld, match=f"pid {sleeper.pid} on host"):
            run_lock.acquire(str(tmp_path))
        assert run_lock.holder(str(tmp_path)) == (True, live)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert run_lock.holder(str(tmp_path)) == (False, live)  # the same record, its pid now dead
    held = run_lock.acquire(str(tmp_path))
    assert held.previous == live
    held.release()


def test_a_new_run_is_refused_while_a_live_process_starts_it(tmp_path, cli):
    run = tmp_path / "run"
    run.mkdir()
    held = run_lock.acquire(str(run))  # a run starting in this folder: locked, run.json not written yet
    try:
        code, _, err = cli(*SLOW[:-3], "epochs=2", "batch_size=4", f"output_dir={run}")
        assert code == 2 and "in use by another fastprompt process" in err, err
        assert os.listdir(run) == ["run.lock"]  # nothing written by the refused process
    finally:
        held.release()
    code, _, err = cli(*SLOW[:-3], "epochs=2", "batch_size=4", f"output_dir={run}")
    assert code == 0, err

    # Killed after its last seed but before run.json said 'complete': eval uses the checkpoints, and says so.
    manifest = read_json(run / "run.json")
    (run / "run.json").write_text(json.dumps({**manifest, "status": "running"}))
    code, out, err = cli("eval", "--run", run)
    assert code == 0 and "accuracy" in out, err
    assert f"fastprompt: note: {run} is not complete (status 'running' is stale: no process holds it" in err, err
