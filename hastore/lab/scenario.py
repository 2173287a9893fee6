"""Driving a running `hastore lab` from Python: faults, the kernel's view of who holds the group, audits.

Used by the fault suite (tests/scenarios), bench/failover and `hastore lab demo`.  Everything goes through
the same keeper requests `hastore lab fault|status` use.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Callable

from hastore.lab import cli
from hastore.lab import keeper as K
from hastore.lab.pair import hastore_argv

HOLD_KINDS = ("vip", "mount", "mysqld")


class LabHandle:
    def __init__(self, d: Path | str):
        self.d = Path(d)
        self.info = cli.state(self.d)
        self.lan_ns = self.info["lan_ns"]
        self.vip = self.info["vip"]
        self.nodes = list(self.info["nodes"])
        self.macs = {n: v["mac"].lower() for n, v in self.info["nodes"].items()}
        self.db = self.info["db"]

    # -------------------------------------------------------------- the lab's verbs
    def fault(self, node: str, kind: str, *args: str) -> float:
        """Inject (or heal) a fault; returns the CLOCK_MONOTONIC time it took effect."""
        return cli.fault(self.d, node, kind, list(args))["t"]

    def status(self) -> dict:
        return cli.status(self.d)

    def holds(self) -> tuple[float, dict[str, dict[str, bool]]]:
        r = cli.request(self.d, {"cmd": "holds"}, timeout=30)
        return r["t"], r["holds"]

    def peer(self, node: str) -> str:
        return next(n for n in self.nodes if n != node)

    # -------------------------------------------------------------- inside the lab
    def lan_popen(self, argv, **kw) -> subprocess.Popen:
        """What hastore.lab.probe.start_probe needs of a lab: a process on the client side."""
        return subprocess.Popen(["ip", "netns", "exec", self.lan_ns, *argv], **kw)

    def lan_run(self, argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.lan_ns, *argv], capture_output=True, text=True,
                              timeout=timeout)

    def node_run(self, node: str, argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
        pid = self.info["nodes"][node]["anchor_pid"]
        return subprocess.run(["nsenter", "-t", str(pid), "-n", "-m", "-u", "--wd=/", "--", *argv],
                              capture_output=True, text=True, timeout=timeout)

    def hastore(self, node: str, *args: str) -> subprocess.CompletedProcess:
        return self.node_run(node, [*hastore_argv(), *args])

    def sql(self, statement: str) -> subprocess.CompletedProcess:
        """A statement through the VIP, as a client on the LAN would send it."""
        db = self.db
        return self.lan_run(["mariadb", "--no-defaults", "-h", self.vip, "-u", db["user"], f"-p{db['password']}",
                             "--connect-timeout=2", "-N", "-B", db["database"], "-e", statement])

    def vip_mac(self) -> str | None:
        """The MAC the LAN reaches the VIP at, learnt afresh (flush, then a ping that is answered)."""
        for _ in range(3):
            self.lan_run(["ip", "neigh", "flush", "to", self.vip])
            if self.lan_run(["ping", "-n", "-c", "1", "-W", "1", self.vip]).returncode != 0:
                continue
            entries = json.loads(self.lan_run(["ip", "-j", "neigh", "show", "to", self.vip]).stdout or "[]")
            if entries and entries[0].get("lladdr"):
                return entries[0]["lladdr"].lower()
        return None

    def addresses(self) -> dict[str, str]:
        """Each node's LAN addresses, for messages."""
        return {n: self.node_run(n, ["ip", "-br", "addr"]).stdout for n in self.nodes}

    def logs(self, node: str) -> list[dict]:
        out = []
        path = Path(self.info["nodes"][node]["log"])
        if not path.exists():
            return out
        for line in path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"event": "raw", "line": line})
        return out

    # -------------------------------------------------------------- waiting
    def wait(self, what: str, pred: Callable[[], object], timeout: float = 30, interval: float = 0.1):
        deadline = time.monotonic() + timeout
        while True:
            v = pred()
            if v:
                return v
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not within {timeout} s; status: {json.dumps(self.status())[:3000]}")
            time.sleep(interval)

    def holder(self) -> str | None:
        """The node holding the whole group (VIP, mount and server) by the kernel's view, else None."""
        _, h = self.holds()
        full = [n for n, v in h.items() if all(v[k] for k in HOLD_KINDS)]
        return full[0] if len(full) == 1 else None

    def group_running_on(self, node: str) -> bool:
        st = self.status()["nodes"][node]
        return bool(st["group"]) and K.group_running_on({"groups": {K.GROUP: st["group"]}}, node) \
            and all(st["holds"].values())

    def wait_group_on(self, node: str, timeout: float = 60) -> None:
        self.wait(f"group running on {node}", lambda: self.group_running_on(node), timeout, interval=0.2)

    def healthy(self) -> str | None:
        """Both daemons running and seeing each other, the group running on one node: that node."""
        st = self.status()["nodes"]
        if not all(n["daemon"] == "running" and n["peer_alive"] for n in st.values()):
            return None
        for name in st:
            if self.group_running_on(name):
                return name
        return None

    def heal_all(self, timeout: float = 90) -> str:
        for n in self.nodes:
            self.fault(n, "heal")
        return self.wait("a healthy lab", self.healthy, timeout, interval=0.3)


class Sampler(threading.Thread):
    """Samples the kernel's view of both nodes every `interval` s: (t, nodes holding anything)."""

    def __init__(self, lab: LabHandle, interval: float = 0.1):
        super().__init__(daemon=True)
        self.lab, self.interval = lab, interval
        self.samples: list[tuple[float, dict[str, list[str]]]] = []
        self.errors: list[str] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                t, h = self.lab.holds()
                self.samples.append((t, {n: [k for k in HOLD_KINDS if v[k]] for n, v in h.items()}))
            except Exception as e:  # noqa: BLE001 - recorded and reported by the audit
                self.errors.append(str(e))
            self._stop_event.wait(self.interval)

    def stop(self) -> list[tuple[float, dict[str, list[str]]]]:
        self._stop_event.set()
        self.join(10)
        return self.samples

    def overlaps(self, kinds: tuple[str, ...] = HOLD_KINDS, after: float = 0.0) -> list:
        """Samples (after t) in which both nodes held one of kinds at once."""
        return [(t, h) for t, h in self.samples if t >= after
                and sum(1 for held in h.values() if set(held) & set(kinds)) > 1]


def log_time(entry: dict) -> float | None:
    """A daemon log line's wall-clock time (seconds since the epoch)."""
    ts = entry.get("timestamp")
    if not ts:
        return None
    try:
        return datetime.fromisoformat(ts).timestamp()
    except ValueError:
        return None


def decisions(lab: LabHandle, node: str, contains: str = "") -> list[dict]:
    return [e for e in lab.logs(node) if e.get("event") == "decision" and contains in e.get("reason", "")]


def crashes(lab: LabHandle) -> list[str]:
    """Tracebacks in the daemons' logs (written by the daemon, its guard or an agent), each with the lines that
    follow it up to the next JSON line: what failed, and where."""
    found = []
    for n in lab.nodes:
        trace: list[str] | None = None
        for e in lab.logs(n) + [{}]:
            line = e.get("line", "") if e.get("event") == "raw" else None
            if trace is not None and (line is None or "Traceback" in line or len(trace) >= 40):
                found.append(f"{n}: " + "\n".join(trace))
                trace = None
            if line is not None and "Traceback" in line:
                trace = [line]
            elif trace is not None and line is not None:
                trace.append(line)
    return found
