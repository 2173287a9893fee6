"""Resource groups on the fake cluster: ordering, rollback, stop escalation, restart-then-failover, adoption,
hand-off without overlap, standby and takeover. The fake agent runner records every operation it ran."""

import sys

import pytest

from hastore.cli.main import format_status
from hastore.config.model import AutoFailback, Group, Resource
from hastore.core import actions as A
from hastore.core import events as E
from hastore.core.resources import Policy

from fakecluster import LINKS, FakeCluster, make_config

GROUP = Group("db", "alpha", (Resource("disklock", ("/dev/sdb1",)), Resource("Filesystem", ("/dev/sdb2", "/data")),
                              Resource("IPaddr", ("10.0.0.100",)), Resource("mysql")))
POLICY = Policy(monitor_interval_s=1.0, max_restarts=2, restart_window_s=60.0, stop_retries=2)
PUMP = 0.0  # set by the fixture below: every test runs with the engine ticking and with a beat pump (Engine.plan)


@pytest.fixture(autouse=True, params=[0.0, 5.0], ids=["ticks", "pump"])
def _pump(request, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "PUMP", request.param)


def cluster(auto_failback=AutoFailback.OFF, prerun=None, **kw) -> FakeCluster:
    from dataclasses import replace
    cfg = {n: replace(make_config(n, groups=(GROUP,), **kw), auto_failback=auto_failback) for n in ("alpha", "bravo")}
    c = FakeCluster(cfg, policy=POLICY, pump=PUMP)
    for node, keys in (prerun or {}).items():
        c.nodes[node].running.update(keys)
    return c


def settled_with_ping_node() -> FakeCluster:
    """Both nodes see the ping node 10.0.0.254; 3 s on, the group runs on alpha."""
    c = cluster(ping=("10.0.0.254",))
    for n in ("alpha", "bravo"):
        c.nodes[n].sees_pings = {"10.0.0.254"}
    c.advance(3.0)
    return c


def ops(c: FakeCluster, node: str, op: str | None = None) -> list[tuple[int, str]]:
    return [(i, o) for _, g, i, o, _ in c.nodes[node].ops_log if op is None or o == op]


def test_start_in_order_stop_in_reverse():
    c = cluster()
    c.advance(2.0)
    assert [i for i, o in ops(c, "alpha", "start")] == [0, 1, 2, 3]
    c.deliver(E.Shutdown(), "alpha")
    c.advance(2.0)
    assert [i for i, o in ops(c, "alpha", "stop")] == [3, 2, 1, 0]
    assert c.holders("db") == {"bravo"}
    assert c.overlaps == []


def test_failed_start_rolls_back_in_reverse_and_the_peer_takes_the_group():
    c = cluster()
    c.nodes["alpha"].faults[("db", 2, "start")] = 1
    c.advance(3.0)
    assert ops(c, "alpha")[4:] == [(0, "start"), (1, "start"), (2, "start"), (2, "stop"), (1, "stop"), (0, "stop")]
    st = c.status("alpha")["groups"]["db"]
    assert "failed to start: IPaddr::10.0.0.100: start failed (generic error)" in c.reasons("alpha")
    assert c.holders("db") == {"bravo"}
    assert "starting group db: it failed on alpha" in c.reasons("bravo")
    assert st["owner"] == "bravo"
    assert c.overlaps == []


def test_a_stop_that_keeps_failing_blocks_the_takeover():
    c = cluster()
    c.advance(2.0)
    c.nodes["alpha"].faults[("db", 1, "stop")] = 1  # the filesystem will not unmount
    c.deliver(E.Admin("standby", "all"), "alpha")
    c.advance(5.0)
    assert ops(c, "alpha", "stop") == [(3, "stop"), (2, "stop"), (1, "stop"), (1, "stop"), (1, "stop")]  # 2 retries
    assert c.status("alpha")["groups"]["db"]["state"] == "stop-failed"
    assert c.holders("db") == {"alpha"} and ops(c, "bravo", "start") == []
    c.deliver(E.Shutdown(), "alpha")
    c.advance(5.0)
    assert c.nodes["alpha"].running_daemon is True  # it stays, so the peer keeps seeing the claim
    assert "not leaving: group(s) db failed to stop" in c.reasons("alpha")
    assert ops(c, "bravo", "start") == []


def test_monitor_failure_restarts_in_place_then_fails_over():
    c = cluster()
    c.advance(2.0)
    n = len(ops(c, "alpha"))
    c.nodes["alpha"].faults[("db", 3, "monitor")] = 7  # mysql keeps dying
    c.advance(1.2)
    # restart in place: only the failed resource (the last one) is stopped and started again
    assert [x for x in ops(c, "alpha")[n:] if x[1] != "monitor"][:2] == [(3, "stop"), (3, "start")]
    assert "restart 1 of 2" in c.reasons("alpha")
    c.advance(10.0)
    assert "failed over: mysql: monitor says not running" in c.reasons("alpha")
    assert c.holders("db") == {"bravo"}
    assert c.status("bravo")["groups"]["db"]["owner"] == "bravo"
    assert c.overlaps == []


def test_a_failed_middle_resource_restarts_what_depends_on_it():
    c = cluster()
    c.advance(2.0)
    c.nodes["alpha"].faults[("db", 1, "monitor")] = 7
    n = len(ops(c, "alpha"))
    c.advance(1.5)
    c.nodes["alpha"].faults.pop(("db", 1, "monitor"))
    tail = [x for x in ops(c, "alpha")[n:] if x[1] != "monitor"]
    assert tail[:6] == [(3, "stop"), (2, "stop"), (1, "stop"), (1, "start"), (2, "start"), (3, "start")]


def test_resources_already_running_are_adopted_not_started_twice():
    keys = {("db", i) for i in range(4)}
    c = cluster(prerun={"alpha": keys})
    c.advance(3.0)
    assert ops(c, "alpha", "start") == []
    assert c.status("alpha")["groups"]["db"]["state"] == "started"
    assert "already running here: adopting it" in c.reasons("alpha")
    assert c.holders("db") == {"alpha"}


def test_a_partly_running_group_is_stopped_before_anything_else():
    c = cluster(prerun={"bravo": {("db", 0), ("db", 1)}})
    c.advance(3.0)
    assert [x for x in ops(c, "bravo") if x[1] != "monitor"] == [(3, "stop"), (2, "stop"), (1, "stop"), (0, "stop")]
    assert c.holders("db") == {"alpha"}


def test_auto_failback_hands_the_group_back_without_overlap():
    c = cluster(auto_failback=AutoFailback.ON)
    c.advance(2.0)
    c.nodes["alpha"].running_daemon = False
    c.nodes["alpha"].running.clear()  # the node died with everything on it
    c.advance(3.0)
    assert c.holders("db") == {"bravo"}
    c.restart("alpha", make_config_af("alpha", AutoFailback.ON), generation=2)
    c.advance(4.0)
    assert c.holders("db") == {"alpha"}
    assert "auto_failback on: handing group db back to its preferred node alpha" in c.reasons("bravo")
    assert c.overlaps == []


def test_auto_failback_off_leaves_the_group_where_it_is():
    c = cluster(auto_failback=AutoFailback.OFF)
    c.advance(2.0)
    c.nodes["alpha"].running_daemon = False
    c.nodes["alpha"].running.clear()
    c.advance(3.0)
    c.restart("alpha", make_config_af("alpha", AutoFailback.OFF), generation=2)
    c.advance(4.0)
    assert c.holders("db") == {"bravo"}


def test_standby_and_takeover():
    c = cluster(auto_failback=AutoFailback.ON)
    c.advance(2.0)
    c.deliver(E.Admin("standby", "all"), "alpha")
    c.advance(3.0)
    assert c.holders("db") == {"bravo"}  # and it stays there despite auto_failback
    assert c.status("alpha")["groups"]["db"]["standby"] is True
    c.deliver(E.Admin("takeover", "all"), "alpha")
    c.advance(3.0)
    assert c.holders("db") == {"alpha"}
    assert "alpha asked to take over group(s) db" in c.reasons("bravo")
    assert c.overlaps == []


def test_standby_is_refused_when_the_peer_is_dead():
    c = cluster()
    c.advance(2.0)
    for link in LINKS:
        c.cut_link(link)
    c.advance(3.0)
    d = c.deliver(E.Admin("standby", "all"), "alpha")
    assert "the peer is not alive" in d.reason
    assert "alpha" in c.holders("db")


def make_config_af(node, af):
    from dataclasses import replace
    return replace(make_config(node, groups=(GROUP,)), auto_failback=af)


def test_a_restarted_daemon_adopts_its_running_group_even_before_its_pings_settle():
    c = settled_with_ping_node()
    assert c.holders("db") == {"alpha"}
    c.nodes["alpha"].running_daemon = False  # the daemon restarts; its resources keep running
    c.advance(0.3)
    from dataclasses import replace
    c.restart("alpha", replace(make_config("alpha", groups=(GROUP,), ping=("10.0.0.254",))), generation=2)
    c.advance(3.0)
    assert c.holders("db") == {"alpha"}
    assert [x for x in ops(c, "alpha") if x[1] in ("start", "stop")] == []  # the new daemon only probed
    assert "adopting it" in c.reasons("alpha")


def test_per_resource_timeouts_intervals_and_group_restart_limit_from_the_model():
    from dataclasses import replace
    res = (Resource("disklock", ("/dev/sdb1",), start_timeout_ms=5000, monitor_interval_ms=0),
           Resource("mysql", start_timeout_ms=120000, monitor_interval_ms=500, monitor_timeout_ms=3000))
    group = Group("db", "alpha", res, max_restarts=0)
    c = FakeCluster({n: make_config(n, groups=(group,)) for n in ("alpha", "bravo")}, policy=POLICY, pump=PUMP)
    c.advance(3.0)
    runs = [a for _, d in c.nodes["alpha"].log for a in d.actions if type(a).__name__ == "RunAgent"]
    starts = {a.index: a.timeout_s for a in runs if a.op == "start"}
    assert starts == {0: 5.0, 1: 120.0}
    monitors = [a for a in runs if a.op == "monitor" and a.op_id > 2]  # after the probes
    assert monitors and {a.index for a in monitors} == {1} and all(a.timeout_s == 3.0 for a in monitors)
    c.nodes["alpha"].faults[("db", 1, "monitor")] = 7
    c.advance(2.0)
    assert c.holders("db") == {"bravo"}  # max_restarts 0: the first failure fails the group over
    assert "0 restarts within 60 s already" in c.reasons("alpha")


def test_a_node_where_the_group_failed_retries_it_when_the_peer_cannot_hold_it():
    """Split brain averted by the disk lock leaves the group failed on bravo; after the heal alpha loses its ping
    node and yields: bravo must not sit on its old failure while nobody runs the group."""
    c = settled_with_ping_node()
    assert c.holders("db") == {"alpha"}
    c.nodes["bravo"].faults[("db", 0, "start")] = 1  # the lock is held by alpha
    for link in LINKS:
        c.cut_link(link)
    c.advance(3.0)
    assert c.status("bravo")["groups"]["db"]["state"] == "failed" and c.holders("db") == {"alpha"}
    assert len(ops(c, "bravo", "start")) == 1  # with the peer dead it retries, but not before the retry delay
    del c.nodes["bravo"].faults[("db", 0, "start")]
    c.heal()
    c.advance(3.0)
    assert c.holders("db") == {"alpha"}  # alpha can hold it: bravo's failure keeps bravo out
    c.nodes["alpha"].sees_pings = set()
    c.advance(3.0)
    assert c.holders("db") == {"bravo"}  # alpha yielded, and bravo took it (its failure is past the retry delay)
    assert "starting group db: nobody holds it and alpha sees fewer ping nodes" in c.reasons("bravo")
    assert c.overlaps == []


def test_a_group_failed_on_both_nodes_is_retried_by_its_preferred_node_only():
    c = cluster()
    for n in ("alpha", "bravo"):
        c.nodes[n].faults[("db", 3, "start")] = 1
    c.advance(4.0)
    assert c.status("alpha")["groups"]["db"]["state"] == "failed"
    assert c.status("bravo")["groups"]["db"]["state"] == "failed"
    for n in ("alpha", "bravo"):
        del c.nodes[n].faults[("db", 3, "start")]
    c.advance(6.0)
    assert c.holders("db") == {"alpha"}
    assert ops(c, "bravo", "start").count((0, "start")) == 1  # bravo tried once, and did not retry
    assert c.overlaps == []


def test_a_holder_cut_off_from_peer_and_ping_nodes_releases_so_the_peer_can_take_over():
    c = settled_with_ping_node()
    assert c.holders("db") == {"alpha"}
    t0 = c.now
    for link in LINKS:
        c.cut_link(link)
    c.nodes["alpha"].sees_pings = set()  # alpha's LAN cable is out too
    c.advance(4.0)
    assert c.holders("db") == {"bravo"}
    released = [t for t, d in c.nodes["alpha"].log if "releasing group db: cut off: no ping node and no peer" in d.reason]
    dead = [t for t, d in c.nodes["alpha"].log if "bravo is dead" in d.reason]
    # deadtime after the last beat and echo reply (at most a keepalive before the cut), when bravo is declared
    # dead, and not a second deadtime on top of that
    assert released and dead and released[0] >= dead[0] and 0.8 <= released[0] - t0 < 1.0 + 0.3, released[0] - t0
    # Alone with its ping nodes, a holder keeps the group (its peer is merely dead).
    c2 = settled_with_ping_node()
    c2.nodes["bravo"].running_daemon = False
    c2.advance(4.0)
    assert c2.holders("db") == {"alpha"} and "cut off" not in c2.reasons("alpha")
    # A lone holder that then loses its ping nodes too releases once no echo reply came for deadtime: it is cut off.
    t1 = c2.now
    c2.nodes["alpha"].sees_pings = set()
    c2.advance(0.75)
    assert c2.holders("db") == {"alpha"}, "not before deadtime without an echo reply"
    c2.advance(1.0)
    released = [t for t, d in c2.nodes["alpha"].log if "releasing group db: cut off" in d.reason]
    assert released and 0.8 <= released[0] - t1 < 1.0 + 0.3 and not c2.holders("db")


def pull_cables(c: FakeCluster, node: str, links=LINKS, ping_route=True) -> None:
    """Every heartbeat link of `node` cut and its LAN with them, as its shell would say it: sends fail for a
    local reason (LinkState) and the ping node has no route (PingRoute)."""
    for link in LINKS:
        c.cut_link(link)
    c.nodes[node].sees_pings = set()
    for link in links:
        c.schedule(c.now + 0.01, node, E.LinkState(link, False))
    if ping_route:
        c.schedule(c.now + 0.01, node, E.PingRoute("10.0.0.254", False))


def test_a_holder_that_knows_its_own_interfaces_are_down_releases_a_warntime_later():
    c = settled_with_ping_node()
    t0 = c.now
    pull_cables(c, "alpha")
    c.advance(0.45)
    assert c.holders("db") == {"alpha"}, "not before the isolation lasted warntime (a short outage moves nothing)"
    assert "cannot be used from this node" in c.reasons("alpha")
    c.advance(0.3)
    released = [t for t, d in c.nodes["alpha"].log if "releasing group db: isolated" in d.reason]
    assert released and 0.5 <= released[0] - t0 <= 0.55, released  # warntime (500 ms) after the last of them
    assert not [t for t, d in c.nodes["alpha"].log if "bravo is dead" in d.reason], "before bravo is declared dead"
    here = c.status("alpha")["here"]
    assert here["links_down"] == sorted(LINKS) and here["no_route"] == ["10.0.0.254"]
    assert here["isolated"].startswith("isolated: for ")
    text = format_status(c.status("alpha"))
    assert "(cannot send here)" in text.split("ucast:eth1:peer")[1].splitlines()[0], text
    assert "no route from here to ping node(s) 10.0.0.254" in text and "isolated: for " in text
    c.run_until(t0 + 0.8)
    assert "alpha" not in c.holders("db"), "stopped before bravo declares alpha dead (deadtime 1 s after its last beat)"
    c.advance(3.0)
    assert c.holders("db") == {"bravo"}
    assert not [1 for _, g, _, op, _ in c.nodes["alpha"].ops_log[-10:] if op == "start"], "isolated: never retaken"
    # cables back: alpha sees bravo holding it and leaves it there
    c.heal()
    c.nodes["alpha"].sees_pings = {"10.0.0.254"}
    for link in LINKS:
        c.schedule(c.now + 0.01, "alpha", E.LinkState(link, True))
    c.schedule(c.now + 0.01, "alpha", E.PingRoute("10.0.0.254", True))
    c.advance(3.0)
    assert c.holders("db") == {"bravo"} and "link serial:/dev/ttyS0 can be used from this node again" in c.reasons("alpha")
    assert not c.overlaps


def test_a_stall_that_left_the_ping_node_unasked_does_not_make_the_holder_yield():
    """Seen in the VM lab under load: alpha's echo replies were late for half a second, then alpha itself did not
    run for 0.6 s (no pings sent); on waking its last reply was over deadtime old, it counted 0 ping nodes against
    bravo's 1 and gave its group away. Silence from a ping node that was not asked means nothing: after a stall the
    count settles once the ping node answers again (or after deadtime of asking)."""
    c = settled_with_ping_node()
    assert c.holders("db") == {"alpha"}
    alpha = c.nodes["alpha"]
    alpha.sees_pings = set()  # replies lost or late
    c.advance(0.5)
    alpha.frozen = True  # and then alpha does not run (bravo hears its beats again before deadtime)
    alpha.sees_pings = {"10.0.0.254"}
    c.advance(0.6)
    alpha.frozen = False
    c.advance(2.0)
    assert c.holders("db") == {"alpha"} and not ops(c, "alpha", "stop"), c.reasons("alpha")
    assert "sees fewer yields" not in c.reasons("alpha")
    assert c.status("alpha")["ping"]["count"] == 1
    # the same loss without the stall is a real one: after deadtime without replies alpha yields to bravo
    c = settled_with_ping_node()
    c.nodes["alpha"].sees_pings = set()
    c.advance(2.0)
    assert c.holders("db") == {"bravo"} and "the node that sees fewer yields" in c.reasons("alpha")


def test_echo_replies_read_with_a_late_tick_are_decided_on_with_it():
    """A beat tick late past the ping node's expiry (the machine is loaded, not stalled): the reply waiting in the
    ICMP socket is read first and recorded without a pass of its own (PingReply.more), so the tick's pass counts
    it. Deciding before it was read (as a pass on a beat read first did) makes the holder yield."""
    def late_tick(c, reply_first: bool):
        alpha = c.nodes["alpha"]
        alpha.sees_pings = set()
        c.advance(0.1)
        last = alpha.engine.pings.last_reply["10.0.0.254"]
        c.run_until(last + 0.85)  # the ping node still visible (deadtime 1 s)
        alpha.frozen = True
        c.run_until(last + 1.1)  # the tick comes 0.25 s late, past the expiry (not a stall: under 2 keepalives)
        alpha.frozen = False
        reply = E.PingReply("10.0.0.254", at=c.now - 0.2, more=True)  # it came while the tick was late
        if reply_first:
            assert c.deliver(reply, "alpha") == A.Decision()
        c.deliver(E.Tick(), "alpha")
        if not reply_first:
            c.deliver(reply, "alpha")
        alpha.sees_pings = {"10.0.0.254"}
        c.advance(2.0)

    c = settled_with_ping_node()
    late_tick(c, reply_first=True)
    assert c.holders("db") == {"alpha"} and not ops(c, "alpha", "stop"), c.reasons("alpha")
    c = settled_with_ping_node()
    late_tick(c, reply_first=False)
    assert "the node that sees fewer yields" in c.reasons("alpha")


def test_isolation_needs_every_link_and_every_ping_route_down_for_warntime():
    # one heartbeat link still usable (say the serial line, whose cable nobody can see pulled): deadtime rules
    c = settled_with_ping_node()
    pull_cables(c, "alpha", links=LINKS[:1])
    c.advance(0.7)
    assert c.holders("db") == {"alpha"} and "isolated" not in c.reasons("alpha")
    # a route to the ping node still there: the same
    c = settled_with_ping_node()
    pull_cables(c, "alpha", ping_route=False)
    c.advance(0.7)
    assert c.holders("db") == {"alpha"} and "isolated" not in c.reasons("alpha")
    # everything out, but one link back within warntime: a short outage
    c = settled_with_ping_node()
    pull_cables(c, "alpha")
    c.schedule(c.now + 0.4, "alpha", E.LinkState(LINKS[0], True))
    c.advance(0.7)
    assert c.holders("db") == {"alpha"} and "isolated" not in c.reasons("alpha")
    # without ping nodes hastore cannot tell the LAN is gone: never isolated
    c = cluster()
    c.advance(3.0)
    for link in LINKS:
        c.schedule(c.now + 0.01, "alpha", E.LinkState(link, False))
    c.advance(0.7)
    assert c.holders("db") == {"alpha"} and "isolated" not in c.reasons("alpha")


def test_a_lone_holder_is_not_cut_off_by_a_reload_of_its_ping_nodes_nor_by_a_stall():
    """Silence from ping nodes nobody asked means nothing: new ping nodes after SIGHUP, or none asked while the
    daemon was stopped for longer than deadtime."""
    from dataclasses import replace
    c = settled_with_ping_node()
    c.nodes["bravo"].running_daemon = False
    c.advance(4.0)
    assert c.holders("db") == {"alpha"}
    alpha = c.nodes["alpha"]
    new = make_config("alpha", groups=(GROUP,), ping=("10.0.0.253",))
    alpha.sees_pings = {"10.0.0.253"}
    d = c.deliver(E.Reload(replace(new, auto_failback=alpha.engine.config.auto_failback)), "alpha")
    assert "ping nodes ['10.0.0.254'] -> ['10.0.0.253']" in d.reason
    c.advance(3.0)
    alpha.frozen = True
    c.advance(1.5)
    alpha.frozen = False
    c.advance(3.0)
    assert c.holders("db") == {"alpha"} and "cut off" not in c.reasons("alpha")
    assert not [o for _, _, _, o, _ in alpha.ops_log if o == "stop"]
    # and it is still cut off once the new ping node goes quiet
    alpha.sees_pings = set()
    c.advance(2.0)
    assert "releasing group db: cut off" in c.reasons("alpha") and not c.holders("db")


def test_the_guards_farewell_lets_the_peer_take_over_at_once_and_outranks_the_old_daemon():
    """What the daemon hands its guard (Engine.farewell): after the guard stopped everything, the peer treats it as
    a LEAVE at once, not after deadtime; the daemon's own later messages of that generation count for nothing."""
    c = cluster()
    c.advance(3.0)
    assert c.holders("db") == {"alpha"}
    farewell = c.nodes["alpha"].engine.farewell()
    assert len(farewell) == 1
    c.nodes["alpha"].running_daemon = False   # kill -9
    c.nodes["alpha"].running.clear()          # the guard stopped the group
    t_kill = c.now
    for link in LINKS:
        c.schedule(c.now + 0.01, "bravo", E.PacketReceived(link, farewell[0]))
    c.advance(0.5)                            # well within deadtime (1 s)
    assert "alpha's guard stopped its resources after its daemon died or froze" in c.reasons("bravo")
    assert c.first("bravo", "peer-left") is not None and c.first("bravo", "peer-left") - t_kill < 0.1
    assert c.holders("db") == {"bravo"}
    assert c.first("bravo", "peer-dead") is None
    # a beat the old daemon signed before (a lower sequence number) is a replay now
    old = next(d for t, to, link, d in reversed(c.wire_log) if to == "bravo" and d != farewell[0])
    replays = c.status("bravo")["counters"].get("replay", 0)
    c.nodes["bravo"].engine.handle(E.PacketReceived(LINKS[0], old), c.now)
    assert c.status("bravo")["counters"].get("replay", 0) == replays + 1
    assert c.overlaps == []
