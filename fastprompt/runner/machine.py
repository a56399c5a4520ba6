"""What this process may use of the machine."""

from __future__ import annotations

import os


def usable_cores() -> list[int]:
    """The cores this process may run on: its CPU affinity where the platform has one (a SLURM allocation, taskset,
    a sweep's share of the machine), else every core. os.cpu_count() counts the whole machine either way."""
    try:
        cores = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity on this platform (macOS, Windows)
        cores = []
    return cores or list(range(os.cpu_count() or 1))


def usable_cpus() -> int:
    """How many cores this process may run on (usable_cores)."""
    return len(usable_cores())
