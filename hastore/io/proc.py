"""Process identity: a pid names one process only together with its start time, pids being reused."""

from __future__ import annotations

import os
import signal


def start_ticks(pid: int) -> int | None:
    """A live process's start time (clock ticks after boot); None when it does not exist or has exited (a zombie
    its parent has not reaped yet is not alive: it holds nothing and will never run again)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    try:
        return None if fields[0] in ("Z", "X") else int(fields[19])
    except (IndexError, ValueError):
        return None


def kill_group(pid: int) -> None:
    """SIGKILL the session (process group) that `pid` leads, as the agents run: gone already is fine."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
