"""The agent launcher's server: a Python that has imported what hastore's own agents import, and forks one child
per agent call instead of starting a new interpreter (`python -S agent op` costs ~30 ms here and ~1 s in a TCG
guest; a fork of this process ~2 ms).

Started by the daemon (hastore.io.launcher) as `python -S -m hastore.agentlib.zygote FD`, FD one end of a
SOCK_SEQPACKET socket pair. Each request is one JSON message {"id", "path", "args", "env"} with one file
descriptor attached (the agent's stdout and stderr). The server forks; the child starts a new session, takes
that descriptor as fds 1 and 2 and /dev/null as 0, replaces its environment and argv and runs the agent file as
`__main__`, exactly what `python -S PATH ARGS...` would do with the same environment. The server answers
{"id", "pid"} at once and {"id", "rc"} when the child has exited (rc as subprocess reports it: -N for
signal N). It exits when the daemon's end closes; children still running are left to finish (the daemon, or the
guard that outlives it, deals with them by their process ids, as with any agent).
"""

from __future__ import annotations

import array
import atexit
import io
import json
import os
import selectors
import signal
import socket
import sys
import traceback
import types

# What hastore's agents import (see agents/): loaded once here, so that a child only runs the agent itself.
import hashlib  # noqa: F401
import re  # noqa: F401
import shutil  # noqa: F401
import stat  # noqa: F401
import subprocess  # noqa: F401
import time  # noqa: F401
from collections import namedtuple  # noqa: F401

from hastore.agentlib import drbd, lease, mysql, net, ocf, proc, rtnl  # noqa: F401
from hastore.io import proc as _io_proc  # noqa: F401

MAX_MESSAGE = 1 << 20
MAXFD = os.sysconf("SC_OPEN_MAX")


_compiled: dict[str, tuple[tuple, object]] = {}


def compiled(path: str):
    """The agent file's code, compiled once per version of the file (its size, mtime and inode), before the fork:
    so that children do not compile it each time. None when it cannot be read: the child reports why."""
    try:
        st = os.stat(path)
        key = (st.st_size, st.st_mtime_ns, st.st_ino)
        hit = _compiled.get(path)
        if hit is not None and hit[0] == key:
            return hit[1]
        with open(path, "rb") as f:
            code = compile(f.read(), path, "exec", dont_inherit=True)  # not this module's __future__ imports
    except (OSError, SyntaxError, ValueError):
        return None
    _compiled[path] = (key, code)
    return code


def _stream(fd: int, mode: str, like, errors: str, line_buffering: bool) -> io.TextIOWrapper:
    raw = io.FileIO(fd, mode, closefd=False)
    buffered = io.BufferedReader(raw) if mode == "r" else io.BufferedWriter(raw)
    encoding = getattr(like, "encoding", None) or "utf-8"  # the server's own may be None (its fd was closed)
    return io.TextIOWrapper(buffered, encoding=encoding, errors=getattr(like, "errors", None) or errors,
                            line_buffering=line_buffering)


def child(path: str, args: list[str], env: dict[str, str], out: int, ready: int, code=None) -> int:
    """In the forked child: become the agent. Returns its exit code (Python's rules for SystemExit and for an
    exception nobody caught). `ready` is closed once the child leads its own session (the server answers with
    the pid only then, so that killing the session by that pid always works)."""
    os.setsid()
    os.close(ready)
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.closerange(3, MAXFD)  # as a new process gets them (close_fds): no socket, pipe or selector of the server
    os.environ.clear()
    os.environ.update(env)
    sys.argv = [path, *args]
    sys.path[0] = os.path.dirname(os.path.realpath(path))  # the script's directory, as `python -S PATH` has it
    main = types.ModuleType("__main__")
    main.__file__ = path
    main.__builtins__ = __builtins__
    sys.modules["__main__"] = main
    # The standard streams as a new interpreter makes them for these descriptors (stdout buffered unless a
    # terminal, stderr line-buffered), not the server's.
    sys.stdin = _stream(0, "r", sys.stdin, "strict", line_buffering=False)
    sys.stdout = _stream(1, "w", sys.stdout, "strict", line_buffering=os.isatty(1))
    sys.stderr = _stream(2, "w", sys.stderr, "backslashreplace", line_buffering=True)
    try:
        if code is None:
            with open(path, "rb") as f:
                code = compile(f.read(), path, "exec", dont_inherit=True)
        exec(code, main.__dict__)
        rc = 0
    except SystemExit as e:
        if e.code is None:
            rc = 0
        elif isinstance(e.code, int):
            rc = e.code & 0xFF
        else:
            print(e.code, file=sys.stderr)
            rc = 1
    except BaseException:  # noqa: BLE001 - what the interpreter does with an exception nobody caught
        traceback.print_exc()
        rc = 1
    atexit._run_exitfuncs()
    return rc


def serve(sock: socket.socket) -> None:
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the selector through the wakeup fd
    running: dict[int, int] = {}  # pid -> request id
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, "request")
    sel.register(r, selectors.EVENT_READ, "child")
    while True:
        for key, _ in sel.select():
            if key.data == "child":
                os.read(r, 4096)
            else:
                fds = array.array("i")
                msg, anc, _, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(fds.itemsize))
                if not msg:
                    return  # the daemon is gone
                for level, kind, data in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
                launch(sock, json.loads(msg), list(fds), running)
        reap(sock, running)


def launch(sock: socket.socket, req: dict, fds: list[int], running: dict[int, int]) -> None:
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        sock.send(json.dumps({"id": req.get("id"), "error": "expected one descriptor for the output"}).encode())
        return
    code = compiled(req["path"])
    for stream in (sys.stdout, sys.stderr):  # nothing of the server's may be written twice
        if stream is not None:
            stream.flush()
    ready_r, ready_w = os.pipe()
    try:
        pid = os.fork()
    except OSError as e:
        for fd in (fds[0], ready_r, ready_w):
            os.close(fd)
        sock.send(json.dumps({"id": req["id"], "error": f"fork failed: {e.strerror}"}).encode())
        return
    if pid == 0:
        rc = 1
        try:
            sock.close()
            os.close(ready_r)
            rc = child(req["path"], req["args"], req["env"], fds[0], ready_w, code)
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(rc)
    os.close(fds[0])
    os.close(ready_w)
    os.read(ready_r, 1)  # end of file once the child has its own session (or has died)
    os.close(ready_r)
    running[pid] = req["id"]
    sock.send(json.dumps({"id": req["id"], "pid": pid}).encode())


def reap(sock: socket.socket, running: dict[int, int]) -> None:
    while running:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        rid = running.pop(pid, None)
        if rid is not None:
            rc = os.waitstatus_to_exitcode(status)
            sock.send(json.dumps({"id": rid, "rc": rc}).encode())


def main() -> int:
    sock = socket.socket(fileno=int(sys.argv[1]))
    try:
        serve(sock)
    except (BrokenPipeError, ConnectionResetError):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
