"""The lab keeper: the process that owns a `hastore lab up` lab for as long as it stands.

`hastore lab up` starts ``python -m hastore.lab.keeper --dir DIR`` in a session of its own and waits for
its first line (``ready {...}`` or ``error ...``).  The keeper builds the namespace lab (hastore.lab.netns),
a shared disk, the per-node Heartbeat files and the two ``hastore run`` daemons, then serves requests on
``DIR/keeper.sock`` (one JSON object per line each way): ``status``, ``fault``, ``heal``, ``start``,
``down``.  Because it owns every process (the anchors die with it), a crashed keeper leaves nothing running;
``hastore lab down`` removes what is left on disk and in the kernel (namespaces, loop devices).

The shared disk is one sparse image file seen as two partitions (loop devices with --offset): a 1 MiB
lock area for the disklock lease, and an ext4 filesystem with MariaDB's datadir.  Both nodes see both
loop devices; only the lease holder mounts the filesystem (in its private mount namespace).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hastore.config.durations import parse_duration
from hastore.io.proc import start_ticks
from hastore.lab import netns
from hastore.lab.netns import Lab, LabError
from hastore.lab.pair import Pair, PairTiming

log = logging.getLogger("hastore.lab.keeper")

STATE_FILE = "lab.json"
SOCKET = "keeper.sock"
GROUP = "group1"
VIP = "10.90.0.100"
DB = {"user": "lab", "password": "lab", "database": "lab", "port": 3306}
IMAGE_MB = 400
LOCK_MB = 1
WAIT_MS = 8000
READY_TIMEOUT = 180.0
FAULTS = ("kill", "hang", "stop", "crash", "link-down", "loss", "heal", "start")


@dataclass(frozen=True)
class Options:
    keepalive: str = "200ms"
    warntime: str = "500ms"
    deadtime: str = "1s"
    initdead: str = "2s"
    auto_failback: str = "off"


def group_running_on(status: dict, node: str) -> bool:
    """From a node's `hastore status --json`: the group is held by node with every resource started."""
    g = status.get("groups", {}).get(GROUP)
    return bool(g) and g.get("owner") == node and g.get("state") == "started" and \
        all(r["state"] == "started" for r in g.get("resources", []))


def lease_timing(deadtime: str, keepalive: str) -> tuple[int, int]:
    """The disk lease and its renewal interval (ms), chosen so that a crashed holder's lease has run out, as the
    peer's observer sees it, by the time the heartbeat declares the holder dead: that is at least deadtime -
    keepalive after the crash (its last beat came at most a keepalive before), and the lease runs out at most
    lease + renew/2 after it (last renewed before the crash, the change seen up to renew/2 late).  So the takeover
    waits only the acquirer's settle (renew/2).  The renewal is an eighth of deadtime - keepalive (at least 50 ms,
    so that settle and gap limit stay above scheduling noise); the lease at least 600 ms (a renewer can miss
    renewals: it gives up only when it could not renew for lease - renew/2)."""
    dead, beat = parse_duration(deadtime), parse_duration(keepalive)
    renew = max((dead - beat) // 8, 50)
    lease = max(dead - beat - (renew + 1) // 2, 600)
    return lease, renew


def haresources_line(d: Path, lock: str, data: str, first: str, lease: tuple[int, int]) -> str:
    mnt = d / "data"
    return (f"{first} disklock::{lock}::{lease[0]}::{WAIT_MS}::{lease[1]} Filesystem::{data}::{mnt}::ext4 "
            f"IPaddr::{VIP}/24 mysql::{mnt}/mysql::--host-cache-size=0")  # probes are not connect errors


class Keeper:
    def __init__(self, d: Path, opts: Options, prefix: str, owner: tuple[int, int | None] | None = None):
        self.d, self.opts, self.prefix = d, opts, prefix
        self.owner = owner  # (pid, start time): tear the lab down when that process is gone (test runs)
        self.lab: Lab | None = None
        self.pair: Pair | None = None
        self.loops: dict[str, str] = {}
        self.crashed: set[str] = set()
        self.faults: dict[str, list[str]] = {}
        self.stopping = False

    # ------------------------------------------------------------------ build
    def build(self) -> dict:
        self.lab = Lab(prefix=self.prefix, workdir=self.d / "work")
        self.lab.start()
        self._shared_disk()
        first = sorted(self.lab.nodes)[0]
        resources = haresources_line(self.d, self.loops["lock"], self.loops["data"], first,
                                     lease_timing(self.opts.deadtime, self.opts.keepalive)).split(" ", 1)[1]
        timing = PairTiming(self.opts.keepalive, self.opts.warntime, self.opts.deadtime, self.opts.initdead)
        self.pair = Pair(self.lab, timing, resources=resources, auto_failback=self.opts.auto_failback)
        self.pair.start_all()
        self.pair.wait_for(first, lambda s: group_running_on(s, first), timeout=READY_TIMEOUT, interval=0.2)
        self._init_database(first)
        info = self.describe()
        tmp = self.d / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(info, indent=1))
        os.replace(tmp, self.d / STATE_FILE)
        return info

    def _shared_disk(self) -> None:
        img = self.d / "shared.img"
        with open(img, "wb") as f:
            f.truncate(IMAGE_MB << 20)
        for name, args in (("lock", ["--offset", "0", "--sizelimit", str(LOCK_MB << 20)]),
                           ("data", ["--offset", str(LOCK_MB << 20)])):
            out = _check(["losetup", "-f", "--show", *args, str(img)])
            self.loops[name] = out.strip()
            self._save_loops()
        _check(["mkfs.ext4", "-q", "-F", "-L", "hastore-lab", self.loops["data"]])
        (self.d / "data").mkdir(exist_ok=True)
        # Prepare an empty, mysql-owned datadir; the mysql agent creates the database on first start.
        _check(["unshare", "--mount", "--propagation", "private", "sh", "-ec",
                'mount "$1" "$2"; mkdir -p "$2/mysql"; chown mysql:mysql "$2/mysql"; umount "$2"', "prep",
                self.loops["data"], str(self.d / "data")])

    def _save_loops(self) -> None:
        (self.d / "loops.json").write_text(json.dumps(self.loops))

    def _init_database(self, node: str) -> None:
        sql = (f"CREATE DATABASE IF NOT EXISTS {DB['database']}; "
               f"CREATE USER IF NOT EXISTS '{DB['user']}'@'%' IDENTIFIED BY '{DB['password']}'; "
               f"GRANT ALL ON {DB['database']}.* TO '{DB['user']}'@'%'; "
               f"CREATE TABLE IF NOT EXISTS {DB['database']}.writes (id INT PRIMARY KEY, node VARCHAR(64), "
               f"t DOUBLE)")
        r = self.lab.nodes[node].run(["sh", "-c", 'exec mariadb -S "$(ls /run/hastore-mysql/*.sock | head -1)" '
                                      '-e "$1"', "sql", sql])
        if r.returncode != 0:
            raise LabError(f"cannot create the lab database on {node}: {r.stderr.strip()}")

    def describe(self) -> dict:
        lab = self.lab
        return {
            "prefix": self.prefix, "dir": str(self.d), "keeper_pid": os.getpid(),
            "keeper_start": start_ticks(os.getpid()), "lan_ns": lab.lan_ns, "vip": VIP, "group": GROUP,
            "gateway": lab.gateway, "db": DB, "loops": self.loops, "image": str(self.d / "shared.img"),
            "mount": str(self.d / "data"), "options": asdict(self.opts),
            "nodes": {n.name: {"anchor_pid": n.anchor_pid, "netns": n.netns, "lan_if": n.lan_if,
                               "lan_addr": n.lan_addr, "hb_if": n.hb_if, "hb_addr": n.hb_addr,
                               "mac": _mac(n), "serial": n.serial,
                               "log": str(lab.workdir / n.name / "hastore.log"),
                               "config": str(lab.workdir / n.name / "ha.d")}
                      for n in lab.nodes.values()},
        }

    # ------------------------------------------------------------------ requests
    def handle(self, req: dict) -> dict:
        cmd = req.get("cmd")
        try:
            if cmd == "status":
                return {"ok": True, "status": self.status()}
            if cmd == "holds":  # cheap: the kernel's view only, for audits sampling many times a second
                return {"ok": True, "t": time.monotonic(), "holds": {n: self.holds(n) for n in self.lab.nodes}}
            if cmd in FAULTS:
                node = req.get("node")
                if node not in self.lab.nodes:
                    return {"ok": False, "error": f"no node {node!r}; nodes: {', '.join(self.lab.nodes)}"}
                t = self.fault(node, cmd, list(req.get("args", [])))
                return {"ok": True, "t": t, "detail": f"{cmd} {node} {' '.join(req.get('args', []))}".strip()}
            if cmd == "down":
                self.stopping = True
                return {"ok": True}
            return {"ok": False, "error": f"unknown command {cmd!r}; known: status, down, " + ", ".join(FAULTS)}
        except (LabError, ValueError, subprocess.SubprocessError, OSError) as e:
            return {"ok": False, "error": f"{cmd}: {e}"}

    def fault(self, name: str, kind: str, args: list[str]) -> float:
        """Inject a fault (or undo them: heal/start); returns the CLOCK_MONOTONIC time it took effect."""
        lab, node = self.lab, self.lab.nodes[name]
        proc = self.pair.procs.get(name)
        running = proc is not None and proc.poll() is None
        t = time.monotonic()
        if kind in ("kill", "hang", "stop"):
            if not running:
                raise LabError(f"{name}: the daemon is not running")
            t = time.monotonic()
            proc.send_signal({"kill": signal.SIGKILL, "hang": signal.SIGSTOP, "stop": signal.SIGTERM}[kind])
        elif kind == "crash":
            t = self._crash(name)
        elif kind == "link-down":
            which = _one(args, ("hb", "serial", "lan"), "link-down needs hb, serial or lan")
            t = time.monotonic()
            lab.serial_down() if which == "serial" else lab.link_down(node, which)
        elif kind == "loss":
            if not args:
                raise ValueError("loss needs PERCENT [hb|lan]")
            percent = int(args[0].rstrip("%"))
            which = args[1] if len(args) > 1 else "hb"
            if which not in ("hb", "lan"):
                raise ValueError(f"loss applies to hb or lan, not {which!r}")
            t = time.monotonic()
            lab.loss(node, which, percent)
        elif kind == "heal":
            self._heal(name)
            t = time.monotonic()
        elif kind == "start":
            if running:
                raise LabError(f"{name}: the daemon is already running (pid {proc.pid})")
            t = time.monotonic()
            self.pair.start(name)
        self.faults.setdefault(name, []).append(" ".join([kind, *args]))
        if kind in ("heal",):
            self.faults[name] = []
        log.info("%s %s %s at %.3f", kind, name, " ".join(args), t)
        return t

    def _crash(self, name: str) -> float:
        """Like a power cut: every process of the node dies, its mounts and addresses are gone."""
        node = self.lab.nodes[name]
        t = time.monotonic()
        victims = {p for p in netns._pids_in_netns(node.netns) if p != node.anchor_pid}
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        netns._kill_pids(victims, grace=0)
        proc = self.pair.procs.get(name)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        script = (f'umount -l "{self.d / "data"}" 2>/dev/null || true; '
                  'find /run -mindepth 1 -maxdepth 1 ! -name lock -exec rm -rf {} +; '
                  f'ip addr flush dev {node.lan_if}; ip addr flush dev {node.hb_if}; '
                  f'ip link set {node.lan_if} down; ip link set {node.hb_if} down')
        r = node.run(["sh", "-c", script])
        if r.returncode != 0:
            raise LabError(f"crash {name}: {r.stderr.strip()}")
        self.crashed.add(name)
        return t

    def _heal(self, name: str) -> None:
        lab, node = self.lab, self.lab.nodes[name]
        proc = self.pair.procs.get(name)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
        lab.heal(node)
        if name in self.crashed:
            r = node.run(["ip", "-batch", "-"], input="\n".join([
                f"addr add {node.lan_addr}/24 dev {node.lan_if}",
                f"addr add {node.lan_addr6}/64 dev {node.lan_if} nodad",
                f"addr add {node.hb_addr}/24 dev {node.hb_if}",
                f"addr add {node.hb_addr6}/64 dev {node.hb_if} nodad"]) + "\n")
            if r.returncode != 0:
                raise LabError(f"heal {name}: cannot restore addresses: {r.stderr.strip()}")
            self.crashed.discard(name)
        lab.link_up(node, "hb")
        lab.link_up(node, "lan")
        lab.serial_up()
        if proc is None or proc.poll() is not None:
            self.pair.start(name)

    def status(self) -> dict:
        nodes = {}
        for name, node in self.lab.nodes.items():
            proc = self.pair.procs.get(name)
            if proc is None:
                daemon = "not started"
            elif proc.poll() is not None:
                daemon = f"exited {proc.returncode}"
            else:
                daemon = "frozen (SIGSTOP)" if _proc_state(proc.pid) == "T" else "running"
            st = self.pair.status(name) if daemon == "running" else None
            nodes[name] = {
                "daemon": daemon, "pid": proc.pid if proc else None, "crashed": name in self.crashed,
                "faults": self.faults.get(name, []),
                "holds": self.holds(name),
                "peer_alive": None if st is None else all(p["alive"] for p in st["peers"].values()),
                "group": None if st is None else st["groups"].get(GROUP),
            }
        return {"prefix": self.prefix, "dir": str(self.d), "vip": VIP, "nodes": nodes}

    def holds(self, name: str) -> dict:
        """What of the group this node holds right now, seen from the kernel (not from hastore)."""
        node = self.lab.nodes[name]
        mnt = str(self.d / "data")
        try:
            with open(f"/proc/{node.anchor_pid}/mountinfo") as f:
                mounted = any(line.split()[4] == mnt for line in f)
        except OSError:
            mounted = False
        addrs = node.run(["ip", "-o", "-4", "addr", "show", "dev", node.lan_if]).stdout
        comms = set()
        for pid in netns._pids_in_netns(node.netns):
            with contextlib.suppress(OSError):
                comms.add(Path(f"/proc/{pid}/comm").read_text().strip())
        return {"vip": f" {VIP}/" in addrs, "mount": mounted, "mysqld": bool(comms & {"mariadbd", "mysqld"})}

    # ------------------------------------------------------------------ teardown
    def down(self) -> None:
        errors = []
        if self.pair is not None:
            for name, proc in self.pair.procs.items():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGCONT)
                    proc.terminate()
            for name, proc in self.pair.procs.items():
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    errors.append(f"{name}: the daemon did not stop within 60 s; killed")
            self.pair.stop_all()
        if self.lab is not None:
            try:
                self.lab.teardown()
            except LabError as e:
                errors.append(str(e))
        self.pair, self.lab = None, None
        detach_loops(self.d)
        if errors:
            log.error("down: %s", "; ".join(errors))


def detach_loops(d: Path) -> list[str]:
    """Detach every loop device backed by DIR/shared.img (also after a crash of the keeper)."""
    img = d / "shared.img"
    if not img.exists():
        return []
    out = subprocess.run(["losetup", "-j", str(img)], capture_output=True, text=True).stdout
    devs = [line.split(":", 1)[0] for line in out.splitlines() if line.strip()]
    for dev in devs:
        subprocess.run(["losetup", "-d", dev], capture_output=True)
    return devs


def _one(args: list[str], allowed: tuple[str, ...], msg: str) -> str:
    if len(args) != 1 or args[0] not in allowed:
        raise ValueError(msg)
    return args[0]


def _mac(node) -> str:
    r = node.run(["cat", f"/sys/class/net/{node.lan_if}/address"])
    return r.stdout.strip()


def _proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _check(argv: list[str]) -> str:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {r.stderr.strip() or f'exit {r.returncode}'}")
    return r.stdout


# ---------------------------------------------------------------------- the keeper process
def listen(d: Path) -> socket.socket:
    """The keeper's control socket, listening before `ready` is printed: a client told the lab is up connects."""
    path = d / SOCKET
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    os.chmod(path, 0o600)
    srv.listen(8)
    srv.settimeout(0.5)
    return srv


def serve(keeper: Keeper, srv: socket.socket) -> None:
    signal.signal(signal.SIGTERM, lambda *_: setattr(keeper, "stopping", True))
    signal.signal(signal.SIGINT, lambda *_: setattr(keeper, "stopping", True))
    try:
        while not keeper.stopping:
            if keeper.owner and start_ticks(keeper.owner[0]) != keeper.owner[1]:
                log.warning("owner process %d is gone: taking the lab down", keeper.owner[0])
                break
            try:
                conn, _ = srv.accept()
            except (TimeoutError, socket.timeout):
                continue
            except InterruptedError:
                continue
            with conn:
                conn.settimeout(30)
                try:
                    line = conn.makefile("rb").readline()
                    req = json.loads(line or b"{}")
                    resp = keeper.handle(req) if isinstance(req, dict) else {"ok": False, "error": "bad request"}
                except (OSError, ValueError) as e:
                    resp = {"ok": False, "error": f"bad request: {e}"}
                if resp.get("ok") and req.get("cmd") == "down":
                    keeper.down()
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps(resp).encode() + b"\n")
    finally:
        srv.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        keeper.down()  # idempotent: after `down`, on SIGTERM, or on an unexpected error


def request(d: Path, req: dict, timeout: float = 120.0) -> dict:
    """Send one request to the keeper of the lab in DIR and return its answer."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(d / SOCKET))
        s.sendall(json.dumps(req).encode() + b"\n")
        data = s.makefile("rb").readline()
    finally:
        s.close()
    if not data:
        raise LabError(f"the lab keeper in {d} closed the connection without answering")
    return json.loads(data)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hastore.lab.keeper")
    ap.add_argument("--dir", required=True)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--owner-pid", type=int, help="take the lab down when this process exits")
    for f in ("keepalive", "warntime", "deadtime", "initdead", "auto_failback"):
        ap.add_argument(f"--{f.replace('_', '-')}", default=getattr(Options, f))
    a = ap.parse_args(argv)
    d = Path(a.dir)
    logging.basicConfig(filename=str(d / "keeper.log"), level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    opts = Options(a.keepalive, a.warntime, a.deadtime, a.initdead, a.auto_failback)
    owner = (a.owner_pid, start_ticks(a.owner_pid)) if a.owner_pid else None
    keeper = Keeper(d, opts, a.prefix, owner)
    try:
        info = keeper.build()
        srv = listen(d)
    except BaseException as e:  # noqa: BLE001 - report anything to `lab up`, then clean up
        log.exception("lab up failed")
        print(f"error {e}", flush=True)
        keeper.down()
        return 1
    print("ready " + json.dumps(info), flush=True)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    serve(keeper, srv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
