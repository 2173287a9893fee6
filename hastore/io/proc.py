"""Process identity: a pid names one process only together with its start time, pids being reused."""

from __future__ import annotations


def start_ticks(pid: int) -> int | None:
    """A process's start time (clock ticks after boot), None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None
