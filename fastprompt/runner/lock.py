"""The run lock: one process at a time trains (or resumes) a run folder.

`<run>/run.lock` holds who took it (pid, host, start time, command line). The lock itself is an exclusive
flock on that file, which the kernel drops when its process ends however it ends (SIGKILL included), so a
killed run never blocks its folder: the next process takes the lock over and sees the dead holder's record.
Where flock is unavailable (no fcntl, or a filesystem that refuses it) the record alone decides: a holder on
this host whose pid is dead is stale; one on another host is taken as alive, since it cannot be checked.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
import sys

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_NAME = "run.lock"


class LockHeld(RuntimeError):
    """Another live process holds the run folder; the message names it."""


def _record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "argv": list(sys.argv)}


def describe(record: dict | None) -> str:
    if not record:
        return "holder unknown (its lock file is empty or unreadable)"
    return f"pid {record.get('pid')} on host {record.get('host')}, started {record.get('started')}"


def _read_fd(handle: int) -> dict | None:
    try:
        os.lseek(handle, 0, os.SEEK_SET)  # lseek + read, not pread: Windows has no pread
        record = json.loads(os.read(handle, 1 << 16).decode())
    except (OSError, ValueError):
        return None  # empty (being written, or never written) or damaged
    return record if isinstance(record, dict) else None


def read_record(run_dir: str) -> dict | None:
    """The last holder's record (alive or not), or None when there is no lock file."""
    try:
        handle = os.open(os.path.join(run_dir, LOCK_NAME), os.O_RDONLY)
    except OSError:
        return None
    try:
        return _read_fd(handle) or {}
    finally:
        os.close(handle)


def pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return False
    return True


def _record_alive(record: dict | None) -> bool:
    """Fallback without flock: is the recorded holder alive, as far as this host can tell?"""
    if not record:
        return False
    if record.get("host") != socket.gethostname():
        return True  # another machine's process cannot be checked from here
    return record.get("pid") != os.getpid() and pid_alive(record.get("pid"))


def _flock(handle: int, operation: int) -> bool | None:
    """True: locked; False: another process holds it; None: this platform/filesystem has no flock."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(handle, operation | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as error:
        if error.errno in (errno.EAGAIN, errno.EACCES):
            return False
        return None  # ENOLCK, EOPNOTSUPP, ...: the filesystem does not lock


class RunLock:
    """Held by this process until release(); `previous` is the record of a dead holder it replaced (or None)."""

    def __init__(self, path: str, handle: int, previous: dict | None):
        self.path, self.handle, self.previous = path, handle, previous

    def release(self) -> None:
        if self.handle is None:
            return
        # Unlink while still holding the lock: a process that opened the old file meanwhile sees that the path
        # no longer names the file it locked and retries on a fresh one (acquire()).
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.handle)
        self.handle = None


def acquire(run_dir: str) -> RunLock:
    """Take `<run_dir>/run.lock` (the folder must exist); LockHeld names the live holder otherwise."""
    path = os.path.join(run_dir, LOCK_NAME)
    while True:
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            locked = _flock(handle, fcntl.LOCK_EX if fcntl is not None else 0)
            previous = _read_fd(handle)
            if locked is False or (locked is None and _record_alive(previous)):
                raise LockHeld(
                    f"{run_dir} is in use by another fastprompt process ({describe(previous)}); wait for it to end"
                    " or stop it, then try again"
                )
            try:
                same = os.path.samestat(os.fstat(handle), os.stat(path))
            except FileNotFoundError:
                same = False
            if not same:  # the holder released (and unlinked) it between our open and our flock
                os.close(handle)
                continue
            data = (json.dumps(_record()) + "\n").encode()
            os.ftruncate(handle, 0)
            os.lseek(handle, 0, os.SEEK_SET)
            os.write(handle, data)
            os.fsync(handle)
            return RunLock(path, handle, previous)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(handle)
            raise


def holder(run_dir: str) -> tuple[bool | None, dict | None]:
    """(alive, record) of the run folder's lock without taking it: alive is True when a live process holds it,
    False when nobody does (its recorded holder, if any, is gone), None when there is no lock file."""
    path = os.path.join(run_dir, LOCK_NAME)
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        return None, None
    try:
        record = _read_fd(handle)
        locked = _flock(handle, fcntl.LOCK_SH if fcntl is not None else 0)
        if locked is None:
            return _record_alive(record), record
        if locked:
            fcntl.flock(handle, fcntl.LOCK_UN)
        return not locked, record
    finally:
        os.close(handle)
