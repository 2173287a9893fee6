"""Two real `hastore run` daemons in two network namespaces, joined by a veth pair (ucast) and a pty serial line,
configured with legacy Heartbeat files. Everything is asked through `hastore status --json`, as a user would."""

import json
import signal
import time

import pytest

from hastore.lab.pair import Pair, PairTiming, hastore_argv, peer_alive, peer_dead

pytestmark = pytest.mark.root

KEEPALIVE, DEADTIME = 0.2, 1.0


@pytest.fixture
def pair(lab):
    with Pair(lab, PairTiming()) as p:
        p.start_all()
        for me, peer in (("alpha", "bravo"), ("bravo", "alpha")):
            p.wait_for(me, peer_alive(peer, {"ucast": True, "serial": True}), timeout=15)
        yield p
        for name, proc in p.procs.items():
            if proc.poll() is not None and proc.returncode not in (0, -signal.SIGTERM):
                pytest.fail(f"{name}'s daemon died with {proc.returncode}: {p.logs[name].read_text()[-2000:]}")


def wait_logged(pair, name: str, text: str, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in pair.events(name):
            if text in e.get("reason", ""):
                return e
        time.sleep(0.05)
    pytest.fail(f"{name} never logged {text!r}; last lines: " + json.dumps(pair.events(name)[-5:]))


def group_owner(status: dict) -> str | None:
    (g,) = status["groups"].values()
    return g["owner"]


def test_both_nodes_see_each_other_on_both_links_and_one_holds_the_group(pair):
    for me, peer in (("alpha", "bravo"), ("bravo", "alpha")):
        s = pair.status(me)
        assert s["node"] == me
        links = s["peers"][peer]["links"]
        assert len(links) == 2 and all(v["up"] for v in links.values()), links
        assert all(v["last_beat_ms"] < 1000 for v in links.values())
        assert s["ping"]["nodes"] == {pair.lab.gateway: True}
    pair.wait_for("bravo", lambda s: group_owner(s) == "alpha", timeout=5)
    assert group_owner(pair.status("alpha")) == "alpha"


@pytest.fixture
def no_pump(monkeypatch):
    """Daemons started after this (the pair fixture, requested after it) beat from their loop (HASTORE_PUMP)."""
    monkeypatch.setenv("HASTORE_PUMP", "off")


def test_with_the_pump_the_loop_leaves_its_beats_to_it_while_all_is_well(pair):
    """status["timer"] and ["pump"]: the beats go out every keepalive while the engine's timer hardly fires."""
    pair.wait_for("alpha", lambda s: group_owner(s) == "alpha", timeout=10)
    before = pair.status("alpha")
    time.sleep(3.0)
    after = pair.status("alpha")
    fired = after["timer"]["fired"] - before["timer"]["fired"]
    assert after["pump"]["on"] and after["pump"]["plans"] >= 1, after["pump"]
    assert fired <= 3, (before["timer"], after["timer"])  # a plan's end every 5 s, a monitor every 10 s: not ~15
    for link, stats in after["links"].items():
        sent = stats["sent"] - before["links"][link]["sent"]
        assert 3.0 / KEEPALIVE * 0.8 <= sent <= 3.0 / KEEPALIVE * 1.2 + 1, (link, sent)
    peer = after["peers"]["bravo"]
    assert peer["alive"] and all(v["up"] for v in peer["links"].values()), peer
    assert not [e for e in pair.events("bravo") if e.get("event") == "rejected"]


def test_without_the_pump_a_beat_tick_reads_the_quiet_links_only_now_and_then(no_pump, pair):
    """status["timer"]: the engine's timer fires about every keepalive, and reads the quiet links first on one tick
    in two or three (warntime 500 ms over keepalive 200 ms), not on every one."""
    pair.wait_for("alpha", lambda s: group_owner(s) == "alpha", timeout=10)
    before = pair.status("alpha")["timer"]
    time.sleep(3.0)
    after = pair.status("alpha")["timer"]
    fired, read = after["fired"] - before["fired"], after["read"] - before["read"]
    assert 3.0 / KEEPALIVE * 0.8 <= fired <= 3.0 / KEEPALIVE * 1.5, (before, after)
    assert fired / 5 <= read <= fired * 0.75, (before, after)  # 1/2 or 1/3; margin for a loaded machine


def test_hb_cable_down_keeps_the_peer_alive_over_serial(pair):
    pair.lab.link_down("alpha", "hb")
    s = pair.wait_for("bravo", peer_alive("alpha", {"ucast": False, "serial": True}), timeout=5)
    assert group_owner(s) == "alpha"
    time.sleep(DEADTIME + 0.5)
    for me, peer in (("alpha", "bravo"), ("bravo", "alpha")):
        s = pair.status(me)
        assert s["peers"][peer]["alive"] is True
        assert group_owner(s) == "alpha"
    pair.lab.link_up("alpha", "hb")
    pair.wait_for("bravo", peer_alive("alpha", {"ucast": True, "serial": True}), timeout=5)


def test_serial_down_keeps_the_peer_alive_over_ucast(pair):
    pair.lab.serial_down()
    pair.wait_for("alpha", peer_alive("bravo", {"ucast": True, "serial": False}), timeout=5)
    pair.lab.serial_up()
    pair.wait_for("alpha", peer_alive("bravo", {"ucast": True, "serial": True}), timeout=10)


def test_cutting_both_paths_declares_the_peer_dead_within_deadtime_plus_one_keepalive(pair):
    pair.lab.serial_down()
    pair.wait_for("bravo", peer_alive("alpha", {"ucast": True, "serial": False}), timeout=5)
    pair.lab.loss("alpha", "hb", 100)  # the heartbeat cable is cut (both directions dropped in alpha)
    t_fault = time.monotonic()
    s = pair.wait_for("bravo", peer_dead("alpha"), timeout=5, interval=0.02)
    detected = time.monotonic() - t_fault
    assert detected <= DEADTIME + KEEPALIVE + 0.1, detected  # + polling slack of `hastore status`
    assert detected >= DEADTIME - KEEPALIVE - 0.05, detected  # not before deadtime after the last beat
    assert all(v["up"] is False for v in s["peers"]["alpha"]["links"].values())
    # nobody's ping view differs: bravo takes the group (a real partition: alpha keeps it too, reported later)
    pair.wait_for("bravo", lambda s: group_owner(s) == "bravo", timeout=5)
    reasons = [e.get("reason", "") for e in pair.events("bravo")]
    assert any("alpha is dead: no beat on any of its 2 links for deadtime (1000 ms)" in r for r in reasons), reasons
    pair.lab.heal("alpha")
    pair.lab.serial_up()
    pair.wait_for("bravo", peer_alive("alpha"), timeout=10)
    wait_logged(pair, "bravo", "both nodes claim group group1")


def test_sigterm_tells_the_peer_which_takes_over_without_waiting_for_deadtime(pair):
    pair.wait_for("bravo", lambda s: group_owner(s) == "alpha", timeout=5)
    t0 = time.monotonic()
    pair.signal("alpha", signal.SIGTERM)
    s = pair.wait_for("bravo", lambda s: group_owner(s) == "bravo", timeout=5, interval=0.02)
    assert time.monotonic() - t0 < DEADTIME, "the hand-over waited for deadtime"
    assert s["peers"]["alpha"]["alive"] is False
    assert pair.procs["alpha"].wait(5) == 0
    assert any("alpha announced a clean shutdown" in e.get("reason", "") for e in pair.events("bravo"))


def test_sighup_reloads_and_says_what_changed(pair):
    d = pair.lab.workdir / "alpha" / "ha.d"
    cf = d / "ha.cf"
    cf.write_text(cf.read_text().replace("keepalive 200ms", "keepalive 100ms"))
    pair.signal("alpha", signal.SIGHUP)
    wait_logged(pair, "alpha", "keepalive 200 ms, warntime 500 ms, deadtime 1000 ms -> keepalive 100 ms")
    cf.write_text(cf.read_text() + "bogus_directive 1\n")
    pair.signal("alpha", signal.SIGHUP)
    time.sleep(0.5)
    refused = [e for e in pair.events("alpha") if e.get("event") == "reload refused"]
    assert refused and any("bogus_directive" in err for err in refused[-1]["errors"]), refused
    assert pair.status("alpha")["peers"]["bravo"]["alive"] is True  # still running on the old configuration


def test_garbage_at_the_heartbeat_port_is_counted_and_changes_nothing(pair):
    alpha = pair.lab.nodes["alpha"]
    bravo = pair.lab.nodes["bravo"]
    script = ("import socket,os\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
              f"for i in range(200): s.sendto(os.urandom(i % 120), ({alpha.hb_addr!r}, 694))\n")
    r = bravo.run(["python3", "-c", script])
    assert r.returncode == 0, r.stderr
    time.sleep(0.5)
    s = pair.status("alpha")
    assert s["counters"].get("malformed", 0) >= 150, s["counters"]
    assert s["peers"]["bravo"]["alive"] is True
    assert group_owner(s) == "alpha"


def run_second_daemon(pair, *extra: str, state_dir: str | None = None):
    """`hastore run` on alpha again, with alpha's own command line (plus extra, another state directory)."""
    from hastore.lab.pair import _env
    args = list(pair.procs["alpha"].args)
    argv = [*hastore_argv(), *args[args.index("run"):], *extra]
    if state_dir is not None:
        argv[argv.index("--state-dir") + 1] = state_dir
    return pair.lab.nodes["alpha"].run(argv, env=_env(), timeout=30)


def test_a_second_daemon_on_the_same_state_directory_stops_before_touching_anything(pair):
    before = pair.wait_for("alpha", lambda s: group_owner(s) is not None)  # placed: a change now is the intruder's
    r = run_second_daemon(pair)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"another hastore daemon (pid {pair.procs['alpha'].pid}) runs with state directory" in r.stdout + r.stderr
    after = pair.status("alpha")
    assert after["generation"] == before["generation"] and pair.procs["alpha"].poll() is None
    assert after["peers"]["bravo"]["alive"] and group_owner(after) == group_owner(before)


def test_a_second_daemon_on_the_same_udp_port_stops_before_binding_it(pair, tmp_path):
    """Another state directory and control socket (so neither stops it), same heartbeat port, same network
    namespace: its UDP sockets would join the first daemon's and each would read half of the other's datagrams."""
    before = pair.status("alpha")
    r = run_second_daemon(pair, "--socket", str(tmp_path / "other.sock"), state_dir=str(tmp_path / "other-state"))
    assert r.returncode == 1, r.stdout + r.stderr
    assert (f"UDP port 694 on {pair.lab.nodes['alpha'].hb_if}: another hastore daemon (pid {pair.procs['alpha'].pid}) "
            f"in this network namespace uses it" in r.stdout + r.stderr)
    after = pair.status("alpha")
    assert after is not None and after["generation"] == before["generation"] and pair.procs["alpha"].poll() is None
    assert peer_alive("bravo", {"ucast": True, "serial": True})(after)  # its sockets were left alone


def test_status_without_a_daemon_says_so(lab):
    r = lab.nodes["alpha"].run([*hastore_argv(), "status"])
    assert r.returncode == 1
    assert "no such socket" in r.stderr and "hastore run" in r.stderr


def test_a_ping_node_given_by_host_name_is_resolved_and_counted(lab):
    # the lab's /etc/hosts names the LAN bridge "gateway", as an admin's ha.cf often does
    with Pair(lab, PairTiming(), ping="gateway") as p:
        p.start("alpha")
        s = p.wait_for("alpha", lambda s: s["ping"]["count"] == 1, timeout=10)
        assert s["ping"]["nodes"] == {"gateway": True}
