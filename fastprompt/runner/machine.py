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


def available_memory() -> int | None:
    """Bytes of memory this process could still take without swapping, or None where it cannot be read: the
    kernel's MemAvailable (free memory plus reclaimable caches), capped by the cgroup's limit less its usage (a
    container or a SLURM job sees its own limit there, not the machine's)."""
    available = None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        return None
    for limit_path, usage_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_path) as limit_file, open(usage_path) as usage_file:
                limit, usage = limit_file.read().strip(), usage_file.read().strip()
        except OSError:
            continue
        if limit.isdigit() and usage.isdigit() and int(limit) < 1 << 60:  # "max" or a huge number: no limit
            room = max(0, int(limit) - int(usage))
            available = room if available is None else min(available, room)
        break
    return available
