"""The agent launcher's client: runs hastore's own (Python) agents as forks of a process that has imported them
(hastore.agentlib.zygote) rather than as new interpreters. Same argv, environment, output and exit code; the
agent's process id is real (the runner's timeout and the guard kill its session as before).

If the launcher cannot be started or dies, `run` raises LauncherGone before an agent was started, and the runner
starts that agent and the following ones the usual way: the launcher only ever saves time.
"""

from __future__ import annotations

import array
import asyncio
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field

from hastore.io.proc import kill_group


class LauncherGone(Exception):
    """The launcher is not running (never started, or died): start the agent the usual way."""


@dataclass
class Launched:
    pid: int
    output: asyncio.Future = field(repr=False)
    rc: asyncio.Future = field(repr=False)

    async def communicate(self) -> tuple[bytes, int]:
        """The agent's output (until every holder of its stdout closed it) and its exit code (-N: signal N)."""
        out = await asyncio.shield(self.output)
        return out, await asyncio.shield(self.rc)

    async def wait(self) -> int:
        return await asyncio.shield(self.rc)


class Launcher:
    def __init__(self, env: dict[str, str], log=None):
        self.env = env
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.next_id = 0
        self.waiting: dict[int, asyncio.Future] = {}  # request id -> future of the pid (until it comes)
        self.rcs: dict[int, asyncio.Future] = {}  # request id -> future of the exit code (until it comes)
        self.pids: dict[int, int] = {}  # request id -> pid of the agents running now
        self.abandoned: set[int] = set()  # request ids whose caller was cancelled before the pid came
        self.started_agents = 0

    def start(self) -> bool:
        """Start the server; False (and the reason logged) if it cannot run: agents then start the usual way."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen([sys.executable, "-S", "-m", "hastore.agentlib.zygote", str(theirs.fileno())],
                                         pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=self.env,
                                         start_new_session=True)  # a Ctrl-C of a foreground daemon is not its
        except OSError as e:
            ours.close()
            self._say(f"agent launcher not started ({e}): agents start as new processes")
            return False
        finally:
            theirs.close()
        ours.setblocking(False)
        self.sock = ours
        asyncio.get_running_loop().add_reader(ours, self._readable)
        return True

    @property
    def alive(self) -> bool:
        return self.sock is not None

    async def run(self, path: str, args: list[str], env: dict[str, str]) -> Launched:
        """Fork the agent `path` with `args` and `env`; returns once it runs in its own session (its pid is known).

        LauncherGone: it was not started, and is not running: the caller may start it the usual way."""
        if self.sock is None:
            raise LauncherGone("not running")
        loop = asyncio.get_running_loop()
        r, w = os.pipe()
        self.next_id += 1
        rid = self.next_id
        try:
            msg = json.dumps({"id": rid, "path": path, "args": args, "env": env}).encode()
            self.sock.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [w]).tobytes())])
        except OSError as e:
            # Not sent, so not forked: this agent starts the usual way. A launcher that is gone says so on its
            # socket (end of file, after any answers still queued there), and _readable deals with it.
            os.close(r)
            raise LauncherGone(f"sending to it failed: {e}") from None
        finally:
            os.close(w)
        started = self.waiting[rid] = loop.create_future()
        self.rcs[rid] = rc = loop.create_future()  # kept here: a quick agent's rc may come before `started` wakes us
        try:
            pid = await started
        except LauncherGone:
            # Gone without saying it forked this one. If it did, the child holds the output pipe: wait until
            # nobody does, so that the agent never runs twice at once.
            await _read_all(loop, r)
            raise
        except asyncio.CancelledError:
            os.close(r)
            self.abandoned.add(rid)  # if it did fork it, the pid still comes: killed then (see _readable)
            raise
        self.started_agents += 1
        return Launched(pid, _read_all(loop, r), rc)

    def _readable(self) -> None:
        while self.sock is not None:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as e:
                self._gone(f"reading from it failed: {e}")
                return
            if not data:
                self._gone("it exited")
                return
            msg = json.loads(data)
            rid = msg.get("id")
            if "pid" in msg:
                if rid in self.abandoned:  # its caller was cancelled while it was being forked
                    self.abandoned.discard(rid)
                    self.rcs.pop(rid, None)
                    kill_group(msg["pid"])
                    continue
                self.pids[rid] = msg["pid"]
                fut = self.waiting.pop(rid, None)
                if fut is not None and not fut.done():
                    fut.set_result(msg["pid"])
            elif "rc" in msg:
                fut = self.rcs.pop(rid, None)
                if fut is not None and not fut.done():
                    fut.set_result(msg["rc"])
                self.pids.pop(rid, None)
            elif "error" in msg:
                fut = self.waiting.pop(rid, None)
                self.rcs.pop(rid, None)
                if fut is not None and not fut.done():
                    fut.set_exception(LauncherGone(msg["error"]))

    def _gone(self, why: str) -> None:
        """The server is gone: agents not yet started start the usual way; those it started are waited for by
        their process ids (their exit codes died with it: reported as 1, generic error)."""
        if self.sock is None:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.sock)
        self.sock.close()
        self.sock = None
        self._say(f"agent launcher lost ({why}): agents start as new processes from now on")
        for fut in self.waiting.values():
            if not fut.done():
                fut.set_exception(LauncherGone(why))
        self.waiting.clear()
        for rid, fut in self.rcs.items():
            _orphan_rc(loop, self.pids.get(rid), fut)
        self.rcs.clear()
        self.pids.clear()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()

    def close(self) -> None:
        if self.sock is not None:
            try:
                asyncio.get_running_loop().remove_reader(self.sock)
            except RuntimeError:
                pass
            self.sock.close()
            self.sock = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def _say(self, text: str) -> None:
        if self.log is not None:
            self.log.warning("launcher", detail=text)


def _read_all(loop: asyncio.AbstractEventLoop, fd: int) -> asyncio.Future:
    """A future of everything read from `fd` until end of file (then closed)."""
    os.set_blocking(fd, False)
    fut = loop.create_future()
    chunks: list[bytes] = []

    def readable() -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            chunks.append(data)
            return
        loop.remove_reader(fd)
        os.close(fd)
        if not fut.done():
            fut.set_result(b"".join(chunks))

    def cancelled(f: asyncio.Future) -> None:
        if f.cancelled():
            loop.remove_reader(fd)
            os.close(fd)

    loop.add_reader(fd, readable)
    fut.add_done_callback(cancelled)
    return fut


def _orphan_rc(loop: asyncio.AbstractEventLoop, pid: int | None, fut: asyncio.Future) -> None:
    """An agent whose launcher died: its exit code is lost with it. Once it has exited (a pidfd says when; the
    runner kills it on timeout as usual) it is reported as 1, a generic error: never as a success nobody saw."""
    if fut.done():
        return
    if pid is None:
        fut.set_result(1)
        return
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        fut.set_result(1)  # exited already
        return
    except OSError:
        _poll_exit(loop, pid, fut)  # no pidfd here (old kernel, seccomp): look every 100 ms
        return

    def exited() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        if not fut.done():
            fut.set_result(1)

    loop.add_reader(pidfd, exited)


def _poll_exit(loop: asyncio.AbstractEventLoop, pid: int, fut: asyncio.Future) -> None:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        if not fut.done():
            fut.set_result(1)
        return
    except OSError:
        pass
    loop.call_later(0.1, _poll_exit, loop, pid, fut)
