"""Processes: identity (a pid names one process only together with its start time, pids being reused), killing a
process group, and what the processes we start are given and give back. Standard library only: the guard imports
this, and a guard that starts slowly on a loaded machine is a daemon that does not start."""

from __future__ import annotations

import os
import signal

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))


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


def with_repo_on_path(env: dict[str, str]) -> dict[str, str]:
    """`env` with this checkout first on PYTHONPATH: our agents and the guard import hastore from it."""
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def last_line(output: str) -> str:
    """An agent's output as one detail for the log: its last line, cut short."""
    return output.splitlines()[-1][:300] if output else ""
