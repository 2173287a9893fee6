"""Persistent daemon state: our boot generation and the highest generation seen from each peer.

The generation must grow across restarts so that beats recorded before a restart are stale afterwards.
It is max(stored + 1, wall-clock seconds): it still grows if the state directory is lost.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path


class StateError(Exception):
    pass


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class StateStore:
    def __init__(self, directory: str):
        self.dir = Path(directory)
        self._lock_fd: int | None = None  # held open while the daemon runs (see lock)

    def _prepare(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise StateError(f"state directory {self.dir}: {e.strerror}") from e

    def lock(self) -> None:
        """Take this state directory for the life of the process (flock, released at exit or exec). A second
        daemon on the same configuration stops here, before it bumps the generation or binds a socket (its UDP
        sockets would otherwise join the first one's SO_REUSEPORT groups)."""
        self._prepare()
        path = self.dir / "daemon.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StateError(f"{path}: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StateError(f"another hastore daemon (pid {holder}) runs with state directory {self.dir}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def next_generation(self) -> int:
        """Read, increment and durably store our generation before we send a single beat."""
        self._prepare()
        path = self.dir / "generation"
        stored = 0
        try:
            stored = int(path.read_text().strip() or 0)
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            raise StateError(f"{path}: cannot read the boot generation ({e}); remove it to start afresh") from e
        generation = max(stored + 1, int(time.time()))
        try:
            _write_atomically(path, f"{generation}\n")
        except OSError as e:
            raise StateError(f"{path}: cannot store the boot generation: {e.strerror}") from e
        return generation

    def load_floors(self) -> dict[str, int]:
        path = self.dir / "peers.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {}  # a damaged file only weakens replay protection until the peer's next beat; never fatal
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, int)}

    def save_floors(self, generations: dict[str, int]) -> None:
        self._prepare()
        _write_atomically(self.dir / "peers.json", json.dumps(generations, sort_keys=True) + "\n")
