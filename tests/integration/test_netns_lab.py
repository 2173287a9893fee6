"""The network-namespace lab: topology, faults, serial line, and that nothing is ever left behind."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hastore.lab import netns
from hastore.lab.netns import Lab, LabError, cleanup_stale

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]


def ping(node, addr: str, count: int = 1, interval: float = 0.2, wait: float = 0.5) -> int:
    """How many of `count` echo requests from node to addr were answered."""
    res = node.run(["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", str(wait), addr])
    for line in res.stdout.splitlines():
        if "received" in line:
            return int(line.split(",")[1].split()[0])
    if "unreachable" in res.stderr:    # no route while the interface is down
        return 0
    raise AssertionError(f"unexpected ping output: {res.stdout!r} {res.stderr!r}")


def reachable(node, addr: str) -> bool:
    # Generous wait: after link_up an INCOMPLETE neighbour entry retries only every second.
    return ping(node, addr, wait=3.0) == 1


def unreachable(node, addr: str) -> bool:
    return ping(node, addr, wait=0.5) == 0


def leftovers(prefix: str) -> list[str]:
    """Namespaces, processes and registry records of a lab that should be gone."""
    found = [f"netns {ns}" for ns in netns._list_netns() if ns.startswith(prefix + "-")]
    for pid in netns._proc_pids():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if prefix in cmdline and pid != os.getpid() and netns._alive(pid):
            found.append(f"pid {pid}: {cmdline}")
    if (netns.REGISTRY / f"{prefix}.json").exists():
        found.append("registry record")
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    found += [f"host link {line}" for line in links.splitlines() if prefix in line]
    return found


def read_exactly(fd: int, n: int, timeout: float = 2.0) -> bytes:
    data, deadline = b"", time.monotonic() + timeout
    while len(data) < n:
        ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            break
        data += os.read(fd, n - len(data))
    return data


def open_tty(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)


# ------------------------------------------------------------------------- topology
def test_lab_comes_up_with_own_hostnames_and_run(lab):
    assert set(lab.nodes) == {"alpha", "bravo"}
    for name, node in lab.nodes.items():
        assert node.netns in netns._list_netns()
        assert node.run("hostname").stdout.strip() == name
        assert node.run(["cat", "/proc/sys/kernel/hostname"]).stdout.strip() == name
        assert node.run("test -d /run/lock").returncode == 0
        assert node.run(["test", "-L", node.serial]).returncode == 0   # visible inside the node
        assert node.run("getent ahostsv4 gateway").stdout.split()[0] == lab.gateway
        assert len(node.run(["ip", "-br", "-4", "addr"]).stdout.splitlines()) == 3   # lo, lan, hb
    assert os.uname().nodename not in {"alpha", "bravo"}
    assert lab.nodes["alpha"].run("pwd", cwd="/usr").stdout.strip() == "/usr"
    assert lab.nodes["alpha"].run("pwd").stdout.strip() == os.getcwd()


def test_each_node_has_a_private_run(lab):
    alpha, bravo = lab.nodes["alpha"], lab.nodes["bravo"]
    assert alpha.run("touch /run/only-alpha").returncode == 0
    assert alpha.run("test -e /run/only-alpha").returncode == 0
    assert bravo.run("test -e /run/only-alpha").returncode == 1
    assert not Path("/run/only-alpha").exists()


def test_nodes_reach_each_other_and_the_gateway(lab):
    alpha, bravo = lab.nodes["alpha"], lab.nodes["bravo"]
    for node in (alpha, bravo):
        peer = lab.peer(node)
        assert reachable(node, peer.hb_addr), f"{node.name} -> {peer.name} hb"
        assert reachable(node, peer.lan_addr), f"{node.name} -> {peer.name} lan"
        assert reachable(node, peer.hb_addr6), f"{node.name} -> {peer.name} hb v6"
        assert reachable(node, lab.gateway), f"{node.name} -> gateway"
        assert reachable(node, lab.gateway6), f"{node.name} -> gateway v6"
    assert lab.lan_run(["ping", "-c1", "-W1", alpha.lan_addr]).returncode == 0


def test_nothing_outside_the_lab_is_routable(lab):
    alpha = lab.nodes["alpha"]
    res = alpha.run(["ip", "route", "get", "192.0.2.1"])
    assert res.returncode != 0 and "unreachable" in res.stderr
    assert lab.lan_run(["ip", "route", "get", "192.0.2.1"]).returncode != 0


# ------------------------------------------------------------------------- serial line
def test_serial_pair_carries_bytes_both_ways(lab):
    a_fd, b_fd = open_tty(lab.nodes["alpha"].serial), open_tty(lab.nodes["bravo"].serial)
    try:
        os.write(a_fd, b"ping\x00\xff\r\n")
        assert read_exactly(b_fd, 8) == b"ping\x00\xff\r\n"    # raw: no echo, no translation
        os.write(b_fd, b"pong")
        assert read_exactly(a_fd, 4) == b"pong"
        assert read_exactly(a_fd, 1, timeout=0.2) == b""          # and no echo of our own bytes
    finally:
        os.close(a_fd)
        os.close(b_fd)


def test_serial_down_and_up(lab):
    alpha, bravo = lab.nodes["alpha"], lab.nodes["bravo"]
    a_fd = open_tty(alpha.serial)
    lab.serial_down()
    try:
        assert not os.path.lexists(alpha.serial) and not os.path.lexists(bravo.serial)
        ready, _, _ = select.select([a_fd], [], [], 2)
        assert ready, "an open end must notice the line went away"
        with pytest.raises(OSError):
            if not os.read(a_fd, 1):   # hang-up reads as EOF or EIO
                raise OSError("EOF")
    finally:
        os.close(a_fd)
    lab.serial_up()
    lab.serial_up()   # no-op while running
    a_fd, b_fd = open_tty(alpha.serial), open_tty(bravo.serial)
    try:
        os.write(b_fd, b"back")
        assert read_exactly(a_fd, 4) == b"back"
    finally:
        os.close(a_fd)
        os.close(b_fd)


# ------------------------------------------------------------------------- faults
def test_link_down_hb_keeps_lan(lab):
    alpha, bravo = lab.nodes["alpha"], lab.nodes["bravo"]
    lab.link_down(alpha, "hb")
    assert unreachable(bravo, alpha.hb_addr)
    assert unreachable(alpha, bravo.hb_addr6)
    assert reachable(bravo, alpha.lan_addr)
    lab.link_up(alpha, "hb")
    assert reachable(bravo, alpha.hb_addr)
    assert reachable(bravo, alpha.hb_addr6), "IPv6 address must survive link down/up"


def test_link_down_lan_keeps_hb(lab):
    alpha, bravo = lab.nodes["alpha"], lab.nodes["bravo"]
    lab.link_down("bravo", "lan")
    assert unreachable(bravo, lab.gateway)
    assert unreachable(alpha, bravo.lan_addr)
    assert reachable(alpha, bravo.hb_addr)
    lab.link_up("bravo", "lan")
    assert reachable(bravo, lab.gateway)


def test_loss_100_partitions_and_heal_restores(lab):
    alpha, bravo = lab.nodes["alpha"], lab.nodes["bravo"]
    lab.loss(alpha, "hb", 100)
    assert unreachable(alpha, bravo.hb_addr)
    assert unreachable(bravo, alpha.hb_addr)
    assert unreachable(bravo, alpha.hb_addr6)
    assert reachable(bravo, alpha.lan_addr)
    lab.loss(alpha, "lan", 100)
    assert unreachable(alpha, lab.gateway)
    assert "hastore_lab" in alpha.run("nft list ruleset").stdout
    lab.heal(alpha)
    assert "hastore_lab" not in alpha.run("nft list ruleset").stdout
    assert reachable(alpha, bravo.hb_addr)
    assert reachable(alpha, lab.gateway)
    lab.heal(alpha)   # healing a healed node is fine


def test_partial_loss_drops_some(lab):
    alpha, bravo = lab.nodes["alpha"], lab.nodes["bravo"]
    lab.loss(bravo, "hb", 50)   # both directions at bravo: ~25 % of round trips survive
    got = ping(alpha, bravo.hb_addr, count=60, interval=0.01, wait=0.3)
    assert 0 < got < 60
    lab.loss(bravo, "hb", 0)    # 0 removes the rule
    assert ping(alpha, bravo.hb_addr, count=20, interval=0.01) == 20
    with pytest.raises(ValueError):
        lab.loss(bravo, "hb", 101)
    with pytest.raises(ValueError):
        lab.loss(bravo, "serial", 10)


# ------------------------------------------------------------------------- leaving nothing behind
def test_teardown_removes_everything_and_is_idempotent():
    lab = Lab(prefix=f"hst{os.getpid() % 100000}")
    with lab:
        alpha = lab.nodes["alpha"]
        tracked = alpha.popen(["sleep", "300"])
        alpha.run(["sh", "-c", "setsid sleep 301 </dev/null >/dev/null 2>&1 &"])  # untracked daemon
        lan_proc = lab.lan_popen(["sleep", "302"])
        workdir = lab.workdir
        deadline = time.monotonic() + 5     # popen returns before nsenter has entered the netns
        while True:
            inside = {pid for ns in (alpha.netns, lab.lan_ns) for pid in netns._pids_in_netns(ns)}
            if len(inside) >= 4 or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert len(inside) >= 4    # anchor, tracked, daemon, lan sleep
        assert leftovers(lab.prefix)
    assert leftovers(lab.prefix) == []
    assert [pid for pid in inside if netns._alive(pid)] == []
    assert tracked.poll() is not None and lan_proc.poll() is not None
    assert not workdir.exists()
    lab.teardown()
    assert leftovers(lab.prefix) == []


def test_given_workdir_is_kept(tmp_path):
    with Lab(workdir=tmp_path / "w") as lab:
        assert lab.nodes["bravo"].serial == str(tmp_path / "w" / "bravo.tty")
    assert (tmp_path / "w").is_dir() and leftovers(lab.prefix) == []


@pytest.mark.parametrize("step", ["_wire", "_start_anchors", "serial_up"])
@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failed_setup_leaves_nothing(monkeypatch, step, exc):
    original = getattr(Lab, step)

    def broken(self, *args, **kwargs):
        original(self, *args, **kwargs)   # fail *after* the step built its part
        raise exc("injected failure")

    monkeypatch.setattr(Lab, step, broken)
    lab = Lab()
    with pytest.raises(exc, match="injected"):
        with lab:
            pytest.fail("the body must not run")
    assert leftovers(lab.prefix) == []
    assert lab not in netns._LIVE


def test_refuses_bad_arguments():
    with pytest.raises(ValueError):
        Lab(prefix="way-too-long-prefix")
    with pytest.raises(ValueError):
        Lab(nodes=("alpha",))
    with pytest.raises(ValueError):
        Lab(workdir="/run/hastore-x")


CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from hastore.lab.netns import Lab
    lab = Lab(prefix={prefix!r}).start() if {bare} else Lab(prefix={prefix!r}).__enter__()
    print("up", flush=True)
    time.sleep(60)
""")


def start_child_lab(prefix: str, bare: bool) -> subprocess.Popen:
    code = CHILD.format(repo=str(REPO), prefix=prefix, bare=bare)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "up"
    return child


def test_sigterm_tears_down():
    prefix = f"hss{os.getpid() % 100000}"
    child = start_child_lab(prefix, bare=True)
    try:
        assert leftovers(prefix)
        child.send_signal(signal.SIGTERM)
        assert child.wait(10) == -signal.SIGTERM
        assert leftovers(prefix) == []
    finally:
        child.kill()
        child.wait()
        cleanup_stale(prefix, force=True)


def test_cleanup_stale_spares_live_owners_and_removes_crashed_ones():
    prefix = f"hsk{os.getpid() % 100000}"
    child = start_child_lab(prefix, bare=False)
    try:
        assert cleanup_stale(prefix) == []                   # owner alive: untouched
        assert f"{prefix}-alpha" in netns._list_netns()
        child.kill()                                          # crash: no teardown runs
        child.wait()
        deadline = time.monotonic() + 5
        while any("anchor" in x or "socat" in x for x in leftovers(prefix)):
            assert time.monotonic() < deadline, "anchors must die with their owner (pdeathsig)"
            time.sleep(0.05)
        assert f"{prefix}-alpha" in netns._list_netns()      # namespaces outlive the crash
        removed = cleanup_stale(prefix)
        assert f"netns {prefix}-alpha" in removed
        assert leftovers(prefix) == []
        assert cleanup_stale(prefix) == []
    finally:
        child.kill()
        child.wait()
        cleanup_stale(prefix, force=True)


def test_two_labs_at_once_do_not_collide():
    with Lab() as one, Lab() as two:
        assert one.prefix != two.prefix
        assert reachable(one.nodes["alpha"], one.nodes["bravo"].hb_addr)
        assert reachable(two.nodes["alpha"], two.nodes["bravo"].hb_addr)
        two.loss("alpha", "hb", 100)
        assert reachable(one.nodes["alpha"], one.nodes["bravo"].hb_addr)
    assert leftovers(one.prefix) == [] and leftovers(two.prefix) == []


def test_setup_is_fast():
    started = time.monotonic()
    with Lab():
        assert time.monotonic() - started < 2.0


def test_teardown_error_is_reported(monkeypatch):
    lab = Lab().start()
    monkeypatch.setattr(netns, "_delete_netns", lambda ns: (_ for _ in ()).throw(LabError("nope")))
    with pytest.raises(LabError, match="teardown incomplete"):
        lab.teardown()
    monkeypatch.undo()
    lab.teardown()
    assert leftovers(lab.prefix) == []
