"""The failover prober (hastore.lab.probe) against a VIP moved by hand in a namespace lab, and the timeline
(hastore.lab.timeline) over made-up events.

The root tests build a Lab, put 10.90.0.100/24 on alpha's LAN interface with a tiny TCP listener on 3306,
start the probe in the LAN namespace, move the VIP to bravo (gratuitous ARP) and check what the probe saw.
The writer test does the same with a real MariaDB (one datadir, started on alpha, killed, started on bravo).
"""

from __future__ import annotations

import json
import os
import re
import pwd
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from hastore.lab import timeline
from hastore.lab.probe import Writer, node_macs, read_events, start_probe

VIP, PORT = "10.90.0.100", 3306

LISTENER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(512)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.close()
"""


# ------------------------------------------------------------------ helpers
def _await_line(proc: subprocess.Popen, want: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    buf = b""
    while want.encode() not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            raise AssertionError(f"no {want!r} from pid {proc.pid} (rc {proc.poll()}): {buf!r}")
        if select.select([proc.stdout], [], [], left)[0]:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                continue
            buf += chunk


def listen(node, port: int = PORT) -> subprocess.Popen:
    proc = node.popen([sys.executable, "-c", LISTENER, str(port)], stdin=subprocess.DEVNULL,
                      stdout=subprocess.PIPE)
    _await_line(proc, "ready")
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(5)
    if proc.stdout:
        proc.stdout.close()


def vip(node, action: str) -> None:
    res = node.run(["ip", "addr", action, f"{VIP}/24", "dev", node.lan_if])
    assert res.returncode == 0, res.stderr


def announce(node) -> None:
    """Gratuitous ARP for the VIP from node: arping when installed, else hastore's own (the IPaddr agent's)."""
    if shutil.which("arping"):
        res = node.run(["arping", "-U", "-c", "2", "-w", "1", "-I", node.lan_if, VIP])
    else:
        code = ("import ipaddress, sys; from hastore.agentlib import net\n"
                "with net.iproute() as ipr: link = net.link_by_name(ipr, sys.argv[1])\n"
                "net.announce(link, ipaddress.ip_address(sys.argv[2]), 2, 0.05)\n")
        res = node.run([sys.executable, "-c", code, node.lan_if, VIP],
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert res.returncode == 0, res.stderr


def wait_for(probe, pred, timeout: float = 10.0, what: str = "") -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        evs = probe.events()
        if pred(evs):
            return evs
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {json.dumps(evs, indent=None)[-3000:]}")
        time.sleep(0.02)


def last(evs: list[dict], kind: str) -> dict | None:
    found = [e for e in evs if e["kind"] == kind]
    return found[-1] if found else None


def state(kind: str, ok: bool, node: str | None = None):
    def pred(evs: list[dict]) -> bool:
        e = last(evs, kind)
        return e is not None and e["ok"] is ok and (node is None or e["node"] == node)
    return pred


def all_of(*preds):
    return lambda evs: all(p(evs) for p in preds)


def kinds(evs: list[dict], kind: str) -> list[dict]:
    return [e for e in evs if e["kind"] == kind]


# ------------------------------------------------------------------ root: ICMP, TCP, MAC
@pytest.mark.root
def test_probe_sees_the_vip_move(tmp_path):
    from hastore.lab.netns import Lab
    with Lab() as lab:
        alpha, bravo = lab.nodes["alpha"], lab.nodes["bravo"]
        macs = node_macs(lab)
        assert macs["alpha"] != macs["bravo"]
        vip(alpha, "add")
        listener = listen(alpha)
        out = tmp_path / "probe.jsonl"
        with start_probe(lab, VIP, PORT, out, macs) as probe:
            wait_for(probe, all_of(state("icmp", True), state("tcp", True), state("mac", True, "alpha")),
                     what="VIP up on alpha")
            time.sleep(0.2)
            t_fault = time.monotonic()
            vip(alpha, "del")
            stop(listener)
            wait_for(probe, all_of(state("icmp", False), state("tcp", False)), what="VIP down")
            time.sleep(0.2)
            t_move = time.monotonic()
            vip(bravo, "add")
            announce(bravo)
            wait_for(probe, all_of(state("icmp", True), state("mac", True, "bravo")), what="VIP up on bravo")
            time.sleep(0.2)
            assert last(probe.events(), "tcp")["ok"] is False       # no listener on bravo yet
            t_listen = time.monotonic()
            listener = listen(bravo)
            wait_for(probe, state("tcp", True), what="port open on bravo")
            time.sleep(0.1)
            evs = probe.stop()
        stop(listener)

    assert evs == read_events(out)
    assert [e["kind"] for e in evs[-1:]] == ["stop"]
    assert evs[-1]["detail"]["icmp"]["sent"] > 50
    body = [e for e in evs if e["kind"] in ("icmp", "tcp", "mac")]
    for e in body:
        assert set(e) >= {"t", "wall", "kind", "ok", "node", "detail"}
        assert isinstance(e["t"], float) and abs(e["wall"] - time.time()) < 120
    ts = [e["t"] for e in evs if e["kind"] not in ("acked", "stop")]
    assert ts == sorted(ts)

    icmp, tcp, mac = kinds(evs, "icmp"), kinds(evs, "tcp"), kinds(evs, "mac")
    # Only changes are logged: up, down, up (no flapping on a quiet LAN).
    assert [e["ok"] for e in icmp] == [True, False, True], icmp
    assert [e["ok"] for e in tcp] == [True, False, True], tcp
    assert icmp[0]["node"] == tcp[0]["node"] == "alpha"
    assert icmp[2]["node"] == tcp[2]["node"] == "bravo"
    # Every transition lies where the test made it happen, in monotonic time.
    assert icmp[0]["t"] < t_fault <= icmp[1]["t"] < t_move < icmp[2]["t"]
    assert tcp[0]["t"] < t_fault <= tcp[1]["t"] < t_listen < tcp[2]["t"]
    assert icmp[1]["detail"]["reason"] == "timeout" and icmp[1]["detail"]["last_ok"] <= icmp[1]["t"]
    assert icmp[2]["detail"]["rtt_ms"] < 50
    # Detection is prompt: one interval (+ scheduling noise) after the cause.
    assert icmp[1]["t"] - t_fault < 0.1 and tcp[2]["t"] - t_listen < 0.5
    # The neighbour entry: alpha's MAC first, bravo's after the move (maybe an unresolved entry between).
    owners = [e["node"] for e in mac if e["ok"]]
    assert owners[0] == "alpha" and owners[-1] == "bravo", mac
    assert mac[0]["detail"]["mac"] == macs["alpha"] and mac[-1]["detail"]["mac"] == macs["bravo"]
    assert t_move < mac[-1]["t"] <= icmp[2]["t"] + 0.05

    ms = dict(timeline.derive(evs, t_fault, extra=[{"t": t_move, "label": "VIP added on bravo"}]))
    assert ms["fault"] == 0
    assert 0 <= ms[timeline.VIP_DOWN] < ms["VIP added on bravo"] < ms[timeline.VIP_UP] < ms[timeline.TCP_UP]
    assert ms[timeline.VIP_UP] <= ms["VIP answers from bravo's MAC"] < ms[timeline.TCP_UP]


# ------------------------------------------------------------------ root: the MariaDB writer
SERVER_CNF = """[mysqld]
innodb_buffer_pool_size=16M
innodb_log_file_size=8M
skip-name-resolve
host_cache_size=0
max_connect_errors=1000000
skip-grant-tables
"""


def _mariadb(node, base: Path, datadir: Path) -> subprocess.Popen:
    run = base / f"run-{node.name}"
    run.mkdir(exist_ok=True)
    shutil.chown(run, "mysql", "mysql")
    proc = node.popen(["mariadbd", f"--defaults-file={base / 'my.cnf'}", "--user=mysql",
                       f"--datadir={datadir}", f"--socket={run}/sock", f"--pid-file={run}/pid",
                       f"--port={PORT}", "--bind-address=0.0.0.0", "--log-error=" + str(run / "err.log")],
                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (run / "sock").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            log = (run / "err.log").read_text(errors="replace") if (run / "err.log").exists() else ""
            raise AssertionError(f"mariadbd on {node.name} did not start: {log[-2000:]}")
        time.sleep(0.05)
    return proc


@pytest.mark.root
def test_writer_acks_every_id_across_a_failover(tmp_path):
    mariadbd = shutil.which("mariadbd", path="/usr/sbin:/usr/bin")
    if not mariadbd:
        pytest.fail("mariadb-server is not installed (bash scripts/install-deps)", pytrace=False)
    if os.environ.get("CI", "").lower() != "true":      # CI installs the lab extra: fail there
        pytest.importorskip("pymysql")
    from hastore.lab.netns import Lab
    base = Path(tempfile.mkdtemp(prefix="hastore-probetest-"))
    os.chmod(base, 0o755)
    servers: list[subprocess.Popen] = []
    try:
        (base / "my.cnf").write_text(SERVER_CNF)
        datadir = base / "data"
        datadir.mkdir()
        ent = pwd.getpwnam("mysql")
        os.chown(datadir, ent.pw_uid, ent.pw_gid)
        res = subprocess.run(["mariadb-install-db", f"--defaults-file={base / 'my.cnf'}", "--user=mysql",
                              f"--datadir={datadir}", "--skip-test-db",
                              "--auth-root-authentication-method=normal"],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        with Lab() as lab:
            alpha, bravo = lab.nodes["alpha"], lab.nodes["bravo"]
            vip(alpha, "add")
            servers.append(_mariadb(alpha, base, datadir))
            writer = Writer(user="probe", password="x", database="hsprobe", interval=0.05)
            with start_probe(lab, VIP, PORT, tmp_path / "probe.jsonl", None, writer) as probe:
                wait_for(probe, lambda evs: last(evs, "write") is not None, timeout=20, what="a first write")
                time.sleep(0.5)
                t_fault = time.monotonic()
                vip(alpha, "del")
                servers[0].kill()                   # a crash: whatever was acked must be on disk
                servers[0].wait(10)
                wait_for(probe, state("write-failed", False), what="a failed write")
                servers.append(_mariadb(bravo, base, datadir))
                vip(bravo, "add")
                announce(bravo)
                evs = wait_for(probe, lambda evs: (last(evs, "write") or {}).get("node") == "bravo",
                               timeout=30, what="writes on bravo")
                time.sleep(0.5)
                evs = probe.stop()
            rows = bravo.run(["mariadb", "--no-defaults", f"--socket={base}/run-bravo/sock", "-N", "-B",
                              "-e", "SELECT id, node FROM hsprobe.writes ORDER BY id"])
            assert rows.returncode == 0, rows.stderr
    finally:
        for p in servers:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        shutil.rmtree(base, ignore_errors=True)

    acked = next(e for e in evs if e["kind"] == "acked")
    stored = {int(line.split()[0]): line.split()[1] for line in rows.stdout.splitlines()}
    assert len(acked["ids"]) > 10 and acked["ids"] == sorted(acked["ids"])
    assert len(acked["t_acked"]) == len(acked["ids"])
    assert not set(acked["ids"]) - set(stored), "an acknowledged write is missing after the failover"
    assert {"alpha", "bravo"} <= set(stored.values())
    writes = [e for e in evs if e["kind"] in ("write", "write-failed")]
    assert [(e["kind"], e["node"]) for e in writes] == [("write", "alpha"), ("write-failed", "alpha"),
                                                         ("write", "bravo")], writes
    assert acked["failed"] and all(t_fault <= f[1] for f in acked["failed"])
    assert writes[2]["detail"]["failed_before"] == len(acked["failed"])
    ms = dict(timeline.derive(evs, t_fault))
    assert 0 < ms[timeline.WRITES_FAIL] < ms[timeline.FIRST_WRITE]


# ------------------------------------------------------------------ timeline (no root)
def _ev(t, kind, ok, node=None, **detail):
    return {"t": t, "wall": 1e9 + t, "kind": kind, "ok": ok, "node": node, "detail": detail or None}


EVENTS = [
    _ev(99.0, "start", True),
    _ev(99.001, "mac", True, "alpha", mac="02:00:00:00:00:01"),
    _ev(99.002, "icmp", True, "alpha"), _ev(99.003, "tcp", True, "alpha"), _ev(99.1, "write", True, "alpha"),
    _ev(100.004, "icmp", False, "alpha"), _ev(100.005, "tcp", False, "alpha"),
    _ev(100.2, "write-failed", False, "alpha"),
    _ev(101.5, "mac", True, "bravo", mac="02:00:00:00:00:02"),
    _ev(101.5102, "icmp", True, "bravo"),
    _ev(101.9, "tcp", True, "bravo"), _ev(102.0, "write", True, "bravo"),
    {"t": 103.0, "kind": "acked", "ok": True, "node": None, "detail": None, "ids": [1, 2, 30],
     "t_acked": [99.1, 99.2, 102.0], "failed": [[3, 100.2, "x"]]},
]


def test_derive_milestones():
    extra = [{"t": 101.0, "label": "bravo declares alpha dead"}, {"t": 101.3, "label": "bravo: IPaddr started"},
             {"t": 50.0, "label": "an old start, before the fault"}]
    ms = timeline.derive(EVENTS, 100.0, extra)
    assert [label for label, _ in ms] == [
        "fault", timeline.VIP_DOWN, timeline.TCP_DOWN, timeline.WRITES_FAIL, "bravo declares alpha dead",
        "bravo: IPaddr started", timeline.VIP_UP, "VIP answers from bravo's MAC", timeline.TCP_UP,
        timeline.FIRST_WRITE]
    got = dict(ms)
    assert got[timeline.VIP_DOWN] == pytest.approx(0.004)
    assert got[timeline.VIP_UP] == pytest.approx(1.5102)
    assert got["VIP answers from bravo's MAC"] == pytest.approx(1.5102)
    assert got[timeline.FIRST_WRITE] == pytest.approx(2.0)
    # Reversed input, same answer; the fault time is the origin.
    assert timeline.derive(list(reversed(EVENTS)), 100.0, extra) == ms


def test_derive_mac_moves_while_the_vip_answers_and_missing_milestones():
    evs = [_ev(1.0, "mac", True, "alpha", mac="a"), _ev(1.0, "icmp", True, "alpha"),
           _ev(5.25, "mac", True, "bravo", mac="b")]
    assert timeline.derive(evs, 5.0) == [("fault", 0.0), ("VIP answers from bravo's MAC", pytest.approx(0.25))]
    # An unmapped MAC is named by its address; from_node overrides the owner at the fault.
    evs = [_ev(1.0, "icmp", True), _ev(5.5, "mac", True, None, mac="02:aa")]
    assert timeline.derive(evs, 5.0, from_node="alpha")[-1] == ("VIP answers from 02:aa's MAC", pytest.approx(0.5))
    # The owner before the fault unknown (probe started late): no MAC milestone rather than a wrong one.
    assert timeline.derive(evs, 5.0) == [("fault", 0.0)]
    # Writes never failed: the first acknowledged write after the fault, from the acked summary.
    ack = {"t": 9.0, "kind": "acked", "ok": True, "ids": [1, 2], "t_acked": [4.0, 6.0]}
    assert timeline.derive([ack], 5.0) == [("fault", 0.0), (timeline.FIRST_WRITE, pytest.approx(1.0))]


def test_text_is_an_aligned_table():
    out = timeline.text(timeline.derive(EVENTS, 100.0, [{"t": 101.0, "label": "peer dead"}]))
    lines = out.splitlines()
    assert lines[0].startswith("milestone") and lines[0].endswith("after fault")
    assert lines[1].split() == ["fault", "+0", "ms"]
    assert any(line.startswith("VIP stops answering (ICMP)") and line.endswith("+4 ms") for line in lines)
    assert any(line.endswith("+1510 ms") for line in lines)
    assert len({len(line) for line in lines[1:]}) == 1, out          # right-aligned numbers
    assert timeline.text([]) == "(no milestones)"


def test_png_writes_a_png(tmp_path):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("matplotlib missing (pip install 'hastore[lab]' (matplotlib)); CI=true does not skip",
                        pytrace=False)
        pytest.skip("matplotlib missing (pip install 'hastore[lab]' (matplotlib))")
    path = tmp_path / "timeline.png"
    timeline.png(timeline.derive(EVENTS, 100.0, [{"t": 101.0, "label": "peer dead"}]), path, "test failover")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    timeline.png([], tmp_path / "empty.png", "nothing")
    assert (tmp_path / "empty.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_png_without_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)       # import matplotlib -> ImportError
    with pytest.raises(RuntimeError, match=re.escape("pip install 'hastore[lab]' (matplotlib)")):
        timeline.png([("fault", 0.0)], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
