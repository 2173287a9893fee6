"""A two-node lab on one machine, built from network namespaces.

Topology (all of it inside namespaces; nothing is added to the host's own namespace)::

                 LAN namespace  <prefix>-lan
           bridge <prefix>br  10.90.0.254/24  fd90::fe/64   (the gateway and ping node)
              |  <prefix>p0                  <prefix>p1  |
              |                                          |
     <prefix>l0  10.90.0.1                  10.90.0.2  <prefix>l1
     node alpha  (<prefix>-alpha)           node bravo  (<prefix>-bravo)
     <prefix>h0  10.91.0.1 fd91::1 ------ fd91::2 10.91.0.2  <prefix>h1   (heartbeat cable)
     WORKDIR/alpha.tty  <====== socat pty pair ======>  WORKDIR/bravo.tty  (serial line)

Each node has an anchor process (``sleep infinity`` renamed ``hastore-lab:<prefix>:anchor:<node>``)
living in the node's network namespace with its own UTS namespace (hostname = node name) and its own
mount namespace (fresh tmpfs on /run, /etc/hosts listing the lab).  ``Node.run``/``Node.popen`` enter
those three namespaces with nsenter.  Node processes still share the host's PID namespace.

Robustness rules this module keeps:
- Only what a lab created is ever removed by its teardown; teardown is idempotent, runs after a
  partial setup, at interpreter exit and on SIGTERM/SIGHUP (then the process dies of that signal).
- Every lab is recorded in /run/hastore-lab/<prefix>.json (owner pid + start time) before it creates
  anything, so ``cleanup_stale`` can remove leftovers of crashed runs without touching labs whose
  owner is still alive (other engineers' test runs on the same machine).
- Anchors and socat get PR_SET_PDEATHSIG (via setpriv) so a SIGKILLed owner leaves no processes.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fnmatch
import hashlib
import itertools
import json
import logging
import os
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from hastore.io.proc import start_ticks

log = logging.getLogger(__name__)

LAN_NET, LAN_NET6 = "10.90.0.0/24", "fd90::/64"
HB_NET, HB_NET6 = "10.91.0.0/24", "fd91::/64"
GATEWAY, GATEWAY6 = "10.90.0.254", "fd90::fe"
REGISTRY = Path("/run/hastore-lab")
MARKER = "hastore-lab"            # argv[0] of anchors and socat: hastore-lab:<prefix>:<role>
NFT_TABLE = "hastore_lab"
TOOLS = ("ip", "nft", "nsenter", "unshare", "socat", "setpriv", "bash")
SETUP_TIMEOUT = 10.0

Which = Literal["hb", "lan"]

_PREFIX_RE = re.compile(r"[a-z][a-z0-9]{0,12}")        # + 2-char suffix <= 15 (IFNAMSIZ - 1)
_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def _base36(n: int, width: int) -> str:
    digits = []
    for _ in range(width):
        n, d = divmod(n, 36)
        digits.append(_B36[d])
    return "".join(reversed(digits))


def default_prefix() -> str:
    """``hs`` + pid (4 base-36 digits) + sequence (2): always 8 characters, so an interface
    name (prefix + 2) leaves room for a ``:label`` alias (a label holds 15 characters)."""
    return f"hs{_base36(os.getpid(), 4)}{_base36(next(_seq), 2)}"
_NODE_RE = re.compile(r"[a-z][a-z0-9-]{0,30}")
_seq = itertools.count()

# Each node's namespaces get these before any interface exists, so new interfaces inherit them:
# no IPv6 duplicate address detection (addresses usable at once) and static IPv6 addresses kept
# across link down/up (link_up restores the link exactly as it was).
_SYSCTLS = (
    "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0",
    "net.ipv6.conf.all.keep_addr_on_down=1", "net.ipv6.conf.default.keep_addr_on_down=1",
)

# Runs as the anchor: own hostname, own /run, lab /etc/hosts, then sleep under a findable name.
_ANCHOR_SCRIPT = """set -e
hostname "$1"
mount -t tmpfs -o mode=0755,size=64m hastore-run /run
mkdir -m 1777 /run/lock
mount --bind "$2" /etc/hosts
echo ready
exec -a "$3" sleep infinity </dev/null >/dev/null
"""


class LabError(RuntimeError):
    """The lab could not be built or torn down; the message says which step and why."""


@dataclass
class Node:
    name: str
    netns: str
    anchor_pid: int
    hb_if: str
    hb_addr: str          # bare address, prefix length in HB_NET
    hb_addr6: str
    lan_if: str
    lan_addr: str         # bare address, prefix length in LAN_NET
    lan_addr6: str
    serial: str
    _track: Callable[[subprocess.Popen], None] | None = field(default=None, repr=False, compare=False)

    def command(self, argv: Sequence[str] | str, cwd: str | os.PathLike | None = None) -> list[str]:
        """The nsenter command line that runs argv inside this node (cwd kept, default: ours)."""
        wd = os.fspath(cwd) if cwd is not None else os.getcwd()
        if cwd is None and (wd == "/run" or wd.startswith("/run/")):
            wd = "/"    # the node's /run is its own tmpfs; our cwd there does not exist inside
        return ["nsenter", "-t", str(self.anchor_pid), "-n", "-m", "-u", f"--wd={wd}", "--",
                *_argv(argv)]

    def run(self, argv: Sequence[str] | str, **kw: Any) -> subprocess.CompletedProcess:
        """subprocess.run inside the node; defaults: capture_output, text, timeout 60 s."""
        kw.setdefault("timeout", 60)
        if not any(k in kw for k in ("stdout", "stderr", "capture_output")):
            kw["capture_output"] = True
        kw.setdefault("text", True)
        return subprocess.run(self.command(argv, kw.pop("cwd", None)), **kw)

    def popen(self, argv: Sequence[str] | str, **kw: Any) -> subprocess.Popen:
        """subprocess.Popen inside the node; the lab terminates it at teardown."""
        proc = subprocess.Popen(self.command(argv, kw.pop("cwd", None)), **kw)
        if self._track is not None:
            self._track(proc)
        return proc


class Lab:
    """Context manager: ``with Lab() as lab: lab.nodes["alpha"].run("hostname")``."""

    def __init__(self, prefix: str | None = None, nodes: Sequence[str] = ("alpha", "bravo"),
                 workdir: Path | str | None = None) -> None:
        self.prefix = prefix or default_prefix()
        if not _PREFIX_RE.fullmatch(self.prefix):
            raise ValueError(f"lab prefix {self.prefix!r} must match {_PREFIX_RE.pattern}")
        names = tuple(nodes)
        if (len(names) != 2 or len(set(names)) != 2 or "lan" in names
                or not all(_NODE_RE.fullmatch(n) for n in names)):
            raise ValueError(f"a lab has exactly two distinct node names matching "
                             f"{_NODE_RE.pattern} other than 'lan', got {names!r}")
        if workdir is not None:
            _check_workdir(Path(workdir))
        self._node_names = names
        self.workdir: Path | None = Path(workdir) if workdir is not None else None
        self.lan_ns = f"{self.prefix}-lan"
        self.bridge = f"{self.prefix}br"
        self.gateway, self.gateway6 = GATEWAY, GATEWAY6
        self.nodes: dict[str, Node] = {}
        self._netns_made: list[str] = []
        self._workdir_made = False
        self._anchors: list[subprocess.Popen] = []
        self._socat: subprocess.Popen | None = None
        self._children: list[subprocess.Popen] = []
        self._loss: dict[tuple[str, str], int] = {}
        self._recorded = False
        self._started = False
        self._lock = threading.RLock()

    # ----------------------------------------------------------------- lifecycle
    def __enter__(self) -> Lab:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.teardown()
        except LabError:
            if exc_type is None:
                raise
            log.exception("lab %s: teardown failed while handling %s", self.prefix, exc_type)

    def start(self) -> Lab:
        """Build the whole lab; on any failure (or KeyboardInterrupt) everything built is removed."""
        with self._lock:
            if self._started:
                raise LabError(f"lab {self.prefix} already started")
            self._started = True
            _install_exit_hooks()
            _LIVE.add(self)
            try:
                self._build()
            except BaseException:
                with contextlib.suppress(Exception):
                    self.teardown()
                raise
        return self

    def _build(self) -> None:
        _require_tools()
        names = [self.lan_ns] + [f"{self.prefix}-{n}" for n in self._node_names]
        if set(names) & set(_list_netns()) or (REGISTRY / f"{self.prefix}.json").exists():
            # Pids repeat across CI runs, so a crashed run may have left this very prefix behind.
            cleanup_stale(self.prefix)
        taken = sorted(set(names) & set(_list_netns()))
        if taken or (REGISTRY / f"{self.prefix}.json").exists():
            raise LabError(f"lab {self.prefix}: already in use by a live process "
                           f"({', '.join(taken) or 'registry record'})")
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"{MARKER}-{self.prefix}-"))
            self._workdir_made = True
        else:
            self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_record(names)
        for ns in names:
            _ip(["netns", "add", ns])
            self._netns_made.append(ns)
            _ip(["netns", "exec", ns, "sysctl", "-q", "-w", *_SYSCTLS])
        self._define_nodes()
        self._wire()
        self._start_anchors()
        self.serial_up()

    def _define_nodes(self) -> None:
        assert self.workdir is not None
        for i, name in enumerate(self._node_names):
            self.nodes[name] = Node(
                name=name, netns=f"{self.prefix}-{name}", anchor_pid=0,
                hb_if=f"{self.prefix}h{i}", hb_addr=f"10.91.0.{i + 1}", hb_addr6=f"fd91::{i + 1}",
                lan_if=f"{self.prefix}l{i}", lan_addr=f"10.90.0.{i + 1}", lan_addr6=f"fd90::{i + 1}",
                serial=str(self.workdir / f"{name}.tty"), _track=self._track)

    def _wire(self) -> None:
        a, b = self.nodes.values()
        # Distinct ifindexes on the two ends of each veth: the kernel handles carrier changes of
        # a device whose ifindex equals its peer's (iflink) lazily, up to 1 s late, which would
        # drop or delay the first packets after setup and after every link_up.
        links = [f"link add {self.bridge} netns {self.lan_ns} index 40 type bridge"
                 f" forward_delay 0 mcast_snooping 0",
                 f"link add {a.hb_if} netns {a.netns} index 10 type veth"
                 f" peer name {b.hb_if} netns {b.netns} index 11"]
        lan = ["link set lo up", f"link set {self.bridge} up",
               f"addr add {GATEWAY}/24 dev {self.bridge}",
               f"addr add {GATEWAY6}/64 dev {self.bridge} nodad"]
        for i, node in enumerate(self.nodes.values()):
            port = f"{self.prefix}p{i}"
            links.append(f"link add {node.lan_if} netns {node.netns} index {20 + i} type veth"
                         f" peer name {port} netns {self.lan_ns} index {30 + i}")
            lan.append(f"link set {port} master {self.bridge} up")
        _ip(["-batch", "-"], stdin="\n".join(links))
        _ip(["-n", self.lan_ns, "-batch", "-"], stdin="\n".join(lan))
        for node in self.nodes.values():
            _ip(["-n", node.netns, "-batch", "-"], stdin="\n".join([
                "link set lo up",
                f"addr add {node.lan_addr}/24 dev {node.lan_if}",
                f"addr add {node.lan_addr6}/64 dev {node.lan_if} nodad",
                f"addr add {node.hb_addr}/24 dev {node.hb_if}",
                f"addr add {node.hb_addr6}/64 dev {node.hb_if} nodad",
                f"link set {node.lan_if} up", f"link set {node.hb_if} up"]))
        ends = [(self.lan_ns, f"{self.prefix}p{i}") for i in range(len(self.nodes))]
        for node in self.nodes.values():
            ends += [(node.netns, node.lan_if), (node.netns, node.hb_if)]
        _await_operstate(ends, "UP")

    def _start_anchors(self) -> None:
        assert self.workdir is not None
        hosts = self.workdir / "hosts"
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
                 f"{GATEWAY}\tgateway", f"{GATEWAY6}\tgateway"]
        for n in self.nodes.values():
            lines += [f"{n.lan_addr}\t{n.name}", f"{n.lan_addr6}\t{n.name}",
                      f"{n.hb_addr}\t{n.name}-hb", f"{n.hb_addr6}\t{n.name}-hb"]
        hosts.write_text("\n".join(lines) + "\n")
        sel = selectors.DefaultSelector()
        for node in self.nodes.values():
            marker = f"{MARKER}:{self.prefix}:anchor:{node.name}"
            argv = [*_pdeathsig(), "ip", "netns", "exec", node.netns,
                    "unshare", "--uts", "--mount", "--propagation", "private",
                    "bash", "-c", _ANCHOR_SCRIPT, "anchor", node.name, str(hosts), marker]
            with open(self.workdir / f"{node.name}.anchor.log", "ab") as err:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=err, cwd="/", close_fds=True)
            self._anchors.append(proc)
            node.anchor_pid = proc.pid
            sel.register(proc.stdout, selectors.EVENT_READ, node)
        try:
            self._await_anchors(sel)
        finally:
            for key in list(sel.get_map().values()):
                key.fileobj.close()
            sel.close()

    def _await_anchors(self, sel: selectors.BaseSelector) -> None:
        assert self.workdir is not None
        out: dict[str, bytes] = {}
        deadline = time.monotonic() + SETUP_TIMEOUT
        while sel.get_map():
            left = deadline - time.monotonic()
            events = sel.select(max(left, 0)) if left > 0 else []
            if not events:
                raise LabError(f"lab {self.prefix}: anchors not ready within {SETUP_TIMEOUT} s")
            for key, _ in events:
                node = key.data
                chunk = os.read(key.fileobj.fileno(), 256)
                out[node.name] = out.get(node.name, b"") + chunk
                if chunk:
                    continue
                sel.unregister(key.fileobj)
                key.fileobj.close()
                if out[node.name].strip() != b"ready":
                    errlog = (self.workdir / f"{node.name}.anchor.log").read_text(errors="replace")
                    raise LabError(f"lab {self.prefix}: anchor of {node.name} failed: "
                                   f"{errlog.strip()[-500:] or 'no output'}")

    # ----------------------------------------------------------------- faults
    def link_down(self, node: Node | str, which: Which) -> None:
        """Take the node's own end of its hb or lan link down (the peer sees carrier loss)."""
        n = self._node(node)
        _ip(["-n", n.netns, "link", "set", self._ifname(n, which), "down"])

    def link_up(self, node: Node | str, which: Which) -> None:
        """Undo link_down; addresses (v4 and v6) and their routes come back by themselves."""
        n = self._node(node)
        dev = self._ifname(n, which)
        _ip(["-n", n.netns, "link", "set", dev, "up"])
        if which == "hb":
            peer = self.peer(n)
            if _admin_up(peer.netns, peer.hb_if):
                _await_operstate([(n.netns, dev), (peer.netns, peer.hb_if)], "UP")
            # else: the cable is still down at the peer's end; ours gets carrier when that one comes up
        else:
            _await_operstate([(n.netns, dev)], "UP")

    def loss(self, node: Node | str, which: Which, percent: int) -> None:
        """Drop percent % of IP packets entering and leaving the node on that link (100 = cut).

        ARP is not filtered (nftables' inet family does not see it); IPv6 neighbour discovery is.
        Setting a link again replaces its previous rate; 0 removes it.
        """
        n = self._node(node)
        if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100:
            raise ValueError(f"loss percent must be an int in 0..100, got {percent!r}")
        self._ifname(n, which)
        with self._lock:
            self._loss[(n.name, which)] = percent
            if not any(v for (name, _), v in self._loss.items() if name == n.name):
                self.heal(n)
                return
            _nft(n.netns, self._ruleset(n))

    def heal(self, node: Node | str) -> None:
        """Remove every nftables rule loss() put in this node."""
        n = self._node(node)
        with self._lock:
            for key in [k for k in self._loss if k[0] == n.name]:
                del self._loss[key]
            _nft(n.netns, f"table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n")

    def _ruleset(self, n: Node) -> str:
        rules_in, rules_out = [], []
        for (name, which), pct in sorted(self._loss.items()):
            if name != n.name or pct == 0:
                continue
            dev = self._ifname(n, which)
            cond = "" if pct == 100 else f"numgen random mod 100 < {pct} "
            rules_in.append(f'    iifname "{dev}" {cond}counter drop')
            rules_out.append(f'    oifname "{dev}" {cond}counter drop')
        head = "    type filter hook {} priority -300; policy accept;"
        return "\n".join([
            # Declaring then deleting the table makes the replacement one atomic transaction.
            f"table inet {NFT_TABLE}", f"delete table inet {NFT_TABLE}",
            f"table inet {NFT_TABLE} {{", "  chain input {", head.format("input"), *rules_in,
            "  }", "  chain output {", head.format("output"), *rules_out, "  }", "}", ""])

    def serial_down(self) -> None:
        """Stop the serial line: open ends see a hang-up; the link paths disappear."""
        with self._lock:
            proc, self._socat = self._socat, None
            if proc is not None:
                _stop_popen(proc, grace=1.0)
            for node in self.nodes.values():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(node.serial)

    def serial_up(self) -> None:
        """(Re)start the serial line with the same link paths; a no-op while it runs."""
        with self._lock:
            if self._socat is not None and self._socat.poll() is None:
                return
            self.serial_down()
            assert self.workdir is not None
            a, b = self.nodes.values()
            argv = [*_pdeathsig(), "bash", "-c", 'exec -a "$0" "$@"',
                    f"{MARKER}:{self.prefix}:socat", "socat", "-d", "-d",
                    f"pty,raw,echo=0,link={a.serial}", f"pty,raw,echo=0,link={b.serial}"]
            logpath = self.workdir / "socat.log"
            with open(logpath, "ab") as err:
                self._socat = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                               stdout=subprocess.DEVNULL, stderr=err, cwd="/")
            deadline = time.monotonic() + SETUP_TIMEOUT
            while not (os.path.islink(a.serial) and os.path.islink(b.serial)):
                if self._socat.poll() is not None or time.monotonic() > deadline:
                    self.serial_down()
                    raise LabError(f"lab {self.prefix}: socat did not create the serial links: "
                                   f"{logpath.read_text(errors='replace').strip()[-500:]}")
                time.sleep(0.005)

    # ----------------------------------------------------------------- helpers for tests
    def lan_run(self, argv: Sequence[str] | str, **kw: Any) -> subprocess.CompletedProcess:
        """subprocess.run in the LAN namespace (the gateway / client side)."""
        kw.setdefault("timeout", 60)
        if not any(k in kw for k in ("stdout", "stderr", "capture_output")):
            kw["capture_output"] = True
        kw.setdefault("text", True)
        return subprocess.run(["ip", "netns", "exec", self.lan_ns, *_argv(argv)], **kw)

    def lan_popen(self, argv: Sequence[str] | str, **kw: Any) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", self.lan_ns, *_argv(argv)], **kw)
        self._track(proc)
        return proc

    def peer(self, node: Node | str) -> Node:
        name = self._node(node).name
        return next(n for n in self.nodes.values() if n.name != name)

    def _track(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._children = [p for p in self._children if p.poll() is None]
            self._children.append(proc)

    def _node(self, node: Node | str) -> Node:
        name = node.name if isinstance(node, Node) else node
        try:
            return self.nodes[name]
        except KeyError:
            raise ValueError(f"lab {self.prefix} has no node {name!r}") from None

    @staticmethod
    def _ifname(n: Node, which: str) -> str:
        if which == "hb":
            return n.hb_if
        if which == "lan":
            return n.lan_if
        raise ValueError(f"link must be 'hb' or 'lan', got {which!r}")

    # ----------------------------------------------------------------- teardown
    def teardown(self) -> None:
        """Remove everything this lab created. Idempotent; safe after a partial start."""
        with self._lock, _signals_deferred():
            errors: list[str] = []

            def step(what: str, fn: Callable[[], object]) -> None:
                try:
                    fn()
                except Exception as e:  # keep going: later steps may still clean up
                    errors.append(f"{what}: {e}")

            for proc in self._children:
                step(f"stop pid {proc.pid}", lambda p=proc: _stop_popen(p, grace=1.0))
            self._children.clear()
            step("stop serial line", self.serial_down)
            victims = {pid for ns in self._netns_made for pid in _pids_in_netns(ns)}
            victims |= {pid for pid, m in _marker_pids() if m.split(":")[1] == self.prefix}
            step("kill lab processes", lambda: _kill_pids(victims, grace=1.0))
            for proc in self._anchors:
                step(f"reap anchor {proc.pid}", lambda p=proc: _stop_popen(p, grace=0))
            self._anchors.clear()
            for ns in list(self._netns_made):
                step(f"delete netns {ns}", lambda ns=ns: _delete_netns(ns))
                if ns not in _list_netns():
                    self._netns_made.remove(ns)
            if self._workdir_made and self.workdir is not None:
                step(f"remove {self.workdir}", lambda: shutil.rmtree(self.workdir, ignore_errors=False))
                if not self.workdir.exists():
                    self._workdir_made = False
            if self._recorded and not self._netns_made:
                step("remove registry record", lambda: _unlink(REGISTRY / f"{self.prefix}.json"))
                self._recorded = False
            self._loss.clear()
            if not self._netns_made and not self._recorded:
                _LIVE.discard(self)
            if errors:
                raise LabError(f"lab {self.prefix}: teardown incomplete: " + "; ".join(errors))

    def _write_record(self, netns: list[str]) -> None:
        REGISTRY.mkdir(mode=0o755, exist_ok=True)
        rec = {"prefix": self.prefix, "owner_pid": os.getpid(),
               "owner_start": start_ticks(os.getpid()), "netns": netns,
               "workdir": str(self.workdir) if self._workdir_made else None}
        tmp = REGISTRY / f".{self.prefix}.json.tmp"
        tmp.write_text(json.dumps(rec))
        os.replace(tmp, REGISTRY / f"{self.prefix}.json")
        self._recorded = True

    def __repr__(self) -> str:
        return f"Lab(prefix={self.prefix!r}, nodes={list(self._node_names)}, workdir={self.workdir})"


# --------------------------------------------------------------------- stale leftovers
def cleanup_stale(prefix_glob: str = "hs*", *, force: bool = False) -> list[str]:
    """Remove leftovers of labs whose prefix matches prefix_glob and whose owner process is gone.

    Leftovers are namespaces listed in the registry (or named ``<prefix>-lan`` and siblings),
    processes inside them, anchors/socat found by their argv[0] marker, and recorded workdirs.
    Labs whose owner is still alive are skipped unless force=True.  Returns what was removed.
    """
    records = _read_records()
    live = {p for p, r in records.items() if not force and _owner_alive(r)}

    def ours(prefix: str) -> bool:
        return fnmatch.fnmatchcase(prefix, prefix_glob) and prefix not in live

    existing = _list_netns()
    targets = {ns for p, r in records.items() if ours(p) for ns in r.get("netns", [])
               if ns in existing}
    lan_groups = {ns[:-4] for ns in existing if ns.endswith("-lan")}
    targets |= {ns for ns in existing
                if (p := ns.split("-", 1)[0]) in lan_groups and _PREFIX_RE.fullmatch(p) and ours(p)}
    removed: list[str] = []
    victims = {pid: f"netns {ns}" for ns in sorted(targets) for pid in _pids_in_netns(ns)}
    victims |= {pid: m for pid, m in _marker_pids() if ours(m.split(":")[1])}
    _kill_pids(set(victims), grace=1.0)
    removed += [f"pid {pid} ({why})" for pid, why in sorted(victims.items())]
    for ns in sorted(targets):
        try:
            _delete_netns(ns)
            removed.append(f"netns {ns}")
        except LabError as e:
            log.warning("cleanup_stale: %s", e)
    for prefix, rec in records.items():
        if not ours(prefix):
            continue
        workdir = rec.get("workdir")
        if workdir and Path(workdir).name.startswith(f"{MARKER}-{prefix}-") and Path(workdir).is_dir():
            shutil.rmtree(workdir, ignore_errors=True)
            removed.append(f"workdir {workdir}")
        if not set(rec.get("netns", [])) & set(_list_netns()):
            _unlink(REGISTRY / f"{prefix}.json")
            removed.append(f"record {prefix}")
    return removed


# --------------------------------------------------------------------- small helpers
def _argv(argv: Sequence[str] | str) -> list[str]:
    return shlex.split(argv) if isinstance(argv, str) else [os.fspath(a) for a in argv]


def _check_workdir(path: Path) -> None:
    resolved = str(path.resolve())
    if resolved == "/run" or resolved.startswith("/run/"):
        raise ValueError(f"workdir {path} is under /run, which every node covers with its own tmpfs")
    if re.search(r"[\s,:!'\"]", resolved):
        raise ValueError(f"workdir {path} holds characters socat addresses cannot carry")


def _require_tools() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise LabError(f"missing tools for the lab: {', '.join(missing)}")
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces)")


def _pdeathsig() -> list[str]:
    # Anchors and socat die with their creator even if it is SIGKILLed.  The kernel ties the
    # signal to the creating *thread*, so only the main thread (which lives as long as the
    # process) asks for it; labs built in worker threads rely on teardown and cleanup_stale.
    if threading.current_thread() is threading.main_thread():
        return ["setpriv", "--pdeathsig", "KILL", "--"]
    return []


def _ip(args: list[str], stdin: str | None = None) -> None:
    _cmd(["ip", *args], stdin)


def _nft(netns: str, script: str) -> None:
    _cmd(["nsenter", f"--net=/run/netns/{netns}", "nft", "-f", "-"], script)


def _cmd(argv: list[str], stdin: str | None = None) -> None:
    try:
        res = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=SETUP_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise LabError(f"`{shlex.join(argv)}` timed out") from None
    if res.returncode != 0:
        raise LabError(f"`{shlex.join(argv)}` failed ({res.returncode}): "
                       f"{(res.stderr or res.stdout).strip()}")


def _await_operstate(ends: list[tuple[str, str]], state: str) -> None:
    """Wait until every (netns, device) reports operstate `state` (peer ends may lag)."""
    deadline = time.monotonic() + SETUP_TIMEOUT
    pending = list(ends)
    while pending:
        pending = [(ns, dev) for ns, dev in pending if _operstate(ns, dev) != state]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise LabError(f"links not {state} after {SETUP_TIMEOUT} s: {pending}")
        time.sleep(0.01)


def _admin_up(ns: str, dev: str) -> bool:
    r = subprocess.run(["ip", "-n", ns, "-j", "link", "show", "dev", dev], capture_output=True, text=True)
    try:
        return r.returncode == 0 and "UP" in json.loads(r.stdout)[0]["flags"]
    except (ValueError, IndexError, KeyError):
        return False


def _operstate(ns: str, dev: str) -> str | None:
    res = subprocess.run(["ip", "-n", ns, "-j", "link", "show", "dev", dev],
                         capture_output=True, text=True, timeout=SETUP_TIMEOUT)
    try:
        return json.loads(res.stdout)[0].get("operstate")
    except (ValueError, IndexError, AttributeError):
        return None


def _list_netns() -> list[str]:
    try:
        return sorted(os.listdir("/run/netns"))
    except FileNotFoundError:
        return []


def _delete_netns(ns: str) -> None:
    if ns in _list_netns():
        _ip(["netns", "delete", ns])


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _proc_pids() -> Iterator[int]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield int(entry)


def _pids_in_netns(ns: str) -> list[int]:
    """Live processes whose network namespace is the one mounted at /run/netns/<ns>."""
    try:
        st = os.stat(f"/run/netns/{ns}")
    except OSError:
        return []
    found = []
    for pid in _proc_pids():
        try:
            pst = os.stat(f"/proc/{pid}/ns/net")
        except OSError:
            continue
        if (pst.st_ino, pst.st_dev) == (st.st_ino, st.st_dev) and pid != os.getpid():
            found.append(pid)
    return found


def _marker_pids() -> list[tuple[int, str]]:
    """(pid, argv[0]) of every process named hastore-lab:<prefix>:<role>."""
    found = []
    for pid in _proc_pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv0 = f.read().split(b"\0", 1)[0].decode(errors="replace")
        except OSError:
            continue
        if argv0.startswith(MARKER + ":") and argv0.count(":") >= 2:
            found.append((pid, argv0))
    return found


def dir_prefix(tag: str, d: Path) -> str:
    """Names (namespaces, links) of a lab kept in directory d: a 2-letter tag and 6 hex digits, stable for d."""
    return tag + hashlib.sha256(str(d).encode()).hexdigest()[:6]


def _alive(pid: int) -> bool:
    return start_ticks(pid) is not None  # None for a zombie too


def _kill_pids(pids: set[int], grace: float) -> None:
    """SIGTERM, wait up to grace seconds, then SIGKILL whatever is left."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        pids = {p for p in pids if _alive(p)}
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError as e:
                if e.errno != errno.ESRCH:
                    raise
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            time.sleep(0.01)
            pids = {p for p in pids if _alive(p)}
        if not pids:
            return
    raise LabError(f"processes survived SIGKILL: {sorted(pids)}")


def _stop_popen(proc: subprocess.Popen, grace: float) -> None:
    if proc.poll() is None and grace > 0:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        proc.kill()
    proc.wait(5)


def _read_records() -> dict[str, dict]:
    records = {}
    for path in REGISTRY.glob("*.json") if REGISTRY.is_dir() else []:
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        records[path.stem] = rec
    return records


def _owner_alive(rec: dict) -> bool:
    pid = rec.get("owner_pid")
    return isinstance(pid, int) and start_ticks(pid) == rec.get("owner_start")


# --------------------------------------------------------------------- exit hooks
_LIVE: set[Lab] = set()
_hooks_installed = False


def _teardown_all() -> None:
    for lab in list(_LIVE):
        try:
            lab.teardown()
        except Exception:
            log.exception("lab %s: teardown at exit failed", lab.prefix)


def _teardown_then_die(signum: int, frame: object) -> None:
    # Not a flag-setting handler on purpose: there is no loop to look at a flag, and raising
    # SystemExit would let a test runner swallow it and carry on.  So: remove the labs, then
    # die of the same signal as if no handler had been installed.
    signal.signal(signum, signal.SIG_DFL)
    _teardown_all()
    os.kill(os.getpid(), signum)


def _install_exit_hooks() -> None:
    global _hooks_installed
    if _hooks_installed:
        return
    atexit.register(_teardown_all)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) == signal.SIG_DFL:  # never replace someone else's handler
                signal.signal(sig, _teardown_then_die)
    _hooks_installed = True


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP while tearing down; they are delivered right after."""
    sigs = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
