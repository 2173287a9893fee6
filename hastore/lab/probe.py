"""What a client sees during a failover, timestamped from the LAN side.

Run inside the lab's LAN namespace (the client side)::

    ip netns exec <prefix>-lan python3 -m hastore.lab.probe --vip 10.90.0.100 --port 3306 \\
        --out /tmp/probe.jsonl --mac alpha=02:..:01 --mac bravo=02:..:02 \\
        [--mysql-user U --mysql-password P --database D]

Every ``--interval`` (10 ms) it sends an ICMP echo to the VIP (a ping socket where
net.ipv4.ping_group_range allows it, else a raw socket; each echo is lost after ``--icmp-timeout``)
and starts a TCP connect to VIP:PORT (lost after ``--tcp-timeout``; a connection that opens is reset
at once), and reads the VIP's entry in the neighbour table (pyroute2), mapped to a node name with the
``--mac`` list.  Probes overlap, so a lost probe never delays the next one.  With ``--mysql-user``
a writer thread INSERTs an increasing id through the VIP every ``--write-interval`` (100 ms; PyMySQL,
autocommit, reconnect after any error, a fresh id for every attempt).

Output: JSON lines, one per *change*, each flushed at once::

    {"t": <CLOCK_MONOTONIC s>, "wall": <time.time()>, "kind": K, "ok": bool, "node": N, "detail": {...}}

kind ``start`` (probing began; detail = the configuration), ``icmp`` / ``tcp`` (the first result and
every up/down transition: a "down" is dated by the send time of the first failed probe, an "up" by
the arrival of the first answer; detail has seq, sent, rtt_ms or reason, last_ok), ``mac`` (the VIP's
link-layer address changed; node = its owner from ``--mac`` or null; detail mac, state), ``write``
(the first acknowledged write, and the first one after failures; detail id, latency_ms, failed_before),
``write-failed`` (the first failure after a success, or the first attempt ever failing; detail id,
error).  ``node`` of icmp/tcp/write events is the VIP's owner per the neighbour table at that moment
(write events: the server's @@hostname).  On SIGTERM it writes ``{"kind": "acked", "ids": [...],
"t_acked": [...], "failed": [[id, t, error], ...]}`` (writer only) and ``{"kind": "stop", ...}``
(counters), then exits 0.  Lines of one kind are in time order; ``Probe.stop`` returns all sorted.

CLOCK_MONOTONIC is system-wide on Linux, so ``t`` compares with time.monotonic() of any other process
(the fault injector, the daemons in the node namespaces).

Note for servers probed on their MySQL port: every TCP probe is an unauthenticated connection, which
MariaDB counts against ``max_connect_errors`` for the client's host; run the lab server with
``host_cache_size=0`` (or a huge ``max_connect_errors``) or it blocks the LAN after ~100 probes.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PASSWORD_ENV = "HASTORE_PROBE_MYSQL_PASSWORD"
_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_TABLE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")

ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY = 8, 0
SOL_RAW, ICMP_FILTER = 255, 1
_NUD = {0x01: "INCOMPLETE", 0x02: "REACHABLE", 0x04: "STALE", 0x08: "DELAY", 0x10: "PROBE",
        0x20: "FAILED", 0x40: "NOARP", 0x80: "PERMANENT"}
_NUD_NO_ADDR = 0x01 | 0x20       # INCOMPLETE / FAILED: no usable link-layer address


def _mono() -> float:
    return time.monotonic()


# --------------------------------------------------------------------- output
class EventLog:
    """Writes one JSON line per event, flushed at once; shared by the prober and the writer thread."""

    def __init__(self, path: str | os.PathLike) -> None:
        self._f = open(path, "a", buffering=1, encoding="utf-8")
        self._lock = threading.Lock()

    def emit(self, kind: str, ok: bool, t: float | None = None, node: str | None = None,
             detail: Any = None, **extra: Any) -> dict:
        rec = {"t": round(_mono() if t is None else t, 6), "wall": round(time.time(), 6),
               "kind": kind, "ok": ok, "node": node, "detail": detail, **extra}
        line = json.dumps(rec, separators=(",", ":"))
        with self._lock:
            self._f.write(line + "\n")
            self._f.flush()
        return rec

    def close(self) -> None:
        with self._lock:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()


# --------------------------------------------------------------------- ICMP
def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


class Pinger:
    """Non-blocking ICMP echo over a ping socket (SOCK_DGRAM) or, failing that, a raw socket."""

    def __init__(self, target: str) -> None:
        self.target = target
        try:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
            self.raw = False
        except OSError:   # EACCES: our gid is outside net.ipv4.ping_group_range
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
            self.raw = True
            # Only echo replies reach this socket (ICMP_FILTER blocks the types whose bit is set).
            self.sock.setsockopt(SOL_RAW, ICMP_FILTER, struct.pack("I", ~(1 << ICMP_ECHO_REPLY) & 0xFFFFFFFF))
        self.sock.setblocking(False)
        self.ident = os.getpid() & 0xFFFF

    def send(self, seq: int) -> None:
        payload = struct.pack("!d", _mono()) + b"hastore-probe"
        header = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, self.ident, seq)
        csum = _checksum(header + payload)
        packet = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, csum, self.ident, seq) + payload
        self.sock.sendto(packet, (self.target, 0))

    def replies(self) -> list[int]:
        """Sequence numbers of the echo replies waiting on the socket."""
        seqs = []
        while True:
            try:
                data, (src, _) = self.sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return seqs
            except OSError:      # an ICMP error queued for the socket; the timeout counts the loss
                continue
            if src != self.target:
                continue
            if self.raw:
                data = data[(data[0] & 0x0F) * 4:]
            if len(data) < 8:
                continue
            typ, _code, _csum, ident, seq = struct.unpack("!BBHHH", data[:8])
            if typ != ICMP_ECHO_REPLY or (self.raw and ident != self.ident):
                continue
            seqs.append(seq)

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------- neighbour table
class Neighbours:
    """The VIP's entry in this namespace's IPv4 neighbour table."""

    def __init__(self, addr: str) -> None:
        from pyroute2 import IPRoute
        self.addr = addr
        self.ipr = IPRoute()

    def lookup(self) -> tuple[str | None, str]:
        """(lladdr or None, state name)."""
        best: tuple[str | None, str] = (None, "NONE")
        for msg in self.ipr.neigh("dump", family=socket.AF_INET):
            if msg.get_attr("NDA_DST") != self.addr:
                continue
            state = msg["state"]
            name = _NUD.get(state, hex(state))
            mac = msg.get_attr("NDA_LLADDR")
            if state & _NUD_NO_ADDR or not mac:
                best = (None, name)
                continue
            return mac.lower(), name
        return best

    def close(self) -> None:
        self.ipr.close()


# --------------------------------------------------------------------- the prober
@dataclass
class _State:
    ok: bool | None = None
    last_sent: float = -1.0
    last_ok: float | None = None
    sent: int = 0
    failed: int = 0


class Prober:
    """The ICMP + TCP + neighbour loop (main thread)."""

    def __init__(self, log: EventLog, vip: str, port: int, macs: Mapping[str, str],
                 interval: float = 0.01, icmp_timeout: float = 0.05, tcp_timeout: float = 0.05) -> None:
        self.log, self.vip, self.port = log, vip, port
        self.owner = {mac.lower(): node for node, mac in macs.items()}
        self.interval, self.icmp_timeout, self.tcp_timeout = interval, icmp_timeout, tcp_timeout
        self.stopping = threading.Event()
        self.state = {"icmp": _State(), "tcp": _State()}
        self.mac: str | None = None
        self.mac_seen = False
        self.node: str | None = None
        self.sel = selectors.DefaultSelector()
        self.pinger = Pinger(vip)
        self.neigh = Neighbours(vip)
        self.sel.register(self.pinger.sock, selectors.EVENT_READ, "icmp")
        self._icmp_out: dict[int, float] = {}               # seq -> sent
        self._tcp_out: dict[socket.socket, tuple[int, float]] = {}   # sock -> (seq, sent)

    # results -----------------------------------------------------------
    def _result(self, kind: str, ok: bool, seq: int, sent: float, done: float,
                reason: str | None = None) -> None:
        st = self.state[kind]
        if not ok:
            st.failed += 1
        if sent <= st.last_sent:       # an older probe finishing late (a timeout): already superseded
            return
        st.last_sent = sent
        previous_ok = st.last_ok
        if ok:
            st.last_ok = done
        if st.ok is ok:
            return
        st.ok = ok
        self.poll_neigh()              # date the owner as close to the transition as we can
        detail: dict[str, Any] = {"seq": seq, "sent": round(sent, 6)}
        if ok:
            detail["rtt_ms"] = round((done - sent) * 1000, 3)
        else:
            detail["reason"] = reason
            detail["last_ok"] = None if previous_ok is None else round(previous_ok, 6)
        self.log.emit(kind, ok, t=done if ok else sent, node=self.node, detail=detail)

    def poll_neigh(self) -> None:
        try:
            mac, state = self.neigh.lookup()
        except Exception as e:   # netlink hiccup: keep the last known owner
            print(f"probe: neighbour lookup failed: {e}", file=sys.stderr)
            return
        if self.mac_seen and mac == self.mac:
            return
        self.mac_seen, self.mac = True, mac
        self.node = self.owner.get(mac) if mac else None
        self.log.emit("mac", mac is not None, node=self.node, detail={"mac": mac, "state": state})

    # probes ------------------------------------------------------------
    def _send(self, seq: int) -> None:
        now = _mono()
        self.state["icmp"].sent += 1
        try:
            self.pinger.send(seq & 0xFFFF)
            self._icmp_out[seq & 0xFFFF] = now
        except OSError as e:
            self._result("icmp", False, seq, now, _mono(), errno.errorcode.get(e.errno, str(e)))
        self.state["tcp"].sent += 1
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
        now = _mono()
        err = s.connect_ex((self.vip, self.port))
        if err in (0, errno.EINPROGRESS):
            if err == 0:
                self._result("tcp", True, seq, now, _mono())
                s.close()
            else:
                self._tcp_out[s] = (seq, now)
                self.sel.register(s, selectors.EVENT_WRITE, "tcp")
        else:
            s.close()
            self._result("tcp", False, seq, now, _mono(), errno.errorcode.get(err, str(err)))

    def _tcp_done(self, s: socket.socket, reason: str | None = None) -> None:
        seq, sent = self._tcp_out.pop(s)
        self.sel.unregister(s)
        done = _mono()
        if reason is None:
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            reason = None if err == 0 else errno.errorcode.get(err, str(err))
        s.close()
        self._result("tcp", reason is None, seq, sent, done, reason)

    def _expire(self, now: float) -> None:
        for seq, sent in sorted(self._icmp_out.items(), key=lambda kv: kv[1]):
            if now - sent >= self.icmp_timeout:
                del self._icmp_out[seq]
                self._result("icmp", False, seq, sent, now, "timeout")
        for s, (_seq, sent) in sorted(self._tcp_out.items(), key=lambda kv: kv[1][1]):
            if now - sent >= self.tcp_timeout:
                self._tcp_done(s, "timeout")

    def _deadline(self, next_send: float) -> float:
        d = next_send
        if self._icmp_out:
            d = min(d, min(self._icmp_out.values()) + self.icmp_timeout)
        if self._tcp_out:
            d = min(d, min(sent for _, sent in self._tcp_out.values()) + self.tcp_timeout)
        return d

    def run(self) -> None:
        seq = 0
        next_send = _mono()
        while not self.stopping.is_set():
            now = _mono()
            if now >= next_send:
                self._send(seq)
                seq += 1
                self.poll_neigh()
                next_send += self.interval
                if next_send < now:      # fell behind (a stalled host): do not burst to catch up
                    next_send = now + self.interval
            for key, _ in self.sel.select(max(0.0, self._deadline(next_send) - _mono())):
                if key.data == "icmp":
                    done = _mono()
                    for rseq in self.pinger.replies():
                        sent = self._icmp_out.pop(rseq, None)
                        if sent is not None:
                            self._result("icmp", True, rseq, sent, done)
                elif key.fileobj in self._tcp_out:
                    self._tcp_done(key.fileobj)
            self._expire(_mono())

    def close(self) -> dict:
        for s in list(self._tcp_out):
            self.sel.unregister(s)
            s.close()
        self._tcp_out.clear()
        self.pinger.close()
        self.neigh.close()
        self.sel.close()
        return {k: {"sent": st.sent, "failed": st.failed} for k, st in self.state.items()}


# --------------------------------------------------------------------- the writer
@dataclass
class Writer:
    """MariaDB writer settings (start_probe passes the password through the environment)."""
    user: str
    password: str = ""
    database: str = "hastore_probe"
    table: str = "writes"
    interval: float = 0.1
    connect_timeout: float = 0.3
    timeout: float = 1.0          # read/write timeout of each statement


class WriterThread(threading.Thread):
    def __init__(self, log: EventLog, vip: str, port: int, cfg: Writer, stopping: threading.Event) -> None:
        super().__init__(name="probe-writer", daemon=True)
        if not _TABLE_RE.fullmatch(cfg.table) or not _TABLE_RE.fullmatch(cfg.database):
            raise ValueError("database and table must be plain identifiers")
        self.log, self.vip, self.port, self.cfg, self.stopping = log, vip, port, cfg, stopping
        self.acked: list[int] = []
        self.t_acked: list[float] = []
        self.failed: list[list] = []
        self._ok: bool | None = None
        self._conn = None
        self._node: str | None = None
        self._next_id: int | None = None
        self._fails = 0                  # failed attempts since the last acknowledged write

    def _connect(self):
        import pymysql
        c = self.cfg
        conn = pymysql.connect(host=self.vip, port=self.port, user=c.user, password=c.password,
                               connect_timeout=c.connect_timeout, read_timeout=c.timeout,
                               write_timeout=c.timeout, autocommit=True)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT @@hostname")
                self._node = cur.fetchone()[0]
                cur.execute(f"CREATE DATABASE IF NOT EXISTS `{c.database}`")
                cur.execute(f"USE `{c.database}`")
                cur.execute(f"CREATE TABLE IF NOT EXISTS `{c.table}` "
                            "(id INT PRIMARY KEY, node VARCHAR(64), t DOUBLE)")
                if self._next_id is None:     # ids only ever grow in one run: never reuse one
                    cur.execute(f"SELECT COALESCE(MAX(id), 0) FROM `{c.table}`")
                    self._next_id = int(cur.fetchone()[0]) + 1
        except BaseException:
            conn.close()
            raise
        return conn

    def _attempt(self, wid: int | None) -> tuple[int | None, float]:
        if self._conn is None:
            self._conn = self._connect()
        if wid is None:
            wid = self._next_id
            self._next_id += 1
        start = _mono()
        with self._conn.cursor() as cur:
            cur.execute(f"INSERT INTO `{self.cfg.table}` (id, node, t) VALUES (%s, %s, %s)",
                        (wid, self._node, start))
        return wid, start

    def run(self) -> None:
        next_t = _mono()
        while not self.stopping.is_set():
            wid = self._next_id
            if wid is not None:
                self._next_id += 1
            t_try = _mono()
            try:
                wid, start = self._attempt(wid)
            except Exception as e:
                done = _mono()
                err = f"{type(e).__name__}: {e}"[:300]
                if self._conn is not None:
                    try:
                        self._conn.close()
                    except Exception:
                        pass
                    self._conn = None
                self.failed.append([wid, round(done, 6), err])
                self._fails += 1
                if self._ok is not False:
                    self._ok = False
                    self.log.emit("write-failed", False, t=done, node=self._node,
                                  detail={"id": wid, "error": err, "tried": round(t_try, 6)})
            else:
                done = _mono()
                self.acked.append(wid)
                self.t_acked.append(round(done, 6))
                if self._ok is not True:
                    self._ok = True
                    self.log.emit("write", True, t=done, node=self._node,
                                  detail={"id": wid, "latency_ms": round((done - start) * 1000, 3),
                                          "failed_before": self._fails})
                self._fails = 0
            next_t += self.cfg.interval
            now = _mono()
            if next_t < now:
                next_t = now
            self.stopping.wait(next_t - now)
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass


# --------------------------------------------------------------------- program
def _parse_mac(item: str) -> tuple[str, str]:
    node, sep, mac = item.partition("=")
    mac = mac.strip().lower()
    if not sep or not node or not _MAC_RE.fullmatch(mac):
        raise argparse.ArgumentTypeError(f"--mac wants NODE=aa:bb:cc:dd:ee:ff, got {item!r}")
    return node, mac


def _positive(text: str) -> float:
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m hastore.lab.probe",
                                description="Timestamp what a client sees of a VIP during a failover.")
    p.add_argument("--vip", required=True)
    p.add_argument("--port", type=int, default=3306)
    p.add_argument("--out", required=True, help="JSON lines file (appended to)")
    p.add_argument("--mac", action="append", type=_parse_mac, default=[], metavar="NODE=MAC")
    p.add_argument("--interval", type=_positive, default=0.01)
    p.add_argument("--icmp-timeout", type=_positive, default=0.05)
    p.add_argument("--tcp-timeout", type=_positive, default=0.05)
    p.add_argument("--mysql-user")
    p.add_argument("--mysql-password", help=f"default: ${PASSWORD_ENV}")
    p.add_argument("--database", default="hastore_probe")
    p.add_argument("--table", default="writes")
    p.add_argument("--write-interval", type=_positive, default=0.1)
    p.add_argument("--connect-timeout", type=_positive, default=0.3)
    p.add_argument("--write-timeout", type=_positive, default=1.0)
    args = p.parse_args(argv)
    try:
        socket.inet_aton(args.vip)
    except OSError:
        p.error(f"--vip must be an IPv4 address, got {args.vip!r}")
    if not 0 < args.port < 65536:
        p.error(f"--port out of range: {args.port}")
    if not _TABLE_RE.fullmatch(args.table) or not _TABLE_RE.fullmatch(args.database):
        p.error("--database and --table must be plain identifiers")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    log = EventLog(args.out)
    prober = Prober(log, args.vip, args.port, dict(args.mac), args.interval,
                    args.icmp_timeout, args.tcp_timeout)
    signal.signal(signal.SIGTERM, lambda *_: prober.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: prober.stopping.set())
    writer = None
    if args.mysql_user:
        cfg = Writer(user=args.mysql_user,
                     password=args.mysql_password if args.mysql_password is not None
                     else os.environ.get(PASSWORD_ENV, ""),
                     database=args.database, table=args.table, interval=args.write_interval,
                     connect_timeout=args.connect_timeout, timeout=args.write_timeout)
        import pymysql  # noqa: F401  (fail now, clearly, rather than in the thread)
        writer = WriterThread(log, args.vip, args.port, cfg, prober.stopping)
    log.emit("start", True, detail={
        "vip": args.vip, "port": args.port, "interval": args.interval, "icmp_timeout": args.icmp_timeout,
        "tcp_timeout": args.tcp_timeout, "icmp_socket": "raw" if prober.pinger.raw else "ping",
        "macs": dict(args.mac), "writer": bool(writer), "pid": os.getpid()})
    if writer is not None:
        writer.start()
    try:
        prober.run()
    finally:
        prober.stopping.set()
        counters = prober.close()
        if writer is not None:
            writer.join(args.write_timeout + args.connect_timeout + 2)
            log.emit("acked", True, ids=list(writer.acked), t_acked=list(writer.t_acked),
                     failed=list(writer.failed),
                     detail={"acked": len(writer.acked), "failed": len(writer.failed)})
        log.emit("stop", True, detail=counters)
        log.close()
    return 0


# --------------------------------------------------------------------- API for the lab code
def read_events(path: str | os.PathLike) -> list[dict]:
    """The records of a probe output file: events sorted by t, summary lines (acked, stop) last."""
    recs = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            recs.append(json.loads(line))
        except ValueError:        # a line cut short by a SIGKILL
            continue
    summary = [r for r in recs if r.get("kind") in ("acked", "stop")]
    events = sorted((r for r in recs if r.get("kind") not in ("acked", "stop")), key=lambda r: r["t"])
    return events + summary


def node_macs(lab) -> dict[str, str]:
    """node name -> MAC of its LAN interface, for the --mac list."""
    macs = {}
    for node in lab.nodes.values():
        res = subprocess.run(["ip", "-n", node.netns, "-j", "link", "show", "dev", node.lan_if],
                             capture_output=True, text=True, timeout=10, check=True)
        macs[node.name] = json.loads(res.stdout)[0]["address"].lower()
    return macs


class Probe:
    """A running probe process (see start_probe)."""

    def __init__(self, proc: subprocess.Popen, out_path: Path, log_path: Path) -> None:
        self.proc, self.out_path, self.log_path = proc, out_path, log_path
        self.result: list[dict] | None = None

    def events(self) -> list[dict]:
        """What it has written so far."""
        return read_events(self.out_path)

    def stop(self, timeout: float = 5.0) -> list[dict]:
        """SIGTERM, wait (then SIGKILL), return the records (read_events). Idempotent."""
        if self.result is not None:
            return self.result
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.result = read_events(self.out_path)
        if self.proc.returncode != 0:
            raise RuntimeError(f"probe exited with {self.proc.returncode}: {self._stderr()}")
        return self.result

    def _stderr(self) -> str:
        try:
            return self.log_path.read_text(errors="replace").strip()[-2000:] or "no stderr"
        except OSError:
            return "no stderr"

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        except RuntimeError:
            if exc[0] is None:
                raise


def start_probe(lab, vip: str, port: int, out_path: str | os.PathLike,
                macs: Mapping[str, str] | None = None, writer: Writer | None = None, *,
                interval: float = 0.01, icmp_timeout: float = 0.05, tcp_timeout: float = 0.05,
                ready_timeout: float = 10.0) -> Probe:
    """Start the probe in the lab's LAN namespace; returns once it is probing.

    macs: node -> MAC (default: the nodes' LAN interfaces).  writer: MariaDB writer settings or None.
    Its stderr goes to ``<out_path>.log``; the lab terminates it at teardown if nobody stopped it.
    """
    out = Path(out_path).resolve()      # the probe runs with cwd /
    log_path = out.with_name(out.name + ".log")
    if macs is None:
        macs = node_macs(lab)
    argv = [sys.executable, "-m", "hastore.lab.probe", "--vip", vip, "--port", str(port),
            "--out", str(out), "--interval", str(interval), "--icmp-timeout", str(icmp_timeout),
            "--tcp-timeout", str(tcp_timeout)]
    for node, mac in macs.items():
        argv += ["--mac", f"{node}={mac}"]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    if writer is not None:
        argv += ["--mysql-user", writer.user, "--database", writer.database, "--table", writer.table,
                 "--write-interval", str(writer.interval), "--connect-timeout", str(writer.connect_timeout),
                 "--write-timeout", str(writer.timeout)]
        env[PASSWORD_ENV] = writer.password
    start_size = out.stat().st_size if out.exists() else 0
    with open(log_path, "ab") as err:
        proc = lab.lan_popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                             env=env, cwd="/")
    probe = Probe(proc, out, log_path)
    deadline = time.monotonic() + ready_timeout
    while True:
        if out.exists() and out.stat().st_size > start_size:
            with open(out, encoding="utf-8") as f:
                f.seek(start_size)
                if '"kind":"start"' in f.read():
                    return probe
        if proc.poll() is not None:
            raise RuntimeError(f"probe exited with {proc.returncode} before it started: {probe._stderr()}")
        if time.monotonic() > deadline:
            probe.proc.kill()
            probe.proc.wait(5)
            raise RuntimeError(f"probe not started within {ready_timeout} s: {probe._stderr()}")
        time.sleep(0.01)


if __name__ == "__main__":
    sys.exit(main())
