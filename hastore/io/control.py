"""The control socket: a root-only Unix stream socket, one JSON request line in, one JSON reply line out.

Requests: {"cmd": "status"} | {"cmd": "reload"} | {"cmd": "shutdown"}. Replies: {"ok": true, ...} or
{"ok": false, "error": "sentence"}.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path

MAX_REQUEST = 64 * 1024


class ControlError(Exception):
    pass


class ControlServer:
    def __init__(self, path: str, handler: Callable[[dict], dict]):
        self.path = Path(path)
        self.handler = handler
        self.server: asyncio.AbstractServer | None = None

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(self.path.lstat().st_mode):
                raise ControlError(f"{self.path} exists and is not a socket; refusing to replace it")
            if _answers(str(self.path)):
                raise ControlError(f"{self.path}: another hastore daemon is already listening there")
            self.path.unlink()
        old = os.umask(0o177)  # the socket is created 0600: root only
        try:
            self.server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        finally:
            os.umask(old)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=5)
            try:
                request = json.loads(line[:MAX_REQUEST] or b"{}")
                if not isinstance(request, dict):
                    raise ValueError("a request is a JSON object")
                reply = self.handler(request)
            except ValueError as e:
                reply = {"ok": False, "error": f"bad request: {e}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass


def _answers(path: str) -> bool:
    try:
        request(path, {"cmd": "status"}, timeout=1)
        return True
    except ControlError:
        return False


def request(path: str, req: dict, timeout: float = 5.0) -> dict:
    """Blocking client used by the CLI."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    except FileNotFoundError:
        raise ControlError(f"{path}: no such socket — is `hastore run` running (or use --socket)?") from None
    except PermissionError:
        raise ControlError(f"{path}: permission denied — the control socket is for root") from None
    except OSError as e:
        raise ControlError(f"{path}: {e.strerror or e}") from None
    finally:
        s.close()
    try:
        reply = json.loads(buf)
    except ValueError:
        raise ControlError(f"{path}: the daemon sent an unreadable reply") from None
    if not isinstance(reply, dict):
        raise ControlError(f"{path}: the daemon sent an unreadable reply")
    return reply
