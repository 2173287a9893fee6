"""The engine, fed events by two-node fake clusters with a fake clock (no sockets, no sleeping)."""

import random

import pytest

from hastore.config.model import Timing
from hastore.core import actions as A
from hastore.core import events as E
from hastore.core.engine import Engine

from fakecluster import LINKS, FakeCluster, make_config

T = Timing(keepalive_ms=200, warntime_ms=500, deadtime_ms=1000, initdead_ms=2000)


def cluster(pump: float = 0.0, **kw) -> FakeCluster:
    cfg = {n: make_config(n, **kw) for n in ("alpha", "bravo")}
    return FakeCluster(cfg, pump=pump)


# The engine decides the same whether it runs every beat tick or hands its routine beats to a beat pump for up to
# 5 s at a time (Engine.plan; the fake pump in fakecluster.py wakes it only when a plan's condition fails)
BOTH = pytest.mark.parametrize("pump", [0.0, 5.0], ids=["ticks", "pump"])


def settled(pump: float = 0.0) -> FakeCluster:
    c = cluster(pump)
    c.advance(1.0)
    return c


@BOTH
def test_both_nodes_see_each_other_on_every_link_and_preferred_node_starts_the_group(pump):
    c = settled(pump)
    for me, peer in (("alpha", "bravo"), ("bravo", "alpha")):
        st = c.status(me)
        assert st["peers"][peer]["alive"] is True
        assert {l: v["up"] for l, v in st["peers"][peer]["links"].items()} == {l: True for l in LINKS}
    assert c.holders("web") == {"alpha"}
    assert c.status("bravo")["groups"]["web"]["owner"] == "alpha"
    assert c.status("alpha")["groups"]["web"] == {**c.status("alpha")["groups"]["web"], "owner": "alpha",
                                                  "state": "started"}
    assert "preferred node" in c.reasons("alpha")


@BOTH
def test_losing_one_link_changes_nothing_but_that_link(pump):
    c = settled(pump)
    c.cut_link(LINKS[0])
    c.advance(5.0)
    st = c.status("bravo")["peers"]["alpha"]
    assert st["alive"] is True
    assert st["links"][LINKS[0]]["state"] == "dead" and st["links"][LINKS[1]]["state"] == "up"
    assert c.holders("web") == {"alpha"}
    assert c.first("bravo", "peer-dead") is None
    assert c.first("bravo", "link-dead") is not None


@BOTH
def test_losing_every_link_declares_the_peer_dead_after_deadtime_and_not_before(pump):
    c = settled(pump)
    t_cut = c.now
    last_beat = max(t for t, to, _, _ in c.wire_log if to == "bravo")
    for link in LINKS:
        c.cut_link(link)
    c.advance(3.0)
    dead_at = c.first("bravo", "peer-dead")
    assert dead_at is not None
    assert dead_at - last_beat >= 1.0 - 1e-9  # not before deadtime since the last beat
    assert dead_at - last_beat < 1.0 + 0.001  # and on time: the engine armed a timer at the deadline
    assert dead_at >= t_cut
    # warntime warned first, at the first tick (bravo's beat, every keepalive) after it: no wakeup of its own
    warn_at = c.first("bravo", "peer-warn")
    assert warn_at is not None and 0.5 - 1e-9 <= warn_at - last_beat < 0.5 + 0.2 + 0.001
    if pump:  # the pump wakes the engine when the link's warntime passes
        assert warn_at - last_beat == pytest.approx(0.5)
    else:
        assert any(abs(warn_at - t) < 1e-9 for t, d in c.nodes["bravo"].log
                   if any(isinstance(a, A.Send) for a in d.actions))
    # bravo took the group: the partition makes both hold it (both think the other dead) -- no ping nodes here
    assert "bravo" in c.holders("web")
    reasons = c.reasons("bravo")
    assert "no beat on any of its 2 links for deadtime (1000 ms)" in reasons
    assert "taking group web: alpha is dead" in reasons


def test_initdead_alone_waits_for_initdead_then_takes_over():
    c = FakeCluster({"bravo": make_config("bravo")})
    c.advance(1.9)
    assert c.holders("web") == set()
    assert c.status("bravo")["peers"]["alpha"]["state"] == "init"
    c.advance(0.5)
    assert c.first("bravo", "peer-dead") == 102.0
    assert c.holders("web") == {"bravo"}
    assert "never heard from within initdead (2000 ms)" in c.reasons("bravo")


@BOTH
def test_warntime_warns_without_declaring_dead_when_beats_resume(pump):
    c = settled(pump)
    for link in LINKS:
        c.cut_link(link)
    c.advance(0.45)  # silence = time since the last beat before the cut + 0.45 s + up to one keepalive
    c.heal()
    c.advance(1.0)
    assert c.first("bravo", "peer-warn") is not None
    assert c.first("bravo", "peer-dead") is None
    assert c.status("bravo")["peers"]["alpha"]["state"] == "up"
    assert c.holders("web") == {"alpha"}


@BOTH
def test_node_that_sees_no_ping_node_never_takes_over(pump):
    c = cluster(pump, ping=("10.0.0.254",))
    c.nodes["alpha"].sees_pings = {"10.0.0.254"}
    c.advance(1.0)
    for link in LINKS:
        c.cut_link(link)
    c.advance(3.0)
    assert c.first("bravo", "peer-dead") is not None
    assert c.holders("web") == {"alpha"}
    notes = c.notices("bravo", "cannot-take-over")
    assert len(notes) == 1  # said once, not on every tick
    assert "never takes over while it sees none" in notes[0][1].detail


@BOTH
def test_node_that_sees_fewer_ping_nodes_yields_the_group(pump):
    c = cluster(pump, ping=("10.0.0.254", "10.0.0.253"))
    c.nodes["alpha"].sees_pings = {"10.0.0.254", "10.0.0.253"}
    c.nodes["bravo"].sees_pings = {"10.0.0.254", "10.0.0.253"}
    c.advance(1.5)
    assert c.holders("web") == {"alpha"}
    c.nodes["alpha"].sees_pings = {"10.0.0.254"}  # alpha loses one ping node
    c.advance(2.0)
    assert c.holders("web") == {"bravo"}
    assert "the node that sees fewer yields" in c.reasons("alpha")
    assert c.status("alpha")["ping"]["should_yield"] is True


@BOTH
def test_ping_group_counts_as_one_when_any_member_answers(pump):
    c = cluster(pump, ping_groups=(("uplinks", ("10.0.0.1", "10.0.0.2")),))
    c.nodes["alpha"].sees_pings = {"10.0.0.2"}
    c.nodes["bravo"].sees_pings = {"10.0.0.1", "10.0.0.2"}
    c.advance(1.5)
    assert c.status("alpha")["ping"]["count"] == 1
    assert c.status("bravo")["ping"]["count"] == 1
    assert c.holders("web") == {"alpha"}  # equal counts: the preferred node keeps it


@BOTH
def test_preferred_node_without_ping_lets_the_other_start(pump):
    """alpha sees no ping node from its start: once initdead (2 s) passed without a reply it says so, and bravo
    takes its group; before that, alpha's silence could be a slow start, and nobody takes it."""
    c = cluster(pump, ping=("10.0.0.254",))
    c.nodes["bravo"].sees_pings = {"10.0.0.254"}
    c.advance(1.5)  # past deadtime, before initdead
    assert c.holders("web") == set()
    c.advance(1.0)
    assert c.holders("web") == {"bravo"}
    assert "sees fewer ping nodes" in c.reasons("bravo")


@BOTH
def test_a_first_echo_reply_later_than_deadtime_at_start_keeps_the_group_on_its_preferred_node(pump):
    """Both boot together and alpha's first echo reply comes 1.5 s after its start: past deadtime, within
    initdead. alpha does not say "none" meanwhile, so bravo does not take alpha's group for "fewer" (where
    auto_failback is off, bravo would have kept it)."""
    c = cluster(pump, ping=("10.0.0.254",))
    c.nodes["bravo"].sees_pings = {"10.0.0.254"}
    c.advance(1.5)
    c.nodes["alpha"].sees_pings = {"10.0.0.254"}
    c.advance(2.0)
    assert c.holders("web") == {"alpha"}
    assert not [op for op in c.nodes["bravo"].ops_log if op[3] == "start"], c.reasons("bravo")


@BOTH
def test_a_slow_first_ping_reply_on_the_preferred_node_does_not_hand_its_group_to_the_peer(pump):
    """Both start together; alpha's first replies are late (a loaded machine, ARP): until every ping node answered
    or deadtime passed, alpha says nothing about its count, so bravo does not take alpha's group for "fewer"."""
    c = cluster(pump, ping=("10.0.0.254",))
    c.nodes["bravo"].sees_pings = {"10.0.0.254"}
    c.advance(0.7)  # past two keepalives, before deadtime (1 s): alpha has no reply yet
    c.nodes["alpha"].sees_pings = {"10.0.0.254"}
    c.advance(2.0)
    assert c.holders("web") == {"alpha"}
    assert not [op for op in c.nodes["bravo"].ops_log if op[3] == "start"]
    assert "sees fewer ping nodes" not in c.reasons("bravo")


@BOTH
def test_peer_restart_is_seen_as_a_new_generation(pump):
    c = settled(pump)
    c.nodes["bravo"].running_daemon = False
    c.advance(0.3)
    c.restart("bravo", make_config("bravo"), generation=2, floors=None)
    c.advance(1.0)
    notes = c.notices("alpha", "peer-restarted")
    assert notes and "generation 1 -> 2" in notes[0][1].detail
    assert c.first("alpha", "peer-dead") is None
    assert c.status("alpha")["peers"]["bravo"]["generation"] == 2


@BOTH
def test_a_restart_in_place_asks_the_peer_to_wait_and_a_restart_that_never_comes_back_is_dead_after_grace(pump):
    c = settled(pump)
    assert c.holders("web") == {"alpha"}
    c.deliver(E.Restarting(3000), "alpha")
    c.advance(0.01)
    c.nodes["alpha"].running_daemon = False  # re-executing: silent for 2.5 s, longer than deadtime
    c.advance(2.5)
    assert c.first("bravo", "peer-dead") is None and c.holders("web") == {"alpha"}
    assert "alpha is restarting in place: waiting up to 3000 ms for its new daemon" in c.reasons("bravo")
    c.restart("alpha", make_config("alpha"), generation=2, floors=None)
    c.advance(2.0)
    assert c.first("bravo", "peer-dead") is None and c.status("bravo")["peers"]["alpha"]["alive"] is True
    assert c.holders("web") == {"alpha"} and c.overlaps == []
    # The next restart never comes back: dead once the grace has run out, not at deadtime.
    t0 = c.now
    c.deliver(E.Restarting(3000), "alpha")
    c.advance(0.01)
    c.nodes["alpha"].running_daemon = False
    c.advance(5.0)
    dead = c.first("bravo", "peer-dead")
    assert dead is not None and 2.9 <= dead - t0 <= 3.3, dead - t0
    assert "bravo" in c.holders("web")


@BOTH
def test_replays_from_before_a_restart_prove_nothing(pump):
    c = settled(pump)
    old = [(link, data) for t, to, link, data in c.wire_log if to == "bravo"]
    c.nodes["alpha"].running_daemon = False  # alpha dies
    c.nodes["bravo"].running_daemon = False
    gens = c.nodes["bravo"].engine.verifier.generations()
    c.restart("bravo", make_config("bravo"), generation=2, floors=gens)  # bravo restarts and remembers floors
    c.advance(0.5)
    for link, data in old:  # an attacker replays everything alpha ever sent
        c.deliver(E.PacketReceived(link, data), "bravo")
    c.advance(2.5)
    assert c.status("bravo")["peers"]["alpha"]["alive"] is False
    assert "bravo" in c.holders("web")  # it took over once initdead passed without a genuine beat
    counters = c.status("bravo")["counters"]
    assert counters.get("unechoed", 0) > 0
    assert c.first("bravo", "peer-up") is None


@BOTH
def test_planned_shutdown_hands_over_without_waiting_for_deadtime(pump):
    c = settled(pump)
    t0 = c.now
    c.deliver(E.Shutdown(), "alpha")
    c.advance(2.0)
    assert c.nodes["alpha"].running_daemon is False
    left = c.first("bravo", "peer-left")
    assert left is not None and left - t0 < 0.3
    assert c.holders("web") == {"bravo"}
    assert c.first("bravo", "peer-dead") is None
    # never both at once: alpha had stopped before bravo started
    stop_done = [t for t, d in c.nodes["alpha"].log if "group web stopped" in d.reason][0]
    start = [t for t, d in c.nodes["bravo"].log for a in d.actions if isinstance(a, A.StartGroup)][0]
    assert stop_done <= start


@BOTH
def test_dual_claim_after_a_partition_heals_is_reported(pump):
    c = settled(pump)
    for link in LINKS:
        c.cut_link(link)
    c.advance(3.0)
    assert c.holders("web") == {"alpha", "bravo"}
    c.heal()
    c.advance(1.0)
    for n in ("alpha", "bravo"):
        notes = c.notices(n, "dual-claim")
        assert len(notes) == 1
        assert "both nodes claim group web" in notes[0][1].detail


@BOTH
def test_every_non_routine_decision_has_a_reason(pump):
    c = settled(pump)
    for link in LINKS:
        c.cut_link(link)
    c.advance(3.0)
    for n in ("alpha", "bravo"):
        for _, d in c.nodes[n].log:
            if not d.routine:
                assert d.reason, d


@BOTH
def test_rejected_garbage_is_counted_and_changes_nothing(pump):
    c = settled(pump)
    for junk in (b"", b"HA", b"\x00" * 200, bytes(range(256))):
        d = c.deliver(E.PacketReceived(LINKS[0], junk), "bravo")
        assert [a.kind for a in d.actions if isinstance(a, A.Notify)] == ["rejected"]
    c.advance(1.0)
    assert c.status("bravo")["counters"]["malformed"] == 4
    assert c.holders("web") == {"alpha"}


@BOTH
def test_reload_changes_timing_and_says_what_changed(pump):
    c = settled(pump)
    new = make_config("bravo", timing=Timing(100, 300, 600, 1200))
    d = c.deliver(E.Reload(new), "bravo")
    assert "keepalive 200 ms" in d.reason and "keepalive 100 ms" in d.reason
    for link in LINKS:
        c.cut_link(link)
    c.advance(2.0)
    last_beat = max(t for t, to, _, _ in c.wire_log if to == "bravo")
    assert abs(c.first("bravo", "peer-dead") - last_beat - 0.6) < 0.001


def test_key_rotation_accepts_old_key_while_signing_with_new():
    from hastore.config.model import AuthAlgorithm, AuthKey
    k2 = AuthKey(2, AuthAlgorithm.SHA256, b"new secret")
    from fakecluster import KEY
    cfg = {"alpha": make_config("alpha", keys=(KEY, k2), active_key=2),
           "bravo": make_config("bravo", keys=(KEY, k2), active_key=1)}
    c = FakeCluster(cfg)
    c.advance(1.0)
    assert c.status("alpha")["peers"]["bravo"]["alive"] and c.status("bravo")["peers"]["alpha"]["alive"]


# --- quiet mode: arrival times and the news flag ------------------------------------------------

def _beats(engine, now: float) -> list[A.Send]:
    """The datagrams of the engine's next beat, due at `now` (give or take float rounding)."""
    return [a for a in engine.handle(E.Tick(), max(now, engine.next_beat)).actions if isinstance(a, A.Send)]


def _pair_after(seconds: float):
    """alpha and bravo (no groups, no pings), fed each other's beats over both links every keepalive."""
    from hastore.core.engine import Engine
    alpha = Engine(make_config("alpha", groups=()), 1, 0.0)
    bravo = Engine(make_config("bravo", groups=()), 2, 0.0)
    now = 0.0
    while now < seconds:
        for src, dst in ((alpha, bravo), (bravo, alpha)):
            for s in _beats(src, now):
                dst.handle(E.PacketReceived(s.link, s.data), now + 0.001)
        now += 0.2
    return alpha, bravo, now


def test_the_kernels_receive_time_not_the_reading_decides_when_the_peer_is_dead():
    """A datagram read 150 ms after it came (drained on the beat timer) counts from when it came: the peer is
    declared dead deadtime after that, not deadtime after the reading."""
    alpha, bravo, now = _pair_after(2.0)
    last = _beats(bravo, now)
    came = now + 0.001
    for s in last:  # the UDP copy with its stamp; the serial copy read late, its time unknown
        late = s.link.startswith("serial")
        alpha.handle(E.PacketReceived(s.link, s.data, None if late else came, late), now + 0.15)
    assert alpha.membership.alive("bravo")
    for link in LINKS:
        assert alpha.membership.peers["bravo"].links[link].last_heard == came  # the serial copy: its twin's time
    d = alpha.handle(E.Tick(), came + 0.999)
    assert alpha.membership.alive("bravo"), d.reason
    d = alpha.handle(E.Tick(), came + 1.0)
    assert not alpha.membership.alive("bravo") and "no beat for 1000 ms" in d.reason, d.reason


def test_a_late_frame_without_a_timed_copy_counts_from_its_reading():
    """Over serial alone (UDP down) the time a frame came is not known: it counts from when it was read, which
    is later than the truth, so the peer is never declared dead early."""
    alpha, bravo, now = _pair_after(2.0)
    serial = [s for s in _beats(bravo, now) if s.link.startswith("serial")]
    alpha.handle(E.PacketReceived(serial[0].link, serial[0].data, None, True), now + 0.15)
    assert alpha.membership.peers["bravo"].links[serial[0].link].last_heard == now + 0.15


def test_only_news_is_flagged_as_news():
    from hastore.core.wire import FLAG_NEWS, FLAGS_OFFSET
    alpha, bravo, now = _pair_after(2.0)
    routine = _beats(alpha, now)
    assert routine and all(s.data[FLAGS_OFFSET] == 0 for s in routine)  # the same beat as the last one
    alpha.handle(E.Shutdown(), now + 0.05)  # a beat that says "leaving", then a LEAVE: both are news
    sent = [a for a in alpha.handle(E.Tick(), now + 0.2).actions if isinstance(a, A.Send)]
    assert sent and all(s.data[FLAGS_OFFSET] & FLAG_NEWS for s in sent)
    assert all(f[FLAGS_OFFSET] & FLAG_NEWS for f in alpha.farewell())


@BOTH
def test_the_guard_gets_more_time_only_while_the_peer_is_down(pump):
    """guard_timeout while the peer may take over (alive, or not heard from yet); initdead - keepalive once it is
    dead or has left: it waits initdead for our beats when it comes back, and its first beat ends the long wait."""
    c = cluster(pump)
    alpha = c.nodes["alpha"].engine
    assert alpha.guard_timeout()[0] == 800  # initdead: the peer may be up and about to hear us
    c.advance(1.0)
    ms, why = alpha.guard_timeout()
    assert ms == 800 and why.startswith("800 ms (guard_timeout)")
    c.nodes["bravo"].running_daemon = False  # bravo crashes: alpha declares it dead after deadtime
    c.advance(0.7)
    assert alpha.guard_timeout()[0] == 800
    c.advance(0.7)
    ms, why = alpha.guard_timeout()
    assert ms == 1800, why
    assert why == ("1800 ms (initdead - keepalive): bravo is down, and after it comes back it waits initdead "
                   "(2000 ms) for this node's beats before it takes any group")
    c.restart("bravo", make_config("bravo"), generation=2, floors=None)
    c.advance(0.3)
    assert alpha.guard_timeout()[0] == 800
    # a clean leave counts as down too
    c.deliver(E.Shutdown(), "bravo")
    c.advance(1.0)
    assert c.first("alpha", "peer-left") is not None
    assert alpha.guard_timeout()[0] == 1800


def test_while_all_is_well_the_engine_needs_what_arrived_only_once_a_link_could_turn_warn():
    """needs_input: the daemon leaves routine beats unread on a beat tick while the engine says it can decide
    without them, and reads them on the first tick after warntime at the latest."""
    alpha, bravo, now = _pair_after(2.0)
    last = max(lt.last_heard for lt in alpha.membership.peers["bravo"].links.values())
    assert not alpha.needs_input(last + 0.2) and not alpha.needs_input(last + 0.499)
    assert alpha.needs_input(last + 0.5)  # a link would turn warn now: read first
    alpha.handle(E.Tick(), last + 0.5)
    assert alpha.membership.peers["bravo"].state.value == "warn"  # nothing was fed: warn at this tick
    assert alpha.needs_input(last + 0.5)  # and while a link is not up, every tick reads
    fresh = Engine(make_config("alpha", groups=()), 1, 0.0)
    assert fresh.needs_input(0.0)  # no link is up yet


def test_a_ping_node_that_is_not_seen_or_expires_before_the_next_tick_needs_what_arrived():
    ping = "10.0.0.254"
    alpha = Engine(make_config("alpha", groups=(), ping=(ping,)), 1, 0.0)
    bravo = Engine(make_config("bravo", groups=(), ping=(ping,)), 2, 0.0)
    now = 0.0
    while now < 2.0:
        for src, dst in ((alpha, bravo), (bravo, alpha)):
            for s in _beats(src, now):
                dst.handle(E.PacketReceived(s.link, s.data), now + 0.001)
        alpha.handle(E.PingReply(ping, at=now + 0.0005), now + 0.15)  # read late: counts from its arrival
        now += 0.2
    replied = now - 0.2 + 0.0005
    assert alpha.pings.last_reply[ping] == replied
    assert not alpha.needs_input(now + 0.1)
    assert alpha.pings.visible(ping, replied + 0.999) and not alpha.pings.visible(ping, replied + 1.0)
    while now < replied + 0.85:  # the beats go on, the ping node falls silent
        for src, dst in ((alpha, bravo), (bravo, alpha)):
            for s in _beats(src, now):
                dst.handle(E.PacketReceived(s.link, s.data), now + 0.001)
        assert alpha.needs_input(now + 0.002) is (replied + 1.0 < now + 0.202), now - replied
        now += 0.2
    lone = Engine(make_config("alpha", groups=(), ping=(ping,)), 1, 0.0)
    assert lone.needs_input(5.0)  # no reply yet: every tick reads


def test_serial_frames_read_together_find_the_times_of_their_udp_copies():
    """Several beats read in one go (on a tick after warntime): each late serial frame takes its UDP copy's
    kernel time, so the serial link is as fresh as its newest frame, not as the reading."""
    alpha, bravo, now = _pair_after(2.0)
    held = []
    for i in range(3):
        held.append((_beats(bravo, now + 0.2 * i), now + 0.2 * i + 0.001))
    for sends, came in held:  # the UDP copies first (the daemon drains UDP first), then the serial frames
        for s in sends:
            if not s.link.startswith("serial"):
                alpha.handle(E.PacketReceived(s.link, s.data, came), now + 0.55)
    for sends, came in held:
        for s in sends:
            if s.link.startswith("serial"):
                alpha.handle(E.PacketReceived(s.link, s.data, None, True), now + 0.55)
    newest = held[-1][1]
    assert {l: lt.last_heard for l, lt in alpha.membership.peers["bravo"].links.items()} == {l: newest for l in LINKS}


@BOTH
def test_beats_read_on_a_late_tick_are_decided_on_with_it(pump):
    """A beat tick late past warntime reads the UDP link's beats, then the serial frames. Taken in without a pass
    each (PacketReceived.more, as the daemon's beat timer feeds them), the tick decides with all of them: nothing is
    warned about. A pass on the first packet that changed a state (the UDP link back from warn) judged the serial
    link before its frames were read: it warned, and the next frame brought it back up."""
    udp, serial = LINKS

    def late_read(more: bool) -> list[A.Decision]:
        alpha, bravo, now = _pair_after(2.0)
        for _ in range(4):  # alpha hears bravo over serial only for 0.8 s: its UDP link turns warn
            for s in _beats(alpha, now):
                bravo.handle(E.PacketReceived(s.link, s.data), now + 0.001)
            for s in _beats(bravo, now):
                if s.link == serial:
                    alpha.handle(E.PacketReceived(s.link, s.data), now + 0.001)
            now += 0.2
        assert alpha.membership.peers["bravo"].links[udp].state.value == "warn"
        held = [(_beats(bravo, now + 0.2 * i), now + 0.2 * i + 0.001) for i in range(3)]
        read_at = held[-1][1] + 0.15  # serial last heard 0.75 s before: past warntime until its frames are read
        decisions = [alpha.handle(E.PacketReceived(s.link, s.data, came, more=more), read_at)
                     for sends, came in held for s in sends if s.link == udp]
        decisions += [alpha.handle(E.PacketReceived(s.link, s.data, None, True, more=more), read_at)
                      for sends, _ in held for s in sends if s.link == serial]
        decisions.append(alpha.handle(E.Tick(), read_at))
        assert {l: lt.state.value for l, lt in alpha.membership.peers["bravo"].links.items()} == {udp: "up",
                                                                                                   serial: "up"}
        return decisions

    def kinds(decisions):
        return [(a.kind, a.link) for d in decisions for a in d.actions if isinstance(a, A.Notify)]

    assert kinds(late_read(more=True)) == [("link-up", udp)]
    assert ("link-warn", serial) in kinds(late_read(more=False))  # what a pass per packet did


def _twin_runs(scenario) -> tuple[FakeCluster, FakeCluster, int]:
    """The same scenario on two clusters: one as built, one whose engines never take the routine tick (every tick
    a full pass). Returns both and how many routine ticks the first took."""
    taken = [0]
    runs = []
    for routine in (True, False):
        c = cluster(ping=("10.0.0.254",))
        for node in c.nodes.values():
            node.sees_pings.add("10.0.0.254")
            engine = node.engine
            if routine:
                def counted(now, engine=engine, inner=engine._routine_tick):
                    taken[0] += 1
                    later = now + engine.config.timing.keepalive_ms / 1000
                    quick = engine.needs_input(later), engine.next_deadline()
                    engine.routine_until, kept = float("-inf"), engine.routine_until
                    assert quick == (engine.needs_input(later), engine.next_deadline())  # the shortcuts agree
                    engine.routine_until = kept
                    return inner(now)
                engine._routine_tick = counted
            else:
                engine._calm_until = lambda now: float("-inf")
        scenario(c)
        runs.append(c)
    return runs[0], runs[1], taken[0]


def test_the_routine_tick_decides_exactly_what_a_full_pass_would():
    """While all is well a beat tick skips the full pass (Engine._calm_until): byte for byte the same datagrams
    and the same decisions as full passes, through link loss, a partition, ping loss, a failing monitor and a
    standby."""
    def scenario(c):
        c.advance(3.0)
        c.cut_link(LINKS[0])
        c.advance(1.5)
        c.heal()
        c.advance(2.0)
        c.nodes["bravo"].sees_pings.clear()  # bravo sees no ping node for a while
        c.advance(2.5)
        c.nodes["bravo"].sees_pings.add("10.0.0.254")
        c.advance(2.0)
        c.nodes["alpha"].faults[("web", 0, "monitor")] = 7  # its resource fails: restarted in place
        c.advance(11.0)
        del c.nodes["alpha"].faults[("web", 0, "monitor")]
        c.advance(12.0)
        for link in LINKS:
            c.cut_link(link)
        c.advance(1.6)  # both declare the other dead: a dual claim once healed
        c.heal()
        c.advance(3.0)
        c.deliver(E.Admin("standby", "all"), "alpha")
        c.advance(3.0)

    fast, full, taken = _twin_runs(scenario)
    assert taken > 100  # most ticks of a calm cluster are routine
    for name in ("alpha", "bravo"):
        assert fast.nodes[name].log == full.nodes[name].log, name
        assert fast.nodes[name].ops_log == full.nodes[name].ops_log, name
    assert fast.wire_log == full.wire_log
    assert fast.first("bravo", "peer-dead") is not None and fast.first("alpha", "dual-claim") is not None


@pytest.mark.parametrize("seed", range(12))
def test_the_routine_tick_matches_full_passes_through_random_trouble(seed):
    """Random cuts (one link, all, one way), ping loss, failing monitors and starts, operator commands and a
    shutdown, the same on both twins: the same decisions and datagrams."""
    def scenario(c):
        rng = random.Random(seed)
        c.advance(3.0)
        for _ in range(14):
            what = rng.choice(["cut", "cut-all", "cut-one-way", "heal", "pings", "monitor", "start", "admin",
                               "wait"])
            who = rng.choice(["alpha", "bravo"])
            if what == "cut":
                c.cut_link(rng.choice(LINKS))
            elif what == "cut-all":
                for link in LINKS:
                    c.cut_link(link)
            elif what == "cut-one-way":
                c.cut_link(rng.choice(LINKS), who)
            elif what == "heal":
                c.heal()
            elif what == "pings":
                pings = c.nodes[who].sees_pings
                pings.symmetric_difference_update({"10.0.0.254"})
            elif what in ("monitor", "start"):
                key = ("web", 0, what)
                faults = c.nodes[who].faults
                faults.pop(key) if key in faults else faults.update({key: rng.choice([1, 7])})
            elif what == "admin":
                c.deliver(E.Admin(rng.choice(["standby", "takeover"]), rng.choice(["all", "local", "foreign"])),
                          who)
            c.advance(rng.uniform(0.05, 4.0))
        if rng.random() < 0.5:
            c.heal()
            c.deliver(E.Shutdown(), rng.choice(["alpha", "bravo"]))
            c.advance(3.0)

    fast, full, taken = _twin_runs(scenario)
    assert taken > 0
    for name in ("alpha", "bravo"):
        assert fast.nodes[name].log == full.nodes[name].log, name
        assert fast.nodes[name].ops_log == full.nodes[name].ops_log, name
    assert fast.wire_log == full.wire_log


# --- the beat pump: routine beats handed to the shell (Engine.plan) ----------------------------


def test_a_calm_cluster_hands_its_beats_to_the_pump_and_its_engines_rest():
    runs = {}
    for pump in (0.0, 5.0):
        c = settled(pump)
        handled = {n: c.nodes[n].handled for n in c.nodes}
        sent = len(c.wire_log)
        c.advance(20.0)
        runs[pump] = {n: c.nodes[n].handled - handled[n] for n in c.nodes}, len(c.wire_log) - sent
        assert c.holders("web") == {"alpha"} and not c.notices("bravo", "link-warn")
    (ticks, beats_ticked), (pumped, beats_pumped) = runs[0.0], runs[5.0]
    assert beats_pumped == beats_ticked == 2 * 2 * 100  # both nodes, both links, every 200 ms
    assert all(n >= 300 for n in ticks.values())  # every beat, every datagram read
    assert all(n <= 25 for n in pumped.values()), pumped  # a plan's end every 5 s, alpha's monitor every 10 s


def test_planned_beats_are_the_routine_beats_the_peer_expects():
    c = settled(5.0)
    alpha, bravo = c.nodes["alpha"], c.nodes["bravo"]
    assert alpha.plan is not None and bravo.plan is not None
    planned = [a.data for _, actions in alpha.plan.beats for a in actions if isinstance(a, A.Send)]
    assert len(planned) == 2 * len(alpha.plan.beats) and set(planned) <= set(bravo.plan.expected["alpha"])
    assert len(bravo.plan.expected["alpha"]) == len(alpha.plan.beats) + 8


def test_a_stopped_process_sends_no_stale_beats_when_it_resumes():
    c = settled(5.0)
    c.nodes["alpha"].frozen = True  # SIGSTOP: the pump stops with the engine
    stopped = c.now
    c.advance(3.0)
    assert c.first("bravo", "peer-dead") is not None
    c.nodes["alpha"].frozen = False
    c.advance(0.001)
    burst = [d for t, to, _, d in c.wire_log if to == "bravo" and t > stopped]
    assert len(burst) <= 2  # one beat over each link, from the engine that saw the stall: not the plan's backlog
    assert c.nodes["alpha"].engine.planned is None or c.nodes["alpha"].plans > 1


def test_an_unexpected_datagram_wakes_the_engine_at_once():
    c = settled(5.0)
    assert c.nodes["bravo"].plan is not None
    c.schedule(c.now + 0.0001, "bravo", E.PacketReceived(LINKS[0], b"HA" + bytes(60)))
    c.advance(0.001)
    assert [t for t, n in c.notices("bravo", "rejected")] == [pytest.approx(c.now - 0.0009)]
