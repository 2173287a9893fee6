"""The agent runner: runs one resource operation as a child process, with a timeout, and reports its exit code.

Where a haresources name leads (Heartbeat's search order, with hastore's own agents first):
  1. `ocf:PROVIDER:TYPE`               -> /usr/lib/ocf/resource.d/PROVIDER/TYPE (OCF, parameters only)
  2. one of hastore's agents (agents/)  -> OCF; haresources arguments become parameters by position
  3. resource.d/NAME beside ha.cf       -> Heartbeat script: `NAME arg1 arg2 start|stop|status`
  4. /usr/lib/ocf/resource.d/heartbeat/NAME -> OCF (parameters only)
  5. /etc/init.d/NAME                   -> LSB init script: start | stop | status (0 running, 3 stopped)
  6. a systemd unit NAME                -> systemctl start | stop | is-active
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hastore.agentlib.ocf import ERR_GENERIC as OCF_GENERIC
from hastore.agentlib.ocf import ERR_INSTALLED as OCF_NOT_INSTALLED
from hastore.agentlib.ocf import NOT_RUNNING as OCF_NOT_RUNNING
from hastore.config.model import Resource
from hastore.core.actions import TIMEOUT_RC
from hastore.io.launcher import Launcher, LauncherGone
from hastore.io.proc import REPO_ROOT as _ROOT, kill_group, last_line, with_repo_on_path

REPO_ROOT = Path(_ROOT)
AGENTS_DIR = REPO_ROOT / "agents"
OCF_ROOT = Path("/usr/lib/ocf")

Params = tuple[tuple[str, str], ...]


def _by_position(*names: str):
    """haresources arguments that are parameters one by one, in this order."""
    return lambda args: tuple(zip(names, args))


def _nfsserver_args(args: tuple[str, ...]) -> Params:
    """haresources `nfsserver::STATE_DIR::PATH::CLIENT(OPTIONS)[::PATH::CLIENT(OPTIONS)...]`: a haresources word
    has no spaces, so each export line (`PATH CLIENT(OPTIONS)`) comes as two arguments; a path with several
    clients is repeated. An odd count leaves a path without clients: the agent's validation names it."""
    if not args:
        return ()
    pairs = [" ".join(args[i:i + 2]) for i in range(1, len(args), 2)]
    return (("shared_dir", args[0]),) + ((("exports", "; ".join(pairs)),) if pairs else ())


def _mysql_args(args: tuple[str, ...]) -> Params:
    """haresources `mysql::DATADIR[::OPTION...]`: each argument after the datadir is one server option (a
    haresources word has no spaces), e.g. `mysql::/data/mysql::--innodb-buffer-pool-size=32M::--key-buffer-size=1M`;
    together they are additional_parameters, quoted as a shell would need them."""
    if not args:
        return ()
    return (("datadir", args[0]),) + ((("additional_parameters", shlex.join(args[1:])),) if args[1:] else ())


# haresources arguments of hastore's own agents -> their OCF parameters
POSITIONAL = {
    "IPaddr": _by_position("ip"),
    "Filesystem": _by_position("device", "directory", "fstype", "options"),
    "drbd": _by_position("resource"),
    "disklock": _by_position("device", "lease_ms", "wait_ms", "renew_ms"),
    "mysql": _mysql_args,
    "nfsserver": _nfsserver_args,
}
# what each of our agents cannot run without: a haresources word that leaves one of these unset is not meant for
# our agent (a bare `mysql` in haresources is the init script, as it was with Heartbeat)
REQUIRED = {"IPaddr": ("ip",), "Filesystem": ("device", "directory"), "drbd": ("resource",),
            "disklock": ("device",), "mysql": ("datadir",), "nfsserver": ("exports", "shared_dir")}
ALIASES = {"drbddisk": "drbd", "IPaddr2": "IPaddr"}  # Heartbeat names that mean one of our agents


@dataclass(frozen=True)
class Invocation:
    kind: str  # ocf | heartbeat | lsb | systemd | missing
    path: str
    args: tuple[str, ...] = ()
    params: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        return f"{self.kind} {self.path}"


def resolve(r: Resource, resource_d: Path | None, agents_dir: Path = AGENTS_DIR, ocf_root: Path = OCF_ROOT,
            init_d: Path = Path("/etc/init.d")) -> Invocation:
    name = r.agent
    params = tuple(r.params)
    if name.startswith("ocf:"):
        parts = name.split(":")
        if len(parts) == 3:
            return Invocation("ocf", str(ocf_root / "resource.d" / parts[1] / parts[2]), params=params)
    ours = ALIASES.get(name, name)
    if (agents_dir / ours).is_file():
        positional = POSITIONAL.get(ours, _by_position())(r.args)
        given = {k for k, _ in positional + params}
        if all(p in given for p in REQUIRED.get(ours, ())):
            return Invocation("ocf", str(agents_dir / ours), params=positional + params)
    if resource_d is not None and (resource_d / name).is_file():
        return Invocation("heartbeat", str(resource_d / name), args=r.args)
    if (ocf_root / "resource.d" / "heartbeat" / name).is_file():
        return Invocation("ocf", str(ocf_root / "resource.d" / "heartbeat" / name), params=params)
    if (init_d / name).is_file():
        return Invocation("lsb", str(init_d / name))
    if Path("/run/systemd/system").is_dir():
        return Invocation("systemd", name if "." in name else f"{name}.service")
    return Invocation("missing", name)


def ours(inv: Invocation) -> bool:
    """One of hastore's own agents (agents/): Python that imports hastore from this checkout."""
    return inv.kind == "ocf" and inv.path.startswith(str(AGENTS_DIR))


def argv_for(inv: Invocation, op: str) -> list[str]:
    if ours(inv):
        # Ours are Python: run them with the daemon's interpreter and without `env python3` (a version manager's
        # shim there costs ~100 ms per call, on the failover path). -S: they need nothing but the standard library
        # and hastore (found through PYTHONPATH, see _env), so skip site's .pth processing (30-50 ms a call here:
        # every start on the failover path and every monitor).
        return [sys.executable, "-S", inv.path, op]
    if inv.kind == "ocf":
        return [inv.path, op]
    if inv.kind == "heartbeat":
        return [inv.path, *inv.args, "status" if op == "monitor" else op]
    if inv.kind == "lsb":
        return [inv.path, "status" if op == "monitor" else op]
    return ["systemctl", {"monitor": "is-active", "start": "start", "stop": "stop"}[op], inv.path]


def normalise(inv: Invocation, op: str, rc: int, output: str) -> int:
    """Map every kind's answer onto OCF exit codes."""
    if inv.kind == "heartbeat" and op == "monitor":
        # Heartbeat v1 scripts print "running" or "stopped" for status
        text = output.lower()
        if "stopped" in text or "not running" in text or rc == 3:
            return OCF_NOT_RUNNING
        return 0 if rc == 0 else OCF_GENERIC
    if inv.kind == "lsb" and op == "monitor":
        return 0 if rc == 0 else OCF_NOT_RUNNING if rc in (1, 2, 3) else OCF_GENERIC
    if inv.kind == "systemd" and op == "monitor":
        return 0 if rc == 0 else OCF_NOT_RUNNING
    return rc


@dataclass(frozen=True)
class Command:
    """One agent operation, ready to run: what the runner executes, and what the guard keeps for `stop`."""

    argv: tuple[str, ...]
    env: dict[str, str] = field(hash=False)


class AgentRunner:
    """Runs agents for the daemon; `done(group, index, op, op_id, rc, detail)` receives each result.

    `spawned(pids)`, if set, hears the process ids of the agents running now whenever they change (the guard
    kills those left behind when it fences)."""

    def __init__(self, groups, resource_d: Path | None, done, log=None):
        self.done = done
        self.log = log
        self.spawned = None
        self.invocations = {(g.name, i): resolve(r, resource_d) for g in groups for i, r in enumerate(g.resources)}
        self.names = {(g.name, i): (r.raw or "::".join((r.agent, *r.args))) for g in groups
                      for i, r in enumerate(g.resources)}
        self.tasks: set[asyncio.Task] = set()
        self.pids: set[int] = set()
        self.launcher: Launcher | None = None  # see start_launcher

    def command(self, group: str, index: int, op: str, timeout_s: float) -> Command | None:
        """None when no agent of that name exists (its stop then trivially succeeds)."""
        inv = self.invocations[(group, index)]
        if inv.kind == "missing":
            return None
        return Command(tuple(argv_for(inv, op)), self._env(inv, group, index, timeout_s))

    def run(self, group: str, index: int, op: str, timeout_s: float, op_id: int) -> None:
        task = asyncio.get_running_loop().create_task(self._run(group, index, op, timeout_s, op_id))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, group: str, index: int, op: str, timeout_s: float, op_id: int) -> None:
        """Whatever goes wrong in here, the engine hears back: an operation nobody reports stalls its group."""
        reported = False

        def done(*result) -> None:
            nonlocal reported
            reported = True
            self.done(*result)
        try:
            await self._operate(group, index, op, timeout_s, op_id, done)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if reported:
                raise
            self.done(group, index, op, op_id, OCF_GENERIC, f"hastore could not run the agent: {e!r}")
            self._log("error", group=group, resource=self.names[(group, index)], op=op,
                      detail=f"the runner failed: {e!r}")

    async def _operate(self, group: str, index: int, op: str, timeout_s: float, op_id: int, done) -> None:
        inv = self.invocations[(group, index)]
        cmd = self.command(group, index, op, timeout_s)
        if cmd is None:
            detail = f"no agent, resource.d script, init script or unit named {inv.path!r}"
            rc = 0 if op == "stop" else OCF_NOT_RUNNING if op == "monitor" else OCF_NOT_INSTALLED
            done(group, index, op, op_id, rc, detail)
            return
        try:
            os.makedirs(cmd.env["HA_RSCTMP"], exist_ok=True)  # resource-agents keep their state files there
        except OSError:
            pass
        try:
            proc = await asyncio.wait_for(self._spawn(inv, op, cmd), timeout_s)
        except asyncio.TimeoutError:
            done(group, index, op, op_id, TIMEOUT_RC, f"not even started after {timeout_s:g} s")
            return
        if isinstance(proc, str):
            done(group, index, op, op_id, OCF_NOT_INSTALLED, proc)
            return
        t0 = asyncio.get_running_loop().time()
        self._track(proc.pid, True)
        try:
            out, rc = await asyncio.wait_for(proc.communicate(), timeout_s)
        except asyncio.TimeoutError:
            kill_group(proc.pid)
            out = b""
            await proc.wait()
            rc = TIMEOUT_RC
        except asyncio.CancelledError:
            kill_group(proc.pid)  # the daemon is exiting: leave no agent behind
            raise
        finally:
            self._track(proc.pid, False)
        text = out.decode(errors="replace").strip()
        rc = normalise(inv, op, rc, text) if rc != TIMEOUT_RC else rc
        detail = last_line(text)
        if rc == TIMEOUT_RC:
            detail = f"killed after {timeout_s:g} s"
        if op != "monitor":  # monitors are many; the engine logs their failures
            self._log("info", group=group, resource=self.names[(group, index)], op=op, rc=rc,
                      elapsed_ms=round((asyncio.get_running_loop().time() - t0) * 1000), detail=detail)
        done(group, index, op, op_id, rc, detail)

    def _log(self, level: str, **fields) -> None:
        """A log line about an operation; a log that fails (disk full, stderr gone) must not lose its result."""
        if self.log is None:
            return
        try:
            getattr(self.log, level)("agent", **fields)
        except Exception:  # noqa: BLE001
            pass

    async def _spawn(self, inv: Invocation, op: str, cmd: Command):
        """The running agent (pid, communicate() -> (output, rc), wait() -> rc), or why it could not start. Ours
        are forked by the launcher when it runs (see hastore.io.launcher), the others started as processes."""
        if self.launcher is not None and ours(inv):
            try:
                return await self.launcher.run(inv.path, [op], cmd.env)
            except LauncherGone:
                pass  # started the usual way below; the launcher said why in the log
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd.argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, env=cmd.env, start_new_session=True)
        except OSError as e:
            return f"cannot run {inv.path}: {e.strerror}"
        return _Process(proc)

    def start_launcher(self) -> None:
        """Fork our agents from a process that has imported them (saves starting Python for every call)."""
        if self.launcher is None and any(ours(inv) for inv in self.invocations.values()):
            launcher = Launcher(with_repo_on_path(dict(os.environ)), self.log)
            if launcher.start():
                self.launcher = launcher

    def _track(self, pid: int, running: bool) -> None:
        (self.pids.add if running else self.pids.discard)(pid)
        if self.spawned is not None:
            self.spawned(sorted(self.pids))

    def _env(self, inv: Invocation, group: str, index: int, timeout_s: float) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OCF_")}
        env.update({"OCF_ROOT": str(OCF_ROOT), "OCF_RA_VERSION_MAJOR": "1", "OCF_RA_VERSION_MINOR": "1",
                    "OCF_RESOURCE_INSTANCE": _instance(group, self.names[(group, index)]),
                    "OCF_RESKEY_CRM_meta_timeout": str(int(timeout_s * 1000)), "HA_RSCTMP": "/run/resource-agents",
                    # who runs the agent: its parent is the launcher (see hastore.io.launcher), not the daemon
                    "HASTORE_DAEMON_PID": str(os.getpid())})
        env.update({f"OCF_RESKEY_{k}": v for k, v in inv.params})
        return with_repo_on_path(env) if ours(inv) else env

    def cancel_all(self) -> None:
        for t in list(self.tasks):
            t.cancel()
        if self.launcher is not None:
            self.launcher.close()
            self.launcher = None


class _Process:
    """An agent started as a process, with the launcher's interface."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc
        self.pid = proc.pid

    async def communicate(self) -> tuple[bytes, int]:
        out, _ = await self.proc.communicate()
        return out, self.proc.returncode

    async def wait(self) -> int:
        return await self.proc.wait()


def _instance(group: str, name: str) -> str:
    """A resource instance name agents can use in file names (Dummy keeps its state file by it)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{group}-{name}").strip("_")[:100]
