"""The MariaDB/MySQL server behind agents/mysql: settings, the generated option file, start, stop, monitor.

One server per datadir. The agent writes a small option file of its own (`<pid>.cnf` next to the pid file) and
starts the server with `--defaults-file=` it, so nothing in /etc/mysql can move the datadir, socket or port behind
the cluster's back; an operator's own settings come in through the `config` parameter (an `!include` placed before
the agent's lines, so the agent's paths win). That option file's path is in the server's command line, which is how
the agent recognises its own server in /proc even when the pid file is gone or stale -- and never signals a
process that merely reuses an old pid.

The server runs detached from the agent (its own session, stdin /dev/null, stdout and stderr appended to the
error log), so the agent returns at once and a runner reading the agent's output is never held open by it.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import select
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections import namedtuple  # not dataclasses: an agent runs per call, and that import costs ~20 ms

from hastore.agentlib.ocf import ERR_CONFIGURED, ERR_GENERIC, ERR_INSTALLED, NOT_RUNNING, SUCCESS, AgentError, log

RUN_DIR = "/run/hastore-mysql"
SERVER_NAMES = ("mariadbd", "mysqld")
CLIENT_NAMES = ("mariadb", "mysql")
INSTALL_DB_NAMES = ("mariadb-install-db", "mysql_install_db")
SEARCH_PATH = os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin") + ":/usr/sbin:/usr/local/sbin:/sbin"
DEFAULT_TIMEOUT = {"start": 120.0, "stop": 120.0, "monitor": 30.0}
INITIALIZE = ("auto", "yes", "no")
SUN_PATH_MAX = 107  # sockaddr_un.sun_path holds 108 bytes with the NUL
IGNORED_IN_EMPTY = {"lost+found"}  # what a fresh ext4 root holds; a datadir holding only this counts as empty


class Settings(namedtuple("Settings", "datadir binary client user socket pid cnf port bind_address config extra "
                                      "test_query test_user test_passwd initialize error_log")):
    # datadir: str
    # binary: str
    # client: str
    # user: str
    # socket: str
    # pid: str
    # cnf: str
    # port: int
    # bind_address: str
    # config: str
    # extra: tuple[str, ...]
    # test_query: str
    # test_user: str
    # test_passwd: str
    # initialize: str
    # error_log: str
    __slots__ = ()


def instance_id(datadir: str) -> str:
    """A short, stable name for the server of one datadir (node-local file names)."""
    return hashlib.sha256(os.path.normpath(os.path.abspath(datadir)).encode()).hexdigest()[:12]


def default_paths(datadir: str) -> tuple[str, str]:
    ident = instance_id(datadir)
    return f"{RUN_DIR}/{ident}.sock", f"{RUN_DIR}/{ident}.pid"


def which(name: str) -> str | None:
    if os.sep in name:
        return name if os.access(name, os.X_OK) else None
    return shutil.which(name, path=SEARCH_PATH)


def first_found(names: tuple[str, ...]) -> str | None:
    return next((p for p in map(which, names) if p), None)


def timeout_for(action: str, environ=None) -> float:
    """The operation's timeout in seconds: the runner's OCF_RESKEY_CRM_meta_timeout (ms), else the agent's."""
    environ = os.environ if environ is None else environ
    try:
        ms = int(environ.get("OCF_RESKEY_CRM_meta_timeout", ""))
    except ValueError:
        ms = 0
    return ms / 1000 if ms > 0 else DEFAULT_TIMEOUT.get(action, 20.0)


def settings(p: dict[str, str]) -> Settings:
    """Check the parameters whole; every problem is named in one AgentError (6, or 5 for missing programs)."""
    problems: list[str] = []
    datadir = p.get("datadir", "")
    for key, value in p.items():
        if any(c in value for c in "\n\r\0"):
            problems.append(f"{key} contains a line break or NUL")
    if not os.path.isabs(datadir):
        problems.append(f"datadir {datadir!r} is not an absolute path")
    sock_default, pid_default = default_paths(datadir)
    sock, pid = p.get("socket") or sock_default, p.get("pid") or pid_default
    for key, path in (("socket", sock), ("pid", pid), ("config", p.get("config", ""))):
        if path and not os.path.isabs(path):
            problems.append(f"{key} {path!r} is not an absolute path")
    if len(os.fsencode(sock)) > SUN_PATH_MAX:
        problems.append(f"socket {sock!r} is longer than the {SUN_PATH_MAX} bytes a Unix socket path may have")
    config = p.get("config", "")
    port = p.get("port", "3306")
    if not port.isdigit() or not 0 < int(port) < 65536:
        problems.append(f"port {port!r} is not a TCP port number")
    user = p.get("user", "mysql")
    try:
        pwd.getpwnam(user)
    except KeyError:
        problems.append(f"user {user!r} does not exist on this node")
    bind = p.get("bind_address", "0.0.0.0")
    if not bind or any(c.isspace() for c in bind):
        problems.append(f"bind_address {bind!r} is not an address")
    if not p.get("test_query", "").strip():
        problems.append("test_query is empty")
    initialize = p.get("initialize", "auto")
    if initialize not in INITIALIZE:
        problems.append(f"initialize {initialize!r} is not one of {', '.join(INITIALIZE)}")
    try:
        extra = tuple(shlex.split(p.get("additional_parameters", "")))
    except ValueError as e:
        problems.append(f"additional_parameters cannot be split: {e}")
        extra = ()
    if problems:
        raise AgentError(ERR_CONFIGURED, "; ".join(problems))
    binary = which(p["binary"]) if p.get("binary") else first_found(SERVER_NAMES)
    client = which(p["client"]) if p.get("client") else first_found(CLIENT_NAMES)
    if not binary or not client:
        missing = [f"server {p.get('binary') or ' or '.join(SERVER_NAMES)}" if not binary else "",
                   f"client {p.get('client') or ' or '.join(CLIENT_NAMES)}" if not client else ""]
        raise AgentError(ERR_INSTALLED, f"not installed on this node: {' and '.join(m for m in missing if m)} "
                                        f"(install mariadb-server and mariadb-client)")
    return Settings(
        datadir=os.path.normpath(datadir), binary=binary, client=client, user=user, socket=sock, pid=pid,
        cnf=pid.removesuffix(".pid") + ".cnf", port=int(port), bind_address=bind,
        config=config, extra=extra, test_query=p["test_query"], test_user=p.get("test_user", "root"),
        test_passwd=p.get("test_passwd", ""), initialize=initialize,
        error_log=os.path.join(os.path.normpath(datadir), f"{socket.gethostname()}.err"))


def check_files(s: Settings) -> None:
    """What start needs beyond settings (monitor and stop do without: the shared disk may be gone already)."""
    if s.config and not os.path.isfile(s.config):
        raise AgentError(ERR_CONFIGURED, f"config {s.config!r} is not a file")


def render_cnf(s: Settings) -> str:
    lines = [f"# written by hastore's mysql agent for datadir {s.datadir}; rewritten on every start"]
    if s.config:
        lines.append(f"!include {s.config}")
    lines += ["[mysqld]", f"datadir={s.datadir}", f"socket={s.socket}", f"pid-file={s.pid}", f"port={s.port}",
              f"bind-address={s.bind_address}", f"user={s.user}", f"log-error={s.error_log}"]
    return "\n".join(lines) + "\n"


# --- processes ---------------------------------------------------------------------------------------------------

def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (a zombie still answers kill(pid, 0))."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _same_mount_ns(pid: int) -> bool:
    """The server we start inherits our mount namespace. A server with the same command line in another one
    belongs to another node sharing this kernel (containers, the namespace lab): never ours to watch or stop."""
    try:
        return os.stat(f"/proc/{pid}/ns/mnt").st_ino == os.stat("/proc/self/ns/mnt").st_ino
    except OSError:
        return False


def is_ours(pid: int, s: Settings) -> bool:
    argv = _cmdline(pid)
    return (bool(argv) and os.path.basename(argv[0]) in {*SERVER_NAMES, os.path.basename(s.binary)}
            and f"--defaults-file={s.cnf}" in argv and alive(pid) and _same_mount_ns(pid))


def find_server(s: Settings) -> int | None:
    """The pid of this datadir's server: from the pid file if it names our server, else by its command line."""
    try:
        with open(s.pid) as f:
            pid = int(f.read().strip() or 0)
        if pid > 0 and is_ours(pid, s):
            return pid
    except (OSError, ValueError):
        pass
    for entry in os.listdir("/proc"):
        if entry.isdigit() and is_ours(int(entry), s):
            return int(entry)
    return None


def query(s: Settings, timeout: float) -> tuple[bool, str]:
    """Run test_query over the socket with the command-line client; (worked, what it said)."""
    env = dict(os.environ, MYSQL_PWD=s.test_passwd) if s.test_passwd else None
    argv = [s.client, "--no-defaults", f"--socket={s.socket}", f"--user={s.test_user}", "--batch",
            "--skip-column-names", f"--connect-timeout={max(1, int(timeout))}", "-e", s.test_query]
    try:
        r = subprocess.run(argv, check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return False, f"the test query did not answer within {timeout:g} s"
    text = (r.stderr or r.stdout).strip().splitlines()
    return r.returncode == 0, text[-1] if text else f"client exited {r.returncode}"


def _log_tail(s: Settings, n: int = 3) -> str:
    try:
        with open(s.error_log, errors="replace") as f:
            lines = [ln.strip() for ln in f.readlines()[-n:]]
        return " | ".join(ln for ln in lines if ln)
    except OSError:
        return "(no error log)"


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def clean_stale(s: Settings) -> None:
    """Only when no server of ours runs: a pid file or socket left by a killed server points at nothing."""
    for path in (s.pid, s.socket):
        if os.path.lexists(path):
            log(f"removing stale {path}")
            _remove(path)


# --- datadir ------------------------------------------------------------------------------------------------------

def datadir_state(s: Settings) -> str:
    """'empty', 'initialised', or raise 6: the agent never creates a database over files it does not know."""
    if not os.path.isdir(s.datadir):
        raise AgentError(ERR_CONFIGURED, f"datadir {s.datadir} does not exist or is not a directory "
                                         f"(is the shared filesystem mounted?)")
    entries = set(os.listdir(s.datadir)) - IGNORED_IN_EMPTY
    if not entries:
        return "empty"
    if os.path.isdir(os.path.join(s.datadir, "mysql")):
        return "initialised"
    raise AgentError(ERR_CONFIGURED, f"datadir {s.datadir} is not empty but holds no mysql/ system tables; "
                                     f"refusing to initialise over it or to start a server on it")


def may_initialise(s: Settings) -> str:
    """The install tool to initialise this empty datadir with, or raise why the agent must not."""
    if s.initialize == "no":
        raise AgentError(ERR_CONFIGURED, f"datadir {s.datadir} is empty and initialize=no")
    if s.initialize == "auto" and os.stat(s.datadir).st_dev == os.stat("/").st_dev:
        raise AgentError(ERR_CONFIGURED, f"datadir {s.datadir} is empty and on the root filesystem, not on a "
                                         f"mounted shared disk; refusing to create a new database there "
                                         f"(set initialize=yes to allow it)")
    tool = first_found(INSTALL_DB_NAMES)
    if not tool:
        raise AgentError(ERR_INSTALLED, f"datadir {s.datadir} is empty and neither "
                                        f"{' nor '.join(INSTALL_DB_NAMES)} is installed to initialise it")
    return tool


def initialise(s: Settings, tool: str, deadline: float) -> None:
    ent = pwd.getpwnam(s.user)
    os.chown(s.datadir, ent.pw_uid, ent.pw_gid)
    log(f"initialising the empty datadir {s.datadir} with {os.path.basename(tool)}")
    argv = [tool, f"--defaults-file={s.cnf}", f"--user={s.user}", "--auth-root-authentication-method=socket",
            "--skip-test-db"]
    try:
        r = subprocess.run(argv, check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd="/",
                           timeout=max(1.0, deadline - time.monotonic()))
        ok, said = r.returncode == 0, f"exit {r.returncode}"
    except subprocess.TimeoutExpired:
        ok, said = False, "timed out"
    if not ok or not os.path.isdir(os.path.join(s.datadir, "mysql")):
        said += f": {_log_tail(s, 2)}"  # the bootstrap server writes to log-error, which goes with the cleanup
        for entry in set(os.listdir(s.datadir)) - IGNORED_IN_EMPTY:  # it was empty: leave it empty for a retry
            path = os.path.join(s.datadir, entry)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        raise AgentError(ERR_GENERIC, f"initialising {s.datadir} failed ({said}); it is empty again")


# --- actions -----------------------------------------------------------------------------------------------------

def _ensure_dir(path: str, s: Settings) -> None:
    """Create a missing socket/pid directory owned by the server's user (it creates those files itself)."""
    if not os.path.isdir(path):
        os.makedirs(path, mode=0o755, exist_ok=True)
        ent = pwd.getpwnam(s.user)
        os.chown(path, ent.pw_uid, ent.pw_gid)


def write_cnf(s: Settings) -> None:
    for d in {os.path.dirname(s.socket), os.path.dirname(s.pid)}:
        _ensure_dir(d, s)
    tmp = f"{s.cnf}.tmp"
    with open(tmp, "w") as f:
        f.write(render_cnf(s))
    os.chmod(tmp, 0o644)
    os.replace(tmp, s.cnf)


def _has_socket(path: str) -> bool:
    """Whether the server has created its socket, which it does once it is ready for connections (start removes a
    stale one first). Not a connect: the server logs a warning for each connection that closes unauthenticated."""
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def _wait_ready(s: Settings, deadline: float, proc: subprocess.Popen | None = None) -> int:
    """Until the test query works. Whether the socket is there is looked at every 50 ms first: it costs nothing,
    where each query runs the client (tens of ms here, a second or more in an emulated guest, taken from a server
    that is still starting), and the server answers ~0.1 s sooner on average than with a query every 0.3 s."""
    while True:
        if proc is not None and proc.poll() is not None:
            raise AgentError(ERR_GENERIC, f"the server exited with {proc.returncode} while starting: {_log_tail(s)}")
        if _has_socket(s.socket):
            ok, said = query(s, min(5.0, max(1.0, deadline - time.monotonic())))
            if ok:
                return SUCCESS
            pause = 0.3
        else:
            said, pause = f"no socket {s.socket} yet", 0.05
        if time.monotonic() >= deadline:
            raise AgentError(ERR_GENERIC, f"the server did not answer the test query in time: {said}; "
                                          f"{_log_tail(s, 1)}")
        time.sleep(pause)


def start(s: Settings, timeout: float) -> int:
    deadline = time.monotonic() + timeout * 0.9  # answer before the runner's own timeout kills us
    if find_server(s) is not None:
        _wait_ready(s, deadline)
        log(f"already running on {s.datadir}")
        return SUCCESS
    check_files(s)
    tool = may_initialise(s) if datadir_state(s) == "empty" else None
    clean_stale(s)
    write_cnf(s)
    if tool:
        initialise(s, tool, deadline)
    ent = pwd.getpwnam(s.user)
    fd = os.open(s.error_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    os.fchown(fd, ent.pw_uid, ent.pw_gid)
    try:
        proc = subprocess.Popen([s.binary, f"--defaults-file={s.cnf}", *s.extra], stdin=subprocess.DEVNULL,
                                stdout=fd, stderr=fd, cwd="/", start_new_session=True, close_fds=True)
    finally:
        os.close(fd)
    _wait_ready(s, deadline, proc)
    log(f"started {os.path.basename(s.binary)} (pid {proc.pid}) on {s.datadir}, socket {s.socket}, port {s.port}")
    return SUCCESS


def monitor(s: Settings, timeout: float) -> int:
    pid = find_server(s)
    if pid is None:
        return NOT_RUNNING
    ok, said = query(s, max(1.0, min(timeout * 0.8, 30.0)))
    if ok:
        return SUCCESS
    raise AgentError(ERR_GENERIC, f"the server (pid {pid}) runs but the test query failed: {said}")


def _exited(pidfd: int, until: float) -> bool:
    """Wait until the process behind pidfd has exited (a pidfd turns readable then) or `until` passes."""
    return bool(select.select([pidfd], [], [], max(0.0, until - time.monotonic()))[0])


def stop(s: Settings, timeout: float) -> int:
    """TERM (a clean InnoDB shutdown) for most of the timeout, then KILL; done once the process is gone.

    Signals go through a pidfd taken before the final is-it-ours check, so a pid reused meanwhile is never hit.
    """
    now = time.monotonic()
    pid = find_server(s)
    pidfd = None
    if pid is not None:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            pidfd = None
    if pidfd is not None:
        try:
            if is_ours(pid, s):
                signal.pidfd_send_signal(pidfd, signal.SIGTERM)
                if not _exited(pidfd, now + timeout * 0.75):
                    log(f"the server (pid {pid}) ignored TERM for {timeout * 0.75:.0f} s; sending KILL")
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                    if not _exited(pidfd, now + timeout * 0.95):
                        raise AgentError(ERR_GENERIC, f"the server (pid {pid}) survived KILL")
                log(f"stopped the server (pid {pid}) on {s.datadir}")
        except ProcessLookupError:
            pass
        finally:
            os.close(pidfd)
    clean_stale(s)
    _remove(s.cnf)
    return SUCCESS
