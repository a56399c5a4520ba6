"""What this process may use of the machine."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """The cores this process may run on: its CPU affinity where the platform has one (a SLURM allocation, taskset,
    a sweep's share of the machine), else every core. os.cpu_count() counts the whole machine either way."""
    if hasattr(os, "sched_getaffinity"):
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except OSError:
            pass
    return os.cpu_count() or 1
