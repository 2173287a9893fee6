"""Fault scenarios on the namespace lab (disklock -> Filesystem -> IPaddr -> mysql, Heartbeat files).

Timing of the lab: keepalive 200 ms, deadtime 1 s, disk lease 750 ms renewed every 100 ms (hastore.lab.keeper.lease_timing); the group prefers alpha.
"""

from __future__ import annotations

import json
import time

import pytest

pytestmark = pytest.mark.root

DEADTIME = 1.0


def stays(run, holder: str, seconds: float) -> float:
    """The group stays with holder for `seconds` (no failover), the peer stays alive; returns when done."""
    lab = run.lab
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.5)
        st = lab.status()["nodes"]
        assert st[holder]["group"]["owner"] == holder, st
        assert all(v["peer_alive"] for v in st.values()), f"a node declared its peer dead: {st}"
    return time.monotonic()


def moved(run, to: str, timeout: float = 30) -> float:
    run.lab.wait_group_on(to, timeout)
    return time.monotonic()


def server_pid(lab, node: str) -> int | None:
    """The newest mariadbd: a server just killed can still be listed (a zombie not yet reaped) beside its successor,
    which once made the lowest pid the one killed."""
    r = lab.node_run(node, ["pgrep", "-n", "-x", "mariadbd"])
    return int(r.stdout.split()[0]) if r.returncode == 0 else None


def holder_fault_moves(run, kind: str) -> tuple[str, str, float, float]:
    """Inject `kind` on the holder, whose daemon then exits; wait for the group on the peer. Returns the old
    holder, the new one, the time of the fault and the time the group ran on the peer."""
    lab, a = run.lab, run.holder
    b = lab.peer(a)
    t0 = lab.fault(a, kind)
    run.expected_exits.add(a)
    return a, b, t0, moved(run, b)


def test_01_kill_9_of_the_active_daemon(run):
    """The node stays up with its daemon gone: the guard stops its resources (the userspace counterpart of
    Heartbeat's watchdog reboot), which releases the disk lease; then the peer takes over."""
    lab = run.lab
    a, b, t0, settled = holder_fault_moves(run, "kill")
    _, holds = lab.holds()
    assert not any(holds[a].values()), f"the killed daemon's node still holds {holds[a]}"
    fenced = [e for e in run.new_logs(a) if "self-fenc" in json.dumps(e)]
    assert fenced, "the guard logged why it stopped the resources"
    run.audit(b, settled)
    print(f"kill -9: group on {b} {settled - t0:.2f} s after the fault")


def test_02_frozen_active_daemon_then_resumed(run):
    lab, a = run.lab, run.holder
    b = lab.peer(a)
    t0 = lab.fault(a, "hang")
    settled = moved(run, b)
    time.sleep(1.0)
    lab.fault(a, "heal")  # SIGCONT: it must find out it was fenced and not fight for the group
    run.expected_exits.add(a)
    lab.wait(f"{a}'s daemon exits after the freeze", lambda: lab.status()["nodes"][a]["daemon"] != "frozen (SIGSTOP)",
             timeout=20)
    stays_until = time.monotonic() + 3
    while time.monotonic() < stays_until:
        assert lab.holder() in (b, None)
        time.sleep(0.2)
    run.audit(b, settled)
    print(f"SIGSTOP: group on {b} {settled - t0:.2f} s after the freeze")


def test_03_planned_stop_hands_over_without_deadtime(run):
    a, b, t0, settled = holder_fault_moves(run, "stop")
    left = [e for e in run.new_logs(b) if e.get("event") == "decision" and "left the cluster" in e.get("reason", "")]
    assert left, "the peer took over because it was told, not because deadtime passed"
    assert not [e for e in run.new_logs(b) if "is dead" in e.get("reason", "")]
    run.audit(b, settled)
    print(f"SIGTERM: group on {b} {settled - t0:.2f} s after the stop")


def test_04_whole_node_crash(run):
    a, b, t0, settled = holder_fault_moves(run, "crash")
    run.audit(b, settled)
    print(f"crash: group on {b} {settled - t0:.2f} s after the crash")


@pytest.mark.parametrize("link", ["hb", "serial"])
def test_05_06_one_heartbeat_path_down_is_no_failover(run, link):
    lab, a = run.lab, run.holder
    lab.fault(a, "link-down", link)
    stays(run, a, 4 * DEADTIME)
    st = lab.hastore(lab.peer(a), "status", "--json")
    links = json.loads(st.stdout)["peers"][a]["links"]
    up = {lid.split(":")[0]: v["up"] for lid, v in links.items()}
    assert up == ({"ucast": False, "serial": True} if link == "hb" else {"ucast": True, "serial": False}), up
    run.audit(a, run.t_start)


def test_07_both_heartbeat_paths_down_lan_up(run):
    """Split brain risk: both nodes think the other is dead. The disk lease keeps the second node from
    mounting (and so from taking the VIP, which comes after the lock in the group)."""
    lab, a = run.lab, run.holder
    b = lab.peer(a)
    lab.fault(a, "link-down", "hb")
    lab.fault(a, "link-down", "serial")
    lab.wait(f"{b} declares {a} dead", lambda: lab.status()["nodes"][b]["peer_alive"] is False, timeout=10)
    # b tries to take the group: the lease is renewed by a, so b waits (wait_ms) and then gives up.
    lab.wait(f"{b} gives up on the lock", lambda: any(
        "group-failed" in json.dumps(e) or "failed to start" in e.get("reason", "") for e in run.new_logs(b)),
        timeout=30)
    _, holds = lab.holds()
    assert all(holds[a].values()) and not any(holds[b].values()), holds
    report = [e.get("reason", "") for e in run.new_logs(b) if "held by" in json.dumps(e)]
    assert report, "the refusal names the lease holder"
    settled = time.monotonic()
    lab.heal_all()
    run.audit(a, settled)


def test_08_active_node_loses_the_lan(run):
    lab, a = run.lab, run.holder
    b = lab.peer(a)
    t0 = lab.fault(a, "link-down", "lan")
    settled = moved(run, b)
    yielded = [e for e in run.new_logs(a) if e.get("event") == "decision" and "releasing group" in e.get("reason", "")]
    assert yielded, "the node that lost its ping node released the group and said why"
    lab.fault(a, "heal")
    run.audit(b, settled)
    print(f"LAN loss: group on {b} {settled - t0:.2f} s after the link went down")


def test_09_loss_on_the_heartbeat_cable_is_no_failover(run):
    lab, a = run.lab, run.holder
    lab.fault(a, "loss", "30", "hb")
    stays(run, a, 60)
    run.audit(a, run.t_start)


def test_10_mariadb_killed_restarts_in_place_then_fails_over(run):
    lab, a = run.lab, run.holder
    b = lab.peer(a)

    first = server_pid(lab, a)
    lab.node_run(a, ["pkill", "-KILL", "-x", "mariadbd"])
    lab.wait("MariaDB restarted in place", lambda: [e for e in run.new_logs(a)
                                                    if "restarted in place" in e.get("reason", "")], timeout=30)
    assert server_pid(lab, a) not in (None, first) and lab.holder() == a
    # Kill each new server once it runs again: past max_restarts within the window the group fails over.
    killed = {first}
    deadline = time.monotonic() + 90
    while lab.holder() != b and time.monotonic() < deadline:
        pid = server_pid(lab, a)
        if pid not in killed and lab.group_running_on(a):
            killed.add(pid)
            lab.node_run(a, ["kill", "-KILL", str(pid)])
        time.sleep(0.2)
    settled = moved(run, b, timeout=30)
    assert [e for e in run.new_logs(a) if "failed over" in e.get("reason", "")], \
        [e.get("reason") for e in run.new_logs(a) if e.get("event") == "decision"][-12:]
    run.audit(b, settled)


def test_11_standby_and_takeover(run):
    lab, a = run.lab, run.holder
    b = lab.peer(a)
    r = lab.hastore(a, "standby")
    assert r.returncode == 0, r.stderr
    settled = moved(run, b)
    r = lab.hastore(a, "takeover")
    assert r.returncode == 0, r.stderr
    settled = moved(run, a)
    run.audit(a, settled)


def test_13_filesystem_stop_fails_blocks_takeover(run):
    """The shared filesystem cannot be unmounted: someone mounted another filesystem over its directory, and the
    Filesystem agent does not unmount a mount that is not its own (submounts below it and processes using it it
    deals with itself). The group cannot be stopped, so the node keeps claiming it: the peer must not start it."""
    lab, a = run.lab, run.holder
    b = lab.peer(a)
    mnt = lab.info["mount"]
    r = lab.node_run(a, ["mount", "-t", "tmpfs", "blocker", mnt])
    assert r.returncode == 0, r.stderr
    try:
        lab.fault(a, "stop")
        lab.wait(f"{a} reports stop-failed", lambda: lab.status()["nodes"][a]["daemon"] == "running" and
                 (lab.status()["nodes"][a]["group"] or {}).get("state") == "stop-failed", timeout=60)
        time.sleep(3 * DEADTIME)
        _, holds = lab.holds()
        assert not any(holds[b].values()), f"{b} started the group while {a} could not stop it: {holds}"
        assert holds[a]["mount"]
    finally:
        lab.node_run(a, ["sh", "-c", f"grep -q ' {mnt} tmpfs ' /proc/mounts && umount {mnt}"])
    # The operator deals with the node the way a watchdog would: the daemon goes, its guard stops what is left.
    lab.fault(a, "kill")
    settled = time.monotonic()
    run.audit(lab.heal_all(), settled)


def test_15_garbage_and_replays_at_the_heartbeat_port(run):
    lab, a = run.lab, run.holder
    b = lab.peer(a)
    target = lab.info["nodes"][b]["hb_addr"]
    before = json.loads(lab.hastore(b, "status", "--json").stdout)["counters"]
    # Capture one real beat of a's on b's heartbeat interface, then replay it and send garbage.
    code = (
        "import socket,sys,time,os\n"
        "s=socket.socket(socket.AF_PACKET,socket.SOCK_RAW,socket.htons(0x0800)); s.bind((sys.argv[1],0))\n"
        "s.settimeout(5)\n"
        "while True:\n"
        "  f=s.recv(65535)\n"
        "  ip=f[14:]; ihl=(ip[0]&15)*4\n"
        "  if ip[9]==17 and int.from_bytes(ip[ihl+2:ihl+4],'big')==694: beat=ip[ihl+8:]; break\n"
        "u=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        "for i in range(100): u.sendto(beat,(sys.argv[2],694))\n"
        "for i in range(100): u.sendto(os.urandom(i+1),(sys.argv[2],694))\n"
        "for i in range(100): u.sendto(beat[:-1]+bytes([beat[-1]^1]),(sys.argv[2],694))\n")
    r = lab.node_run(b, ["python3", "-c", code, lab.info["nodes"][b]["hb_if"], target])
    assert r.returncode == 0, r.stderr
    stays(run, a, 2 * DEADTIME)
    after = json.loads(lab.hastore(b, "status", "--json").stdout)["counters"]
    grown = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert sum(v for k, v in grown.items() if k != "ok") >= 250, grown
    run.audit(a, run.t_start)


def test_12_auto_failback_on_hands_back_without_overlap(run_failback):
    r = run_failback
    lab = r.lab
    assert r.holder == "alpha", "auto_failback on: the group sits on its preferred node"
    lab.fault("alpha", "stop")
    moved(r, "bravo")
    lab.fault("alpha", "start")
    moved(r, "alpha", timeout=60)
    handed = [e for e in r.new_logs("bravo") if "auto_failback" in e.get("reason", "")]
    assert handed, "bravo released the group for the preferred node and said so"
    r.audit("alpha", r.t_start)  # no overlap during the whole hand-back, not only after it settled


def test_12_auto_failback_off_the_group_stays_put(run):
    lab, a = run.lab, run.holder
    b = lab.peer(a)
    lab.fault(a, "stop")
    settled = moved(run, b)
    lab.fault(a, "start")
    lab.wait(f"{a} is back", lab.healthy, timeout=60)
    stays(run, b, 3 * DEADTIME)
    back = [e for e in run.new_logs(b) if "auto_failback" in e.get("reason", "")]
    assert not back, f"auto_failback off, yet {b} handed the group back: {back[:2]}"
    run.audit(b, settled)


def test_14_restart_of_the_active_daemon_adopts_the_running_group(run):
    lab, a = run.lab, run.holder
    b = lab.peer(a)

    daemon, server = lab.status()["nodes"][a]["pid"], server_pid(lab, a)
    r = lab.hastore(a, "restart")
    assert r.returncode == 0, r.stderr
    lab.wait(f"{a}'s new daemon adopts the group", lambda: any(
        "adopting it" in e.get("reason", "") for e in run.new_logs(a)), timeout=20)
    stays(run, a, 2 * DEADTIME)
    assert lab.status()["nodes"][a]["pid"] == daemon, "re-executed in place: the same process"
    assert server_pid(lab, a) == server, "MariaDB kept running: adopted, not restarted"
    moves = [e for e in run.new_logs(a) if e.get("event") == "agent" and e.get("op") in ("start", "stop")]
    assert not moves, f"the restart stopped or started resources: {moves[:3]}"
    assert not [e for e in run.new_logs(b) if f"{a} is dead" in e.get("reason", "")]
    run.audit(a, run.t_start)
