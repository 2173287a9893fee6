"""The command server inside a lab guest: runs what the host asks over a virtio-serial port.

The guest's init starts ``python3 /hastore/hastore/lab/vm/ctlserver.py`` from the 9p share (so this file
is the code under test, not a copy baked into the image).  It finds the port named ``ctl`` under
/sys/class/virtio-ports and reads JSON lines from it::

    request  {"id": 7, "argv": ["drbdadm", "role", "r0"], "timeout": 30, "input": "optional stdin"}
    reply    {"id": 7, "rc": 0, "stdout": "...", "stderr": "..."}

Each request runs in a thread of its own; replies are written whole, one line each, under a lock.  A
command that outlives its timeout is killed with its process group and answers rc 124.  The host may
connect and disconnect at will: while nobody is connected the port reads as end-of-file, and the server
just waits.  Only the standard library is used (the guest's system python3 runs it).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

PORT_NAME = "ctl"
TIMEOUT_RC = 124
MAX_OUTPUT = 4 << 20


def find_port(name: str = PORT_NAME, wait_s: float = 30.0) -> str:
    """The /dev path of the virtio-serial port with this name (waits for the driver to create it)."""
    deadline = time.monotonic() + wait_s
    while True:
        for entry in Path("/sys/class/virtio-ports").glob("*/name"):
            if entry.read_text().strip() == name:
                return f"/dev/{entry.parent.name}"
        if time.monotonic() > deadline:
            raise SystemExit(f"ctlserver: no virtio-serial port named {name!r}")
        time.sleep(0.1)


# busybox init's PATH lacks /usr/local/bin, where provision.sh installs the `hastore` command
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def run_request(req: dict) -> dict:
    """Run one request's argv and return the reply (never raises)."""
    rid = req.get("id")
    argv = req.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        return {"id": rid, "rc": 2, "stdout": "", "stderr": "ctlserver: argv must be a non-empty list of strings"}
    timeout = float(req.get("timeout") or 60)
    data = req.get("input")
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                cwd="/", env={**os.environ, "PATH": PATH, **req.get("env", {})})
    except OSError as e:
        return {"id": rid, "rc": 127, "stdout": "", "stderr": f"ctlserver: {argv[0]}: {e}"}
    try:
        out, err = proc.communicate(data.encode() if data is not None else None, timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        rc = TIMEOUT_RC
        err += f"\nctlserver: killed after {timeout:g} s".encode()
    return {"id": rid, "rc": rc, "stdout": out[-MAX_OUTPUT:].decode(errors="replace"),
            "stderr": err[-MAX_OUTPUT:].decode(errors="replace")}


class Server:
    """Reads request lines from the port fd, answers each from its own thread."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lock = threading.Lock()

    def reply(self, msg: dict) -> None:
        data = (json.dumps(msg) + "\n").encode()
        with self.lock:
            while data:
                try:
                    n = os.write(self.fd, data)
                except BlockingIOError:
                    select.select([], [self.fd], [], 1.0)
                    continue
                data = data[n:]

    def handle(self, line: bytes) -> None:
        try:
            req = json.loads(line)
        except ValueError:
            return  # garbage or a partial line from a host that went away: nothing to answer
        if isinstance(req, dict):
            self.reply(run_request(req))

    def serve(self) -> None:
        buf = b""
        while True:
            select.select([self.fd], [], [], 1.0)
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:          # no host connected: the port reads as EOF until one is
                buf = b""
                time.sleep(0.05)
                continue
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                threading.Thread(target=self.handle, args=(line,), daemon=True).start()


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else find_port()
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    print(f"ctlserver: serving on {path}", file=sys.stderr, flush=True)
    Server(fd).serve()


if __name__ == "__main__":
    main()
