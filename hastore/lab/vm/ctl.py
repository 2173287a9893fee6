"""The host side of a guest's command channel (see ctlserver.py for the protocol).

qemu serves the guest's virtio-serial port on a unix socket, and takes one client at a time.  A `CtlClient`
keeps one connection, sends requests tagged with ids and hands each reply to the caller waiting for that id, so
several threads may run commands in the same guest at once.  When the guest goes away (powered off) the
connection drops and waiting callers get `CtlError`; the next call reconnects.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import threading
import time
from pathlib import Path


class CtlError(RuntimeError):
    """No answer from the guest's command server (not booted, powered off, or the command hung)."""


class CtlClient:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        # ids unique across clients: a reply the guest still owes an earlier client (one that gave up or was
        # killed) must not be taken for the answer to this one's request of the same number
        self._ids = itertools.count(int.from_bytes(os.urandom(6), "big") << 16)
        self._pending: dict[int, dict] = {}
        self._cond = threading.Condition(self._lock)

    def exec(self, argv: list[str], timeout: float = 60.0, input: str | None = None,
             env: dict[str, str] | None = None) -> tuple[int, str, str]:
        """Run argv in the guest: (rc, stdout, stderr).  rc 124: the guest killed it after timeout seconds."""
        rid = next(self._ids)
        req = {"id": rid, "argv": list(argv), "timeout": timeout}
        if input is not None:
            req["input"] = input
        if env:
            req["env"] = env
        with self._lock:
            sock = self._connected()
            self._pending[rid] = {}
            try:
                sock.sendall((json.dumps(req) + "\n").encode())
            except OSError as e:
                self._drop()
                raise CtlError(f"{self.path}: send failed: {e}") from None
            deadline = time.monotonic() + timeout + 10
            while not self._pending.get(rid) and self._sock is sock:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            reply = self._pending.pop(rid, None)
        if not reply:
            raise CtlError(f"{self.path}: no reply to {argv!r}")
        return reply["rc"], reply["stdout"], reply["stderr"]

    def ping(self, timeout: float = 5.0) -> bool:
        """True when the command server answers."""
        try:
            return self.exec(["true"], timeout=timeout)[0] == 0
        except (CtlError, OSError):
            return False

    def close(self) -> None:
        with self._lock:
            self._drop()

    # --------------------------------------------------------------------- connection (caller holds the lock)
    def _connected(self) -> socket.socket:
        if self._sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.path))
            except OSError as e:
                s.close()
                raise CtlError(f"{self.path}: {e}") from None
            self._sock = s
            threading.Thread(target=self._reader, args=(s,), daemon=True).start()
        return self._sock

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
        self._sock = None
        self._cond.notify_all()

    def _reader(self, sock: socket.socket) -> None:
        buf = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                with self._lock:
                    if self._sock is sock:
                        self._drop()
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                with self._lock:
                    if msg.get("id") in self._pending:  # replies to calls that gave up are dropped
                        self._pending[msg["id"]] = msg
                        self._cond.notify_all()
