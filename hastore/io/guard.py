"""The guard: what stops this node's resources when the daemon died or froze (Heartbeat's watchdog, in userspace).

The daemon starts it at startup, in its own session so that neither a signal to the daemon's process group nor
the daemon's exit reaches it, joined by a socket pair. JSON lines, daemon -> guard:

    {"m": "held", "resources": [{"name", "argv", "env", "timeout_s"}, ...]}   what may run here, in start order,
                                                                            with each one's stop command
    {"m": "agents", "pids": [[pid, start_ticks], ...]}  agent processes in flight (killed before the stops)
    {"m": "pet"}                       only to a guard adopted from an image that had no pet page (below)
    {"m": "sync", "n": N}              after a stall: "did you fence?"; answered {"m": "ok", "n": N}
    {"m": "timeout", "ms": N}          a reload changed guard_timeout
    {"m": "farewell", "sends": [{"family", "interface", "dest", "data"}, ...]}
                                       signed LEAVE datagrams (hex) and where to send them (UDP links)
    {"m": "bye"}                       a clean exit, nothing held: the guard exits quietly

Pets go through a shared page instead (a memfd, --pet-fd): the daemon writes its CLOCK_MONOTONIC time there with
its events, every eighth of guard_timeout at most (the engine's deadlines make an event come at least every
keepalive). That costs the daemon no system call and does not wake the guard, which looks at the page only when
guard_timeout has passed since the last pet it saw, and then sleeps again until guard_timeout after the newest.

Any message or pet proves the daemon alive. EOF without bye (the daemon was killed) or no message for guard_timeout (the
daemon is frozen) makes the guard fence: it first writes {"m": "fencing", "reason", "silent_ms"} back (so that a
frozen daemon learns on waking that it must not carry on), kills the agents in flight, runs `stop` of every held
resource in reverse order, logs each step on its stderr (the daemon's log), and, when every stop succeeded, sends
the farewell datagrams so that the peer takes over at once instead of after deadtime; then it exits. Input is
always read before the clock is looked at, so a pet already sent is never overlooked; the decision itself is
`Watch`, pure.

    python -m hastore.io.guard --fd N --daemon-pid PID --timeout-ms MS [--pet-fd N] [--logfile PATH]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field

from hastore.agentlib.ocf import ERR_INSTALLED
from hastore.core.actions import TIMEOUT_RC
from hastore.io.log import JsonLines
from hastore.io.proc import kill_group, last_line, start_ticks, with_repo_on_path

SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
STARTUP_S = 30.0  # how long the daemon waits for a new guard to answer (a Python start: seconds on a loaded VM)
RESTART_GRACE_MS = 5000  # guard_timeout while the daemon re-executes itself (`hastore restart`); the peer is
#                          asked to wait this plus deadtime, so the guard has fenced before the peer would start
HANDOVER_ENV = "HASTORE_GUARD"  # "FD:PID:PET_FD": the guard a re-executed daemon inherits (PET_FD may be missing)
PET = struct.Struct("=d")  # the pet page: the daemon's time.monotonic() at its latest pet (0.0: none yet)


class GuardError(RuntimeError):
    """The guard could not be started."""


@dataclass(frozen=True)
class Stop:
    """How to stop one held resource."""

    name: str
    argv: tuple[str, ...]
    env: dict[str, str] = field(hash=False)
    timeout_s: float = 90.0

    @classmethod
    def from_json(cls, d: dict) -> Stop:
        return cls(str(d["name"]), tuple(d["argv"]), dict(d["env"]), float(d["timeout_s"]))


@dataclass(frozen=True)
class Verdict:
    """bye: exit quietly; fence: stop `stops` (already in stop order) after killing `agents`, then exit."""

    kind: str
    reason: str
    stops: tuple[Stop, ...] = ()
    agents: tuple[tuple[int, int], ...] = ()
    silent_ms: int = 0
    farewell: tuple[dict, ...] = ()


class Watch:
    """The guard's decisions: fed the daemon's messages and the time, no I/O, no clock."""

    def __init__(self, daemon_pid: int, timeout_s: float, now: float):
        self.daemon_pid = daemon_pid
        self.timeout_s = timeout_s
        self.last_heard = now
        self.held: tuple[Stop, ...] = ()
        self.agents: tuple[tuple[int, int], ...] = ()
        self.farewell: tuple[dict, ...] = ()
        self.said_bye = False

    def receive(self, msg: dict, now: float) -> dict | None:
        """One message; returns the reply to write, if any. Raises ValueError on a message it does not know."""
        self.last_heard = now
        kind = msg.get("m")
        if kind == "held":
            self.held = tuple(Stop.from_json(r) for r in msg["resources"])
        elif kind == "agents":
            self.agents = tuple((int(p), int(t)) for p, t in msg["pids"])
        elif kind == "timeout":
            self.timeout_s = msg["ms"] / 1000
        elif kind == "farewell":
            self.farewell = tuple({"family": int(s["family"]), "interface": str(s["interface"]),
                                   "dest": tuple(s["dest"]), "data": bytes.fromhex(s["data"])} for s in msg["sends"])
        elif kind == "sync":
            return {"m": "ok", "n": msg.get("n")}
        elif kind == "bye":
            self.said_bye = True
        elif kind != "pet":
            raise ValueError(f"unknown message {kind!r}")
        return None

    def petted(self, at: float, now: float) -> None:
        """The time the pet page holds (the daemon's clock is ours: CLOCK_MONOTONIC), read before `now`. Never
        later than now, whatever was read: a pet page written while we read it is a daemon that is alive anyway."""
        if at > self.last_heard:
            self.last_heard = min(at, now)

    def deadline(self) -> float:
        return self.last_heard + self.timeout_s

    def decide(self, now: float, eof: bool) -> Verdict | None:
        """After everything readable was received: what to do now (None: keep watching)."""
        if self.said_bye:
            return Verdict("bye", f"daemon pid {self.daemon_pid} stopped cleanly: nothing to guard")
        silent_ms = round((now - self.last_heard) * 1000)
        if eof:
            why = f"daemon pid {self.daemon_pid} died (EOF on guard pipe)"
        elif now > self.deadline():
            if not self.held:  # a slow daemon that holds nothing: nothing to stop, so no reason to fence it
                self.last_heard = now  # a new window: no busy loop on a passed deadline
                return None
            why = (f"daemon pid {self.daemon_pid} sent nothing for {silent_ms} ms (guard_timeout "
                   f"{self.timeout_s * 1000:.0f} ms): it is frozen or stuck")
        else:
            return None
        stops = tuple(reversed(self.held))
        if not stops:
            return Verdict("fence", f"{why}: nothing held here", (), self.agents, silent_ms, self.farewell)
        return Verdict("fence", f"{why}: self-fencing: stopping {', '.join(s.name for s in stops)}", stops,
                       self.agents, silent_ms, self.farewell)


# -- the guard process ------------------------------------------------------------------------------------------
def serve(sock: socket.socket, watch: Watch, log, clock=time.monotonic, pets=None) -> Verdict:
    """Read the daemon's messages (and its pet page, if any) until a verdict; answers syncs on the way."""
    buf = b""
    while True:
        select.select([sock], [], [], max(0.0, watch.deadline() - clock()))
        data, eof = _drain(sock)
        petted = PET.unpack_from(pets)[0] if pets is not None else 0.0
        now = clock()
        watch.petted(petted, now)
        buf += data
        *lines, buf = buf.split(b"\n")
        for line in lines:
            try:
                reply = watch.receive(json.loads(line), now)
            except (ValueError, KeyError, TypeError) as e:
                text = line[:200].decode(errors="replace")
                log.warning("guard", reason=f"ignoring a message it does not understand: {e}", line=text)
                continue
            if reply is not None:
                _write(sock, reply)
        verdict = watch.decide(now, eof)
        if verdict is not None:
            return verdict


def fence(verdict: Verdict, sock: socket.socket, log, clock=time.monotonic) -> int:
    """Tell the daemon, kill its agents in flight, stop every held resource (going on past failures)."""
    t0 = clock()
    _write(sock, {"m": "fencing", "reason": verdict.reason, "silent_ms": verdict.silent_ms})
    if not verdict.stops:
        log.warning("guard", reason=f"{verdict.reason}: exiting")
        say_farewell(verdict.farewell, log)
        return 0
    log.error("self-fencing", reason=verdict.reason)
    for pid, ticks in verdict.agents:
        if start_ticks(pid) == ticks:  # the same process, not a later one that got its pid
            kill_group(pid)
            log.warning("self-fencing", reason=f"killed agent process group {pid} the daemon left running")
    failed = []
    for s in verdict.stops:
        rc, detail = run_stop(s)
        ms = round((clock() - t0) * 1000)
        if rc == 0:
            log.warning("self-fencing", reason=f"stopped {s.name}", elapsed_ms=ms)
        else:
            failed.append(s.name)
            log.error("self-fencing", reason=f"stop of {s.name} failed (exit {rc}{': ' + detail if detail else ''}); "
                                             f"going on with the rest", elapsed_ms=ms)
    ms = round((clock() - t0) * 1000)
    if failed:
        log.error("self-fencing done", reason=f"{len(failed)} of {len(verdict.stops)} stop(s) failed: "
                                              f"{', '.join(failed)} may still run here", elapsed_ms=ms)
        return 1
    log.warning("self-fencing done", reason=f"all {len(verdict.stops)} held resource(s) stopped", elapsed_ms=ms)
    say_farewell(verdict.farewell, log)
    return 0


def say_farewell(sends: tuple[dict, ...], log) -> None:
    """Nothing of ours runs here any more: tell the peer (one datagram per UDP link, best effort; if none
    arrives the peer takes over after deadtime, as it would have)."""
    sent = []
    for s in sends:
        try:
            with socket.socket(s["family"], socket.SOCK_DGRAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, s["interface"].encode())
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
                sock.sendto(s["data"], s["dest"])
            sent.append(f"{s['interface']} -> {s['dest'][0]}")
        except OSError as e:
            log.warning("guard", reason=f"could not send the farewell on {s['interface']}: {e}")
    if sent:
        log.warning("guard", reason=f"told the peer this node holds nothing any more ({', '.join(sent)}): it may "
                                    f"take over without waiting for deadtime")


def run_stop(s: Stop) -> tuple[int, str]:
    """Run one stop command in its own process group; kill the group at its timeout (rc TIMEOUT_RC)."""
    try:
        proc = subprocess.Popen(s.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=s.env, start_new_session=True)
    except OSError as e:
        return ERR_INSTALLED, f"cannot run {s.argv[0]}: {e.strerror}"
    try:
        out, _ = proc.communicate(timeout=s.timeout_s)
    except subprocess.TimeoutExpired:
        kill_group(proc.pid)
        proc.wait()  # not communicate(): a process outside the group may still hold the pipe open
        return TIMEOUT_RC, f"killed after {s.timeout_s:g} s"
    return proc.returncode, last_line(out.decode(errors="replace").strip())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hastore.io.guard")
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--daemon-pid", type=int, required=True)
    p.add_argument("--timeout-ms", type=int, required=True)
    p.add_argument("--pet-fd", type=int)
    p.add_argument("--logfile")
    args = p.parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # it ends when its work is done: after bye, or after fencing
    log = JsonLines(args.logfile, guard_pid=os.getpid())  # the daemon's JSON lines, without structlog's imports
    sock = socket.socket(fileno=args.fd)
    sock.set_inheritable(False)  # no stop command may keep the pipe open
    sock.setblocking(False)
    pets = None
    if args.pet_fd is not None:
        pets = mmap.mmap(args.pet_fd, PET.size, prot=mmap.PROT_READ)
        os.close(args.pet_fd)  # the mapping stays
    verdict = serve(sock, Watch(args.daemon_pid, args.timeout_ms / 1000, time.monotonic()), log, pets=pets)
    if verdict.kind == "bye":
        return 0
    return fence(verdict, sock, log)


def _drain(sock: socket.socket) -> tuple[bytes, bool]:
    """Everything readable now, and whether the other end has closed."""
    chunks = []
    while True:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return b"".join(chunks), False
        except OSError:
            return b"".join(chunks), True
        if not data:
            return b"".join(chunks), True
        chunks.append(data)


def _write(sock: socket.socket, msg: dict) -> bool:
    try:
        sock.sendall(json.dumps(msg, separators=(",", ":")).encode() + b"\n")
        return True
    except OSError:  # the daemon is gone (EPIPE), or its buffer is full (it is frozen): nobody to tell
        return False


# -- the daemon's side ------------------------------------------------------------------------------------------
class GuardClient:
    """Starts the guard and talks to it. `on_change()` is called when it said it fenced, or when it is gone."""

    def __init__(self, timeout_ms: int, logfile: str | None, on_change, loop):
        self.timeout_ms = timeout_ms
        self.logfile = logfile
        self.on_change = on_change
        self.loop = loop
        self.sock: socket.socket | None = None
        self.proc: subprocess.Popen | None = None
        self.held: list[dict] | None = []
        self.agents: list[list[int]] = []
        self.started_at = self.last_sent = 0.0
        self.fencing: dict | None = None  # what the guard said when it fenced
        self.gone = False
        self.sync_n = 0
        self.answered = False
        self.buf = b""
        self.pet_fd: int | None = None  # the pet page (a memfd the guard maps too), and our mapping of it
        self.pets: mmap.mmap | None = None

    @property
    def timeout_s(self) -> float:
        return self.timeout_ms / 1000

    def start(self, wait_s: float = STARTUP_S) -> None:
        """Start a guard (again, after one was lost: it gets what is held at once) and wait until it answers, at
        most wait_s (the loop does not run meanwhile: no beats go out)."""
        ours, theirs = socket.socketpair()
        self._unmap_pets()  # a lost guard's
        pet_fd = os.memfd_create("hastore-guard-pets")  # close-on-exec but for the guard (pass_fds)
        os.ftruncate(pet_fd, PET.size)
        argv = [sys.executable, "-m", "hastore.io.guard", "--fd", str(theirs.fileno()), "--daemon-pid",
                str(os.getpid()), "--timeout-ms", str(self.timeout_ms), "--pet-fd", str(pet_fd)]
        try:
            self.proc = subprocess.Popen(argv + (["--logfile", self.logfile] if self.logfile else []),
                                         stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(), pet_fd),
                                         start_new_session=True, env=with_repo_on_path(dict(os.environ)))
        except OSError as e:
            ours.close()
            os.close(pet_fd)
            raise GuardError(f"cannot start the guard ({sys.executable}): {e.strerror}") from None
        finally:
            theirs.close()
        self._map_pets(pet_fd)
        ours.setblocking(False)
        self.sock, self.buf, self.fencing, self.gone = ours, b"", None, False
        self.started_at = time.monotonic()
        self.loop.add_reader(ours, self._on_readable)
        if self.held:
            self._send({"m": "held", "resources": self.held})
        if self.agents:
            self._send({"m": "agents", "pids": self.agents})
        answer = self.confirm(wait_s)
        if answer is not True:
            raise GuardError(f"the guard (pid {self.proc.pid}) did not start: " +
                             (f"no answer within {wait_s:g} s" if answer is None else self.describe_exit()))
        self.pet()  # the wait was the guard's start, not a stall of ours (Daemon._guard_ok)

    def adopt(self, handover: str) -> None:
        """After a re-exec (`hastore restart`): take over the guard the previous image ran, whose socket we
        inherited, and give it back the configured guard_timeout. A handover without a pet page (from an image
        before pet pages) leaves a guard that only reads its socket: pets go there."""
        try:
            fd, pid, *pet_fd = (int(x) for x in handover.split(":"))
            if len(pet_fd) > 1:
                raise ValueError("more than three fields")
            sock = socket.socket(fileno=fd)
            if pet_fd:
                os.set_inheritable(pet_fd[0], False)
                self._map_pets(pet_fd[0])
        except (ValueError, OSError) as e:
            raise GuardError(f"cannot take over the guard of the previous daemon ({handover!r}): {e}") from None
        sock.set_inheritable(False)
        sock.setblocking(False)
        self.proc = _Adopted(pid)
        self.held = None  # unknown: it keeps what the previous image told it until we say what runs here
        self.sock, self.buf, self.fencing, self.gone = sock, b"", None, False
        self.started_at = time.monotonic()
        self.loop.add_reader(sock, self._on_readable)
        self._send({"m": "timeout", "ms": self.timeout_ms})
        # a guard already running answers at once; the peer waits RESTART_GRACE_MS + deadtime for our beats
        if self.confirm(RESTART_GRACE_MS / 1000) is not True:
            raise GuardError(f"the guard of the previous daemon (pid {pid}) does not guard any more: "
                             f"{self.describe_exit()}")
        self.pet()

    def hand_over(self) -> str:
        """Before a re-exec: let the socket survive exec and give the new image time to start (RESTART_GRACE_MS);
        returns the value of HANDOVER_ENV for it."""
        self._send({"m": "timeout", "ms": RESTART_GRACE_MS})
        self.loop.remove_reader(self.sock)
        self.sock.set_inheritable(True)
        if self.pet_fd is None:
            return f"{self.sock.fileno()}:{self.proc.pid}"
        os.set_inheritable(self.pet_fd, True)
        return f"{self.sock.fileno()}:{self.proc.pid}:{self.pet_fd}"

    def pet(self) -> None:
        """Our clock's time on the pet page: no system call, and the guard sleeps on (see the module's docstring)."""
        if self.pets is None:
            self._send({"m": "pet"})
        elif self.sock is not None and not self.gone:
            self.last_sent = time.monotonic()
            PET.pack_into(self.pets, 0, self.last_sent)

    def set_farewell(self, sends: list[dict]) -> None:
        self._send({"m": "farewell", "sends": sends})

    def hold(self, resources: list[dict]) -> None:
        if resources != self.held:
            self.held = resources
            self._send({"m": "held", "resources": resources})

    def track_agents(self, pids: list[int]) -> None:
        """AgentRunner.spawned: the agents running now (with their start times, which identify them)."""
        self.agents = [[p, t] for p in pids if (t := start_ticks(p)) is not None]
        self._send({"m": "agents", "pids": self.agents})

    def set_timeout(self, timeout_ms: int) -> None:
        if timeout_ms != self.timeout_ms:
            self.timeout_ms = timeout_ms
            self._send({"m": "timeout", "ms": timeout_ms})

    def silence(self, now: float) -> float:
        """Seconds since the guard last heard from us."""
        return now - self.last_sent

    def confirm(self, wait_s: float) -> bool | None:
        """Blocking: True when the guard answers that it still guards, False when it fenced or is gone, None when
        it did not answer within wait_s. The guard writes "fencing" before it acts, so the first answer is true."""
        self.sync_n += 1
        self.answered = False
        self._send({"m": "sync", "n": self.sync_n})
        deadline = time.monotonic() + wait_s
        while not (self.answered or self.fencing is not None or self.gone):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                return None
            self._read()
        return self.answered and self.fencing is None and not self.gone

    def close(self, bye: bool) -> None:
        """bye: a clean exit with nothing held, the guard exits quietly. Without: it fences what it holds."""
        if self.sock is None:
            return
        if bye:
            self._send({"m": "bye"})
        if not self.gone:
            self.loop.remove_reader(self.sock)
        self.sock.close()
        self.sock = None
        self._unmap_pets()
        if bye or self.gone:
            self._reap(2.0)

    def status(self) -> dict:
        return {"pid": self.proc.pid if self.proc else None, "timeout_ms": self.timeout_ms, "held": len(self.held or ()),
                "fenced": self.fencing is not None}

    def describe_exit(self) -> str:
        rc = self.proc.poll() if self.proc else None
        if rc is None:
            return "it does not answer"
        return f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"

    # -- plumbing --------------------------------------------------------------------------------------------
    def _send(self, msg: dict) -> None:
        if self.sock is None or self.gone:
            return
        if _write(self.sock, msg):
            self.last_sent = time.monotonic()
        # else it is gone (EPIPE: its EOF is on the way to _on_readable), or stuck with 200 kB unread (then it
        # cannot fence either)

    def _on_readable(self) -> None:
        if self.sock is not None and not self.gone:
            self._read()
            if self.gone or self.fencing is not None:
                self.on_change()

    def _read(self) -> None:
        data, eof = _drain(self.sock)
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("m") == "fencing":
                self.fencing = msg
            elif msg.get("m") == "ok" and msg.get("n") == self.sync_n:
                self.answered = True
        if eof:
            self.gone = True
            self.loop.remove_reader(self.sock)
            self._reap(5.0)  # it closed the pipe by exiting: collect its status

    def _map_pets(self, fd: int) -> None:
        self.pet_fd, self.pets = fd, mmap.mmap(fd, PET.size)

    def _unmap_pets(self) -> None:
        if self.pets is not None:
            self.pets.close()
            os.close(self.pet_fd)
        self.pet_fd = self.pets = None

    def _reap(self, wait_s: float) -> None:
        try:
            self.proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            pass


class _Adopted:
    """The guard as a child this process image did not spawn (it inherited it across exec): poll and wait."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # not our child after all: it can only be watched through the socket
                return None
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"guard pid {self.pid}", timeout)
            time.sleep(0.02)
        return self.returncode


if __name__ == "__main__":
    sys.exit(main())
