"""The decision core: events in, actions out, a reason with every decision. No I/O, no clock.

    engine = Engine(config, generation, now)
    decision = engine.handle(event, now)      # Decision(actions, reason)
    engine.next_deadline()                    # when to call handle(Tick(), now) next

The engine signs and verifies every datagram itself (hastore.core.wire), so two engines joined by a fake
network of byte strings make a whole cluster in a unit test.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from hastore.config.model import AutoFailback, Config, Group
from hastore.core import actions as A
from hastore.core import events as E
from hastore.core.arbitration import PingView
from hastore.core.membership import EPS, Change, Liveness, Membership
from hastore.core.resources import GroupOps, Outcome, Policy
from hastore.core.wire import Message, MsgType, Verdict, Verifier, encode, signing_key


class GroupState(enum.Enum):
    PROBING = "probing"  # at start: asking every resource whether it already runs here
    STOPPED = "stopped"
    STARTING = "starting"
    STARTED = "started"
    STOPPING = "stopping"
    FAILED = "failed"  # failed here (start, or monitoring gave up): the peer may take it; retried here only
    #                    when the peer is not alive
    STOP_FAILED = "stop-failed"  # resources may still be held: keep claiming so the peer never starts it


FAREWELL_SEQ = 1 << 63  # the guard's LEAVE (see farewell): above any sequence number the daemon itself reaches
MAX_RESTART_GRACE_MS = 60_000  # a peer's restart grace beyond this is ignored (it stays dead after deadtime)
ARRIVALS_KEPT = 16  # per peer: the arrival times of its newest messages with a kernel time (see _arrival)
CLAIMING = {GroupState.STARTING, GroupState.STARTED, GroupState.STOPPING, GroupState.STOP_FAILED}


@dataclass
class GroupTrack:
    spec: Group
    state: GroupState = GroupState.STOPPED
    reason: str = "not started yet"
    failed_at: float | None = None


@dataclass
class PeerInfo:
    """What the peer told us in its last accepted beat."""

    generation: int | None = None
    claims: frozenset[str] = frozenset()
    ping_count: int | None = None
    failed: frozenset[str] = frozenset()  # groups that failed on the peer
    standby: frozenset[str] = frozenset()  # groups the peer was told to give away
    status: str = ""
    restart_generation: int | None = None  # the generation that said it restarts (logged once)
    left_generation: int | None = None  # the generation that said goodbye: its late beats prove nothing
    seen_rids: set[int] = field(default_factory=set)


@dataclass
class Pending:
    """A reliable message awaiting its acknowledgement."""

    type: MsgType
    dst: str
    body: dict
    next_try: float
    give_up: float


NEVER = float("-inf")  # Engine.routine_until when the next tick must be a full pass


def _reason(why: list[str]) -> str:
    """A decision's reason: its sentences, in order."""
    return "; ".join(w for w in why if w)


class Engine:
    def __init__(self, config: Config, generation: int, now: float, floors: dict[str, int] | None = None,
                 policy: Policy | None = None):
        self.config = config
        self.node = config.node
        self.generation = generation
        self.seq = 0
        self.rid = 0
        self.verifier = Verifier(config.auth, config.node, config.nodes, floors or {})
        self.links = tuple(l.id for l in config.links)
        self.membership = Membership(config.peers, self.links, config.timing, now)
        self.pings = PingView(config.ping_nodes, config.ping_groups, config.timing.deadtime_ms / 1000)
        self.peer_info = {p: PeerInfo() for p in config.peers}
        self.groups = {g.name: GroupTrack(g, GroupState.PROBING, "probing its resources") for g in config.groups}
        self.ops = {g.name: GroupOps(g, policy or Policy()) for g in config.groups}
        self.standby: set[str] = set()  # groups an operator moved away from this node
        self.probed = False
        self.restart_grace_ms = 0  # set by Restarting: beats ask the peer to wait this long for our next image
        self.outbox: dict[int, Pending] = {}
        self.next_beat = now
        self.leaving = False
        self.exit_at: float | None = None
        self.unechoed = 0
        self.first_heard: dict[str, dict[tuple[int, int], float]] = {}  # per peer: (generation, seq) -> arrival
        self.last_beat_body: dict | None = None  # what our previous beat said (a beat saying the same is no news)
        # Until when a beat tick needs no full pass (see _routine_tick): set after a pass that found all well.
        self.routine_until = NEVER
        self.planned: A.Plan | None = None  # beats the shell sends on its own (plan) until it hands them back
        self.plan_seq = 0  # our seq before the planned beats
        self.reported: set[tuple[str, str]] = set()  # one-shot notices, cleared when the condition ends
        # What this node knows it cannot use, and since when: links whose sends fail for a local reason, ping
        # nodes it has no route to (see _isolated).
        self.links_down: dict[str, float] = {}
        self.unroutable: dict[str, float] = {}
        # Since when silence from the ping nodes means something: the start, a new set of ping nodes, or the end
        # of a stall (no echo requests went out while the engine did not run, so no replies could come back).
        self.pings_since = now
        self.now = now

    # ------------------------------------------------------------------------------------------
    @property
    def peer(self) -> str | None:
        return self.config.peers[0] if self.config.peers else None

    def handle(self, event: E.Event, now: float) -> A.Decision:
        if self.planned is not None:
            self.unplan(sum(1 for due, _ in self.planned.beats if due <= now))  # the shell should have said
        if now - self.now > 2 * self.config.timing.keepalive_ms / 1000:
            self.pings_since = now  # it runs at least every keepalive (our beat's tick): it was stalled
            self.routine_until = NEVER
        self.now = now
        if type(event) is E.Tick and self.routine_until > NEVER:
            if now >= self.routine_until:
                # Calm was found to last until a moment now past, and since then nothing changed the state (the
                # routine packets and echo replies read at this tick only made the times heard later): ask again.
                self.routine_until = self._calm_until(now)
            if now < self.routine_until:
                return self._routine_tick(now)
        out: list[A.Action] = []
        why: list[str] = []
        if isinstance(event, E.PacketReceived):
            if self._on_packet(event, now, out, why) and not out and not why and self.probed:
                # The same message again over another link, or a beat that says what the last one said: no
                # state changed, nothing to decide (nearly every packet while all is well). The time-driven
                # checks run at next_deadline(), and our own beat's tick runs the whole pass every keepalive.
                return A.Decision()
        elif isinstance(event, E.PingReply):
            still = self.pings.visible(event.address, now)
            self.pings.reply(event.address, now if event.at is None else min(event.at, now))
            if still and self.probed:
                return A.Decision()  # a ping node that was visible stays visible: the count did not change
        elif isinstance(event, (E.LinkState, E.PingRoute)):
            self._local_state(event, now, why)
        elif isinstance(event, E.LinkTrouble):
            out.append(A.Notify("link-trouble", f"link {event.link}: {event.detail}", link=event.link))
            why.append(f"link {event.link} reports trouble: {event.detail}")
        elif isinstance(event, E.AgentDone):
            self._on_agent_done(event, now, out, why)
        elif isinstance(event, E.Admin):
            self._on_admin(event, now, out, why)
        elif isinstance(event, E.Shutdown):
            if not self.leaving:
                self.leaving = True
                why.append("shutdown requested: releasing groups, then telling the peer")
        elif isinstance(event, E.Restarting):
            self.restart_grace_ms = event.grace_ms
            self.next_beat = now  # the peer hears it before we go
            why.append(f"restarting in place: asking the peer to wait up to {event.grace_ms} ms for the new daemon "
                       f"before it declares this node dead")
        elif isinstance(event, E.Reload):
            why.append(self._reload(event.config))
        if isinstance(event, (E.PacketReceived, E.PingReply)) and event.more:
            # Read on the beat tick, which decides next: what this input decided itself goes out (an
            # acknowledgement, a notice, a state it changed); the tick runs the whole pass on it with the rest read.
            self.routine_until = NEVER
            return A.Decision(tuple(out), _reason(why))
        if not self.probed:
            self._probe(now, out, why)
        self._membership_changes(self.membership.tick(now), out, why)
        for name, ops in self.ops.items():
            out.extend(ops.tick(now))
        if self.leaving:
            self._leave(now, out, why)
        else:
            self._place(now, out, why)
        beat = now >= self.next_beat  # this pass builds the beat from what it found
        self._send_due(now, out)
        if self.exit_at is not None and now >= self.exit_at:
            out.append(A.Exit(0))
        reason = _reason(why)
        calm = beat and not reason and all(isinstance(a, (A.Send, A.Ping)) for a in out)
        self.routine_until = self._calm_until(now) if calm else NEVER
        return A.Decision(tuple(out), reason)

    def plan(self, now: float, horizon: float, spare: int = 8) -> A.Plan | None:
        """The routine beats due from now until the calm found by the last full pass could end for a reason other
        than what is heard, at most `horizon` seconds ahead: signed now, for the shell to send on its own while
        the engine does not run (see Plan). None when not calm, or when no beat falls in that stretch. The beats
        take their sequence numbers now; those the shell did not send go to the beats that follow (unplan), so
        the peer's next routine beats stay in line with what it expects of us. The peer's next
        `len(beats) + spare` routine beats are expected (its clock and phase are not ours)."""
        if self.planned is not None or self.routine_until == NEVER or self.last_beat_body is None:
            return None
        until = min(self._calm_until(now, watched=True), now + horizon)
        if until <= now:
            return None
        keepalive, warntime = self.config.timing.keepalive_ms / 1000, self.config.timing.warntime_ms / 1000
        links = {(peer, link): (lt.last_heard + warntime, warntime)
                 for peer, track in self.membership.peers.items() for link, lt in track.links.items()}
        pings = {a: (last + self.pings.window_s, self.pings.window_s) for a, last in self.pings.last_reply.items()
                 if last + self.pings.window_s > now}
        if min((d for d, _ in (*links.values(), *pings.values())), default=until) <= now:
            return None  # already past a condition: the engine decides first
        beats, self.plan_seq = [], self.seq
        while self.next_beat < until:
            out: list[A.Action] = []
            self._broadcast(MsgType.BEAT, "", self.last_beat_body, out)
            out.extend(A.Ping(a) for a in self.pings.addresses())
            beats.append((self.next_beat, tuple(out)))
            self.next_beat += keepalive
        if not beats:
            return None
        self.planned = A.Plan(tuple(beats), until, links, pings, self.verifier.expect(len(beats) + spare), keepalive)
        return self.planned

    def unplan(self, sent: int) -> None:
        """The shell stopped sending the planned beats after `sent` of them (a beat it began to send counts, even
        if a link failed it): the next beat is the first unsent, with its sequence number. The unsent ones never
        left this process, so no datagram with those numbers was seen anywhere."""
        planned, self.planned = self.planned, None
        if planned is None:
            return
        self.seq = self.plan_seq + min(max(sent, 0), len(planned.beats))
        if sent > 0:  # the engine did not run meanwhile, but it was not stalled: its beats and pings went out
            self.now = max(self.now, planned.beats[min(sent, len(planned.beats)) - 1][0])
        if sent < len(planned.beats):
            self.next_beat = planned.beats[max(sent, 0)][0]

    def _calm_until(self, now: float, watched: bool = False) -> float:
        """After a full pass that decided nothing but sent a beat: until when another would decide nothing either
        and send the same beat, as long as only beat ticks come and events that change no state (routine beats,
        echo replies from visible ping nodes: they only make times heard later, so once that time is past a tick
        asks again); any other event goes through a full pass, which sets this anew (one that sends no beat
        leaves the next tick a full pass, to build the beat). Only while all is well: probed and not leaving,
        every group started or stopped with nothing in flight, the peer alive on every link and in no restart
        grace, nothing awaiting an acknowledgement, no local link or route down, every ping node visible. Then,
        with the same inputs, the full pass could only change its mind at a time: a link turning warn or dead,
        a ping node's reply expiring, a monitor coming due."""
        peer = self.peer
        if (not self.probed or self.leaving or self.exit_at is not None or self.outbox or self.restart_grace_ms
                or self.links_down or self.unroutable or peer is None or not self.membership.alive(peer)):
            return NEVER
        if any(g.state not in (GroupState.STARTED, GroupState.STOPPED) for g in self.groups.values()):
            return NEVER
        if any(t.grace_until is not None for t in self.membership.peers.values()):
            return NEVER
        calm = self.membership.calm_until()
        if calm is None:
            return NEVER
        times = [float("inf") if watched else calm]
        if self.pings.configured:
            if not self._pings_settled(now) or self.pings.count(now) < self.pings.configured:
                return NEVER
            if not watched:
                times.append(self.pings.next_expiry(now) or NEVER)
        for ops in self.ops.values():
            if ops.busy or ops.inflight is not None:
                return NEVER
            t = ops.next_deadline()
            if t is not None:
                times.append(t)
        dies = self.membership.next_deadline()
        if dies is not None and not watched:
            times.append(dies)
        return min(times)

    def _routine_tick(self, now: float) -> A.Decision:
        """A beat tick while all is well (see _calm_until): the beat the full pass would send (our last one: the
        echoed generation it carries cannot change while calm), and the pings."""
        out: list[A.Action] = []
        if now >= self.next_beat:
            self._broadcast(MsgType.BEAT, "", self.last_beat_body, out)
            out.extend(A.Ping(a) for a in self.pings.addresses())
            self.next_beat = now + self.config.timing.keepalive_ms / 1000
        return A.Decision(tuple(out))

    def needs_input(self, now: float) -> bool:
        """Whether the shell must hand over what it holds unread (routine beats and serial frames, echo replies:
        it reads those on the beat timer) before the engine decides at `now`. False only while all is well: every
        link of every peer up and not silent for warntime yet, no link death before the next tick, every ping
        node visible, not expiring before the next tick, and the ping count settled. The shell then sends the beat
        without reading: what is held is all routine (news wakes it at once), it carries the kernel's receive
        time, and it is read at the latest on the first tick after warntime, before anything could turn on it."""
        soon = now + self.config.timing.keepalive_ms / 1000 + EPS
        if soon < self.routine_until:
            return False  # calm beyond the next tick (see _calm_until): nothing to read before it
        calm = self.membership.calm_until()
        if calm is None or calm <= now + EPS:
            return True
        dies = self.membership.next_deadline()
        if dies is not None and dies < soon:
            return True
        if self.pings.configured:
            if not self._pings_settled(now) or self.pings.count(now) < self.pings.configured:
                return True
            expires = self.pings.next_expiry(now)
            if expires is not None and expires < soon:
                return True
        return False

    def next_deadline(self) -> float:
        if self.planned is not None:
            return self.planned.until  # the shell wakes the engine sooner when a condition of the plan fails
        if self.now < self.routine_until and self.next_beat <= self.routine_until:
            return self.next_beat  # every other deadline is at or after routine_until (see _calm_until)
        times = [self.next_beat]
        for t in (self.membership.next_deadline(), self.pings.next_expiry(self.now), self.exit_at):
            if t is not None:
                times.append(t)
        times += [p.next_try for p in self.outbox.values()]
        if self.links_down and self.unroutable:
            since = self._isolated_since()
            if since is not None and since + self.config.timing.warntime_ms / 1000 > self.now:
                times.append(since + self.config.timing.warntime_ms / 1000)  # when isolation starts to count
        times += [t for t in (ops.next_deadline() for ops in self.ops.values()) if t is not None]
        return min(times)

    # -- receiving ------------------------------------------------------------------------------
    def _on_packet(self, ev: E.PacketReceived, now: float, out: list, why: list) -> bool:
        """Returns True when the packet only refreshed its link: a duplicate, or a beat that repeats the last."""
        v = self.verifier.verify(ev.data, ev.link)
        if v.verdict not in (Verdict.OK, Verdict.DUPLICATE):
            out.append(A.Notify("rejected", f"{v.verdict.name.lower()} on {ev.link}: {v.detail}", link=ev.link))
            return
        msg = v.message
        info = self.peer_info[msg.src]
        if info.generation != msg.generation:
            if info.generation is not None:
                text = f"{msg.src} restarted (generation {info.generation} -> {msg.generation})"
                out.append(A.Notify("peer-restarted", text, peer=msg.src))
                why.append(text)
            else:
                why.append(f"first authentic message from {msg.src} (generation {msg.generation})")
            info.generation = msg.generation
            info.seen_rids.clear()
            out.append(A.PersistGenerations(self.verifier.generations()))
        if msg.body.get("e") != self.generation:
            # Authentic but not (yet) proof of life: the sender has not echoed our current generation, so this
            # could be a datagram recorded before we restarted. It taught us the sender's generation only.
            self.unechoed += 1
            return
        if info.left_generation == msg.generation:
            if msg.rid and v.verdict is Verdict.OK:
                self._acknowledge(msg, out)  # our first acknowledgement of its LEAVE may have been lost
            return  # a beat sent just before it left, or after: that process is going away
        arrival = self._arrival(ev, msg, v.verdict, now)
        self._membership_changes(self.membership.heard(msg.src, ev.link, arrival), out, why)
        if v.verdict is Verdict.DUPLICATE:
            return True  # the same message over a second link: proves that link alive, processed once already
        if msg.rid:
            self._acknowledge(msg, out)
            if msg.rid in info.seen_rids:
                return
            info.seen_rids.add(msg.rid)
        return self._dispatch(msg, info, now, out, why)

    def _arrival(self, ev: E.PacketReceived, msg: Message, verdict: Verdict, now: float) -> float:
        """When the message arrived, for liveness. The kernel's time when the shell has it; for a message read late
        at an unknown time (a serial line drained on the beat timer), the arrival of its copy over a link that
        has the time (the peer sends every message over all links at once; a serial frame lags it by its
        transmission time only), else now: later than the truth, so a link is never declared dead early."""
        arrival = now if ev.at is None else min(ev.at, now)
        if verdict is Verdict.OK:
            if not ev.late:
                heard = self.first_heard.setdefault(msg.src, {})
                heard[(msg.generation, msg.seq)] = arrival
                if len(heard) > ARRIVALS_KEPT:
                    del heard[next(iter(heard))]  # the oldest
        elif ev.late:
            # its own copy's (a frame whose copy was not kept keeps "now": later than the truth, which is safe)
            arrival = self.first_heard.get(msg.src, {}).get((msg.generation, msg.seq), arrival)
        return arrival

    def _dispatch(self, msg: Message, info: PeerInfo, now: float, out: list, why: list) -> bool:
        """Returns True for a beat that repeats what the peer's last beat said (nothing new to decide on)."""
        if msg.type is MsgType.BEAT:
            changed = self._on_beat(msg, info)
            rs = msg.body.get("rs")
            if isinstance(rs, int) and not isinstance(rs, bool) and 0 < rs <= MAX_RESTART_GRACE_MS:
                self.membership.grace(msg.src, now + rs / 1000)
                if info.restart_generation != msg.generation:
                    info.restart_generation = msg.generation
                    why.append(f"{msg.src} is restarting in place: waiting up to {rs} ms for its new daemon")
                return False
            # an ordinary beat (the new daemon's): the grace is over
            return not self.membership.grace(msg.src, None) and not changed
        elif msg.type is MsgType.ACK:
            pending = self.outbox.pop(msg.ack, None)
            if pending is not None and pending.type is MsgType.LEAVE and self.leaving:
                why.append(f"{msg.src} acknowledged our leaving")
                self.exit_at = now
        elif msg.type is MsgType.REQUEST and msg.body.get("kind") == "standby":
            groups = [g for g in _names(msg.body.get("groups")) if g in self.groups]
            why.append(f"{msg.src} asked to take over group(s) {', '.join(sorted(groups)) or 'none'}")
            self._standby(groups, now, out, why)
        elif msg.type is MsgType.LEAVE:
            info.claims = frozenset()
            info.left_generation = msg.generation
            said = "'s guard stopped its resources after its daemon died or froze" if msg.body.get("by") == "guard" \
                else " announced a clean shutdown"
            self._membership_changes(self.membership.left(msg.src, now, f"{msg.src}{said}"), out, why)

    def _on_beat(self, msg: Message, info: PeerInfo) -> bool:
        """Takes in what the beat says of the peer; True when that differs from what its last beat said."""
        before = (info.claims, info.ping_count, info.status, info.failed, info.standby)
        claims = msg.body.get("g", [])
        info.claims = frozenset(c for c in claims if isinstance(c, str)) if isinstance(claims, list) else frozenset()
        p = msg.body.get("p")
        info.ping_count = p if isinstance(p, int) and not isinstance(p, bool) else None
        info.status = str(msg.body.get("st", ""))
        info.failed = _names(msg.body.get("f"))
        info.standby = _names(msg.body.get("sb"))
        return before != (info.claims, info.ping_count, info.status, info.failed, info.standby)

    def _acknowledge(self, msg: Message, out: list) -> None:
        self._broadcast(MsgType.ACK, msg.src, {}, out, ack=msg.rid)

    def _membership_changes(self, changes: list[Change], out: list, why: list) -> None:
        for c in changes:
            kind = ("link-" if c.link else "peer-") + c.new.value
            if not c.link and c.new is Liveness.DEAD and self.membership.peers[c.peer].left_at is not None:
                kind = "peer-left"
            out.append(A.Notify(kind, c.reason, peer=c.peer, link=c.link))
            why.append(c.reason)

    # -- groups ---------------------------------------------------------------------------------
    def _probe(self, now: float, out: list, why: list) -> None:
        """Once, at start: ask every resource whether it already runs here (adopt rather than start twice)."""
        self.probed = True
        if self.ops:
            why.append(f"probing {len(self.ops)} group(s) for resources already running here")
        for name, ops in self.ops.items():
            actions, outcome = ops.probe(now)
            out.extend(actions)
            if outcome is not None:
                self._on_outcome(self.groups[name], outcome, now, out, why)

    def _on_agent_done(self, ev: E.AgentDone, now: float, out: list, why: list) -> None:
        ops = self.ops.get(ev.group)
        if ops is None:
            return
        actions, outcome = ops.on_result(ev.op, ev.index, ev.op_id, ev.rc, ev.detail, now)
        out.extend(actions)
        if ev.op == "monitor" and ev.rc != 0 and ops.busy and ops.op.kind in ("restart", "failover"):
            why.append(ops.op.failure)
            out.append(A.Notify("resource-failed", ops.op.failure, group=ev.group))
        if outcome is not None:
            self._on_outcome(self.groups[ev.group], outcome, now, out, why)

    def _on_outcome(self, g: GroupTrack, o: Outcome, now: float, out: list, why: list) -> None:
        name = g.spec.name
        if o.kind == "probed":
            if o.running:
                g.state = GroupState.STARTED
            elif any(r["state"] in ("started", "failed") for r in self.ops[name].status()):
                self._set(g, GroupState.STOPPING, o.reason, A.StopGroup(name), out, why)
                return
            else:
                g.state = GroupState.STOPPED
        elif o.kind in ("started", "restarted"):
            g.state = GroupState.STARTED
        elif o.kind == "stopped":
            g.state = GroupState.STOPPED
        elif o.kind in ("start-failed", "failover"):
            g.state, g.failed_at = GroupState.FAILED, now
        elif o.kind == "stop-failed":
            g.state = GroupState.STOP_FAILED
        g.reason = o.reason
        why.append(o.reason)
        if o.kind in ("start-failed", "failover", "stop-failed"):
            out.append(A.Notify("group-failed", o.reason, group=name))
        self.next_beat = now  # tell the peer what we hold now, not a keepalive later

    def link_alive(self, link: str) -> bool:
        """Whether some peer's beats arrive over `link` (up, or late but not yet dead)."""
        return any(t.links[link].state in (Liveness.UP, Liveness.WARN)
                   for t in self.membership.peers.values() if link in t.links)

    def guard_timeout(self) -> tuple[int, str]:
        """How long (ms) the guard lets the daemon be silent before it stops this node's resources, and why.

        While the peer is alive, or not heard from yet since this daemon started: the configured guard_timeout, as
        the peer declares this node dead deadtime after its last beat and starts the groups. Once the peer is dead
        or has left, nobody can start them before it comes back and has waited initdead for a beat from this node
        (see _place), so a silence shorter than initdead - keepalive is no reason to stop the services of a node
        that nobody could take them from: a loaded machine (a busy host under a VM) stalls a daemon for most of a
        second now and then. When the peer comes back, the first beat heard from it sets guard_timeout again."""
        t, short = self.config.timing, self.config.guard_timeout
        down = [p for p in self.config.peers if self.membership.state(p) is Liveness.DEAD]
        if not down or len(down) < len(self.config.peers):
            return short, (f"{short} ms (guard_timeout): the peer may take over deadtime after this node's last "
                           f"beat")
        who = " and ".join(down) + (" is" if len(down) == 1 else " are")
        long = max(short, t.initdead_ms - t.keepalive_ms)
        return long, (f"{long} ms (initdead - keepalive): {who} down, and after it comes back it waits initdead "
                      f"({t.initdead_ms} ms) for this node's beats before it takes any group")

    def claims(self) -> list[str]:
        return sorted(n for n, g in self.groups.items() if g.state in CLAIMING)

    def _place(self, now: float, out: list, why: list) -> None:
        peer = self.peer
        if any(g.state is GroupState.PROBING for g in self.groups.values()):
            return  # adopt or clean up what already runs here before deciding anything
        if peer is not None and self.membership.state(peer) is Liveness.INIT:
            return  # initdead: wait to hear from the peer before deciding anything
        if self.pings.configured and not self._pings_settled(now):
            return  # our ping view is not known yet: neither take nor yield on it (two keepalives at start)
        alive = peer is not None and self.membership.alive(peer)
        info = self.peer_info[peer] if alive else PeerInfo()
        verdict = self.pings.judge(now, info.ping_count if alive else None)
        cut_off = self._cut_off(now, alive, verdict)
        isolated = self._isolated(now)
        if not alive and self.standby:
            why.append(f"standby of {', '.join(sorted(self.standby))} ends: the peer is not alive")
            self.standby.clear()
        for name, g in self.groups.items():
            theirs = alive and name in info.claims
            if g.state in CLAIMING and theirs:
                self._once(out, why, "dual-claim", name, f"both nodes claim group {name}: this node ({self.node}) and {peer}")
                continue
            self._resolved("dual-claim", name)
            if g.state is GroupState.STARTED and isolated:
                self._set(g, GroupState.STOPPING, f"releasing group {name}: {isolated}", A.StopGroup(name), out, why)
            elif g.state is GroupState.STARTED and alive:
                release = self._release_reason(g, peer, info, verdict)
                if release:
                    self._set(g, GroupState.STOPPING, release, A.StopGroup(name), out, why)
            elif g.state is GroupState.STARTED and cut_off:
                self._set(g, GroupState.STOPPING, f"releasing group {name}: {cut_off}", A.StopGroup(name), out, why)
            elif g.state in (GroupState.STOPPED, GroupState.FAILED) and not theirs:
                if isolated:
                    continue
                if alive and name in self.standby:
                    continue  # the peer may take it; this node does not
                if g.state is GroupState.FAILED and self._waits_after_failure(g, now, alive, info):
                    continue
                self._maybe_take(g, peer, alive, info, verdict, out, why)

    def _pings_settled(self, now: float) -> bool:
        """Our ping count means something once every ping node answered, or once deadtime passed since we began
        to ask them (`pings_since`: at start, after new ping nodes were configured, after a stall of this node;
        a ping node that has not answered by then counts as not seen). Saying "0" or "fewer" earlier, on a loaded
        machine where the first reply was still on its way, made the peer take a group that was not its; and
        after a stall, in which this node sent no pings, a node holding a group yielded it to a peer that saw
        one ping node more only because nothing had been asked (seen in the VM lab under load). While no ping node
        has answered since the daemon started, "none" waits for initdead since the start too: at boot a silence is
        more often a slow start (an interface still coming up, ARP, a loaded machine) than a cut LAN, "none" is
        what hands every group to the peer for good when auto_failback is off, and Heartbeat too counts a ping
        node dead at start only after initdead."""
        t = self.config.timing
        if now - self.membership.started < 2 * t.keepalive_ms / 1000:
            return False
        if self.pings.count(now) == self.pings.configured:
            return True
        if not self.pings.last_reply and now - self.membership.started < t.initdead_ms / 1000:
            return False
        return now - self.pings_since >= t.deadtime_ms / 1000

    def _cut_off(self, now: float, alive: bool, verdict) -> str:
        """Non-empty (the reason) once this node has seen no ping node and no peer for deadtime: cut off from the
        LAN it serves nobody, and holding the groups (their disk lock) would keep the peer from taking them
        (what Pacemaker's ping rule does too; if the ping nodes are down for both nodes, nobody runs them).
        Counted from the last beat or echo reply received: when one cut silences both at once, the peer is
        declared dead and the ping nodes stop counting at about the same moment, deadtime after the cut, and
        waiting another deadtime from then would only hold the disk lock away from the peer for longer.  Never
        from before `pings_since`: at start, after new ping nodes were configured or after a stall, silence
        from ping nodes that were not asked means nothing."""
        if alive or not self.pings.configured or verdict.may_take_over:
            return ""
        heard = [lt.last_heard for t in self.membership.peers.values() for lt in t.links.values()
                 if lt.last_heard is not None]
        last = max([self.pings_since, *heard, *self.pings.last_reply.values()])
        if now - last < self.config.timing.deadtime_ms / 1000 - EPS:
            return ""
        return (f"cut off: no ping node and no peer for {round((now - last) * 1000)} ms, deadtime "
                f"{self.config.timing.deadtime_ms} ms ({verdict.reason}); the peer may take it")

    def _local_state(self, event, now: float, why: list) -> None:
        if isinstance(event, E.LinkState):
            table, key, bad = self.links_down, event.link, not event.usable
            what, cause = f"link {event.link}", "sending on it fails here"
        else:
            table, key, bad = self.unroutable, event.address, not event.routable
            what, cause = f"ping node {event.address}", "no route to it"
        if bad and key not in table:
            table[key] = now
            why.append(f"{what} cannot be used from this node: {cause}")
        elif not bad and key in table:
            del table[key]
            why.append(f"{what} can be used from this node again")

    def _isolated(self, now: float) -> str:
        """Non-empty (the reason) when this node knows, without waiting for the peer's silence, that it is cut off:
        every heartbeat link fails to send for a local reason (interface down, no route, serial device gone or
        hung up) and it has no route to any ping node (its LAN interface is down), for warntime now (a short
        outage of the node's own interfaces, such as a restart of its network configuration, moves nothing).
        It then serves nobody and cannot reach the peer, so it releases its groups before the peer declares it
        dead, rather than deadtime after its last beat or echo reply (the cut-off rule): the disk lock is free
        when the peer comes for it. Only with ping nodes: without them hastore cannot tell whether the LAN
        still reaches this node."""
        since = self._isolated_since()
        if since is None or now - since < self.config.timing.warntime_ms / 1000 - EPS:
            return ""
        return (f"isolated: for {round((now - since) * 1000)} ms no heartbeat link works from this node and no ping "
                f"node has a route from it (its own interfaces are down); the peer may take it")

    def _isolated_since(self) -> float | None:
        """Since when every link and every ping route is down here, if they are (see _isolated)."""
        links = [link.id for link in self.config.links]
        pings = self.pings.addresses()
        if not pings or not links or any(lid not in self.links_down for lid in links) \
                or any(a not in self.unroutable for a in pings):
            return None
        return max(max(self.links_down[lid] for lid in links), max(self.unroutable[a] for a in pings))

    def _waits_after_failure(self, g: GroupTrack, now: float, alive: bool, info: PeerInfo) -> bool:
        """A group failed here: this node leaves it to an alive peer that can take it, and otherwise tries again,
        but not before the retry delay; if it failed on both nodes, only its preferred node retries."""
        if now - g.failed_at < self._retry_s():
            return True
        name = g.spec.name
        return alive and (self._peer_may_take(name, info)
                          or (name in info.failed and g.spec.preferred_node != self.node))

    def _peer_may_take(self, name: str, info: PeerInfo) -> bool:
        """Whether the alive peer is able to take group `name` (it is up, not in standby for it, it did not fail
        there, and its ping view allows it). If not, a node where the group failed tries it again."""
        return (info.status == "active" and name not in info.failed and name not in info.standby
                and self._peer_can(info))

    def _retry_s(self) -> float:
        """How long a node waits after a failure before it tries a group again that nobody else can take."""
        return max(5.0, 2 * self.config.timing.deadtime_ms / 1000)

    def _peer_can(self, info: PeerInfo) -> bool:
        """Whether the (alive) peer may hold groups by its ping view: it sees some, and not fewer than we do.
        A peer that has not said yet (it just started) is given the benefit of the doubt."""
        if self.pings.configured == 0 or info.ping_count is None:
            return True
        return info.ping_count >= max(1, self.pings.count(self.now))

    def _release_reason(self, g: GroupTrack, peer: str, info: PeerInfo, verdict) -> str:
        name = g.spec.name
        if verdict.should_yield:
            return f"releasing group {name}: {verdict.reason}"
        if (self.config.auto_failback is AutoFailback.ON and g.spec.preferred_node == peer
                and info.status == "active" and name not in info.failed and name not in info.standby
                and self._peer_can(info)):
            return f"auto_failback on: handing group {name} back to its preferred node {peer}"
        return ""

    def _maybe_take(self, g: GroupTrack, peer, alive: bool, info: PeerInfo, verdict, out: list, why: list) -> None:
        name = g.spec.name
        if not verdict.may_take_over or verdict.should_yield:
            self._once(out, why, "cannot-take-over", name, f"not taking group {name}: {verdict.reason}")
            return
        self._resolved("cannot-take-over", name)
        if not alive:
            if peer is None:
                who = "this node has no peer"
            elif self.membership.peers[peer].left_at is not None:
                who = f"{peer} left the cluster"
            else:
                who = f"{peer} is {self.membership.state(peer).value}"
            again = " (it failed here before)" if g.state is GroupState.FAILED else ""
            self._set(g, GroupState.STARTING, f"taking group {name}{again}: {who}", A.StartGroup(name), out, why)
            return
        if info.status != "active":
            return  # the peer is still probing or leaving: let it settle
        if name in info.standby:
            why_take = f"{peer} was put in standby for it"
        elif name in info.failed:
            why_take = f"it failed on {peer}"
        elif g.spec.preferred_node == self.node:
            why_take = "this node is its preferred node and nobody holds it"
        elif not self._peer_can(info):
            why_take = f"nobody holds it and {peer} sees fewer ping nodes"
        else:
            return
        self._set(g, GroupState.STARTING, f"starting group {name}: {why_take}", A.StartGroup(name), out, why)

    def _set(self, g: GroupTrack, state: GroupState, reason: str, action: A.Action, out: list, why: list) -> None:
        g.state, g.reason = state, reason
        out.append(action)
        why.append(reason)
        self.next_beat = self.now
        ops = self.ops[g.spec.name]
        actions, outcome = ops.start(self.now) if isinstance(action, A.StartGroup) else ops.stop(self.now)
        out.extend(actions)
        if outcome is not None:
            self._on_outcome(g, outcome, self.now, out, why)

    # -- operator commands ----------------------------------------------------------------------
    def _scope(self, scope: str) -> list[str]:
        if scope == "local":
            return [n for n, g in self.groups.items() if g.spec.preferred_node == self.node]
        if scope in ("foreign", "failback"):
            return [n for n, g in self.groups.items() if g.spec.preferred_node != self.node]
        return list(self.groups)

    def _on_admin(self, ev: E.Admin, now: float, out: list, why: list) -> None:
        groups = self._scope(ev.scope)
        peer = self.peer
        alive = peer is not None and self.membership.alive(peer)
        if ev.command == "standby":
            if not alive:
                text = f"refusing standby {ev.scope}: the peer is not alive, the groups would have nowhere to go"
                why.append(text)
                out.append(A.Notify("admin-refused", text))
                return
            why.append(f"operator: standby {ev.scope}")
            self._standby(groups, now, out, why)
        elif ev.command == "takeover":
            self.standby.difference_update(groups)
            why.append(f"operator: takeover {ev.scope} ({', '.join(groups) or 'no groups'})")
            if alive and groups:
                self._send_reliable(MsgType.REQUEST, peer, {"kind": "standby", "groups": sorted(groups)}, now, out)

    def _standby(self, groups: list[str], now: float, out: list, why: list) -> None:
        for name in groups:
            self.standby.add(name)
            g = self.groups[name]
            if g.state is GroupState.STARTED:
                self._set(g, GroupState.STOPPING, f"standby: giving group {name} to {self.peer}", A.StopGroup(name),
                          out, why)

    def _once(self, out: list, why: list, kind: str, key: str, text: str) -> None:
        if (kind, key) not in self.reported:
            self.reported.add((kind, key))
            out.append(A.Notify(kind, text, group=key))
            why.append(text)

    def _resolved(self, kind: str, key: str) -> None:
        self.reported.discard((kind, key))

    # -- leaving --------------------------------------------------------------------------------
    def _leave(self, now: float, out: list, why: list) -> None:
        busy = False
        for name, g in self.groups.items():
            if g.state is GroupState.STARTED:
                self._set(g, GroupState.STOPPING, f"stopping group {name} before leaving", A.StopGroup(name), out, why)
            if g.state in (GroupState.STARTING, GroupState.STOPPING, GroupState.PROBING):
                busy = True
        if busy or self.exit_at is not None or any(p.type is MsgType.LEAVE for p in self.outbox.values()):
            return
        stuck = [n for n, g in self.groups.items() if g.state is GroupState.STOP_FAILED]
        if stuck:
            # Leaving now would let the peer start what may still run here. Stay, keep claiming, say so.
            self._once(out, why, "cannot-leave", ",".join(stuck),
                       f"not leaving: group(s) {', '.join(stuck)} failed to stop and may still be held here; "
                       f"staying so that the peer does not start them (fix the resource, or fence this node)")
            return
        alive = [p for p in self.config.peers if self.membership.alive(p)]
        if not alive:
            why.append("no peer is alive: leaving now")
            self.exit_at = now
            return
        for p in alive:
            self._send_reliable(MsgType.LEAVE, p, {"st": "leaving"}, now, out)
        why.append(f"told {', '.join(alive)} that we are leaving; waiting for the acknowledgement")

    # -- sending --------------------------------------------------------------------------------
    def _body(self, extra: dict) -> dict:
        peer = self.peer
        echo = self.peer_info[peer].generation if peer else None
        body = {"e": echo or 0}
        body.update(extra)
        return body

    def farewell(self) -> tuple[bytes, ...]:
        """Signed LEAVE datagrams, one per peer whose generation we know, for the guard to send once it has stopped
        everything here after the daemon died or froze: the peer then takes over at once instead of after deadtime.
        Their sequence number (FAREWELL_SEQ) is above any this daemon uses, so the peer accepts them after all our
        beats, and rejects whatever this generation sends afterwards (a frozen daemon waking up exits anyway).
        They echo the peer's current generation, like every message: the daemon hands the guard new ones when it
        changes (and when the signing key does)."""
        auth = self.config.auth
        key = signing_key(auth)
        return tuple(encode(Message(MsgType.LEAVE, self.node, peer, self.generation, FAREWELL_SEQ,
                                    body={"e": info.generation, "st": "leaving", "by": "guard"}, news=True),
                            key, allow_insecure=auth.allow_insecure)
                     for peer, info in sorted(self.peer_info.items()) if info.generation is not None)

    def farewell_key(self) -> tuple:
        """What farewell() depends on: ask for new datagrams when this changes."""
        return (self.config.auth, tuple((p, i.generation) for p, i in sorted(self.peer_info.items())))

    def _broadcast(self, type_: MsgType, dst: str, body: dict, out: list, rid: int = 0, ack: int = 0) -> None:
        self.seq += 1
        full = self._body(body)
        news = True
        if type_ is MsgType.BEAT:
            news, self.last_beat_body = full != self.last_beat_body, full
        msg = Message(type_, self.node, dst, self.generation, self.seq, rid=rid, ack=ack, body=full, news=news)
        auth = self.config.auth
        data = encode(msg, signing_key(auth), allow_insecure=auth.allow_insecure)
        out.extend(A.Send(link, data) for link in self.links)

    def _send_reliable(self, type_: MsgType, dst: str, body: dict, now: float, out: list) -> None:
        self.rid = self.rid % 0xFFFFFFFF + 1
        keepalive = self.config.timing.keepalive_ms / 1000
        self.outbox[self.rid] = Pending(type_, dst, body, now + keepalive / 2,
                                        now + self.config.timing.deadtime_ms / 1000)
        self._broadcast(type_, dst, body, out, rid=self.rid)

    def _send_due(self, now: float, out: list) -> None:
        keepalive = self.config.timing.keepalive_ms / 1000
        if now >= self.next_beat:
            probing = any(g.state is GroupState.PROBING for g in self.groups.values())
            st = "leaving" if self.leaving else "probing" if probing else "active"
            body = {"st": st, "g": self.claims()}
            failed = sorted(n for n, g in self.groups.items() if g.state is GroupState.FAILED)
            if failed:
                body["f"] = failed
            if self.standby:
                body["sb"] = sorted(self.standby)
            if self.restart_grace_ms:
                body["rs"] = self.restart_grace_ms
            if self.pings.configured and self._pings_settled(now):
                body["p"] = self.pings.count(now)  # before the first replies had time to come, say nothing
            self._broadcast(MsgType.BEAT, "", body, out)
            out.extend(A.Ping(a) for a in self.pings.addresses())
            self.next_beat = now + keepalive
        for rid, p in list(self.outbox.items()):
            if now >= p.give_up:
                del self.outbox[rid]
                out.append(A.Notify("unacknowledged", f"{p.type.name} to {p.dst} was never acknowledged", peer=p.dst))
                if p.type is MsgType.LEAVE:
                    self.exit_at = now
            elif now >= p.next_try:
                p.next_try = now + keepalive / 2
                self._broadcast(p.type, p.dst, p.body, out, rid=rid)

    # -- reload ---------------------------------------------------------------------------------
    def _reload(self, new: Config) -> str:
        old = self.config
        changed = []
        self.unroutable.clear()  # the shell re-resolved the ping nodes and reports their routes afresh
        if new.timing != old.timing:
            changed.append(f"timing {_timing(old)} -> {_timing(new)}")
            self.membership.set_timing(new.timing)
            self.pings.window_s = new.timing.deadtime_ms / 1000
        if new.auth != old.auth:
            changed.append(f"auth keys {[k.id for k in old.auth.keys]} -> {[k.id for k in new.auth.keys]} "
                           f"(signing with key {new.auth.active_key})")
            self.verifier.set_auth(new.auth)
        if (new.ping_nodes, new.ping_groups) != (old.ping_nodes, old.ping_groups):
            changed.append(f"ping nodes {list(old.ping_nodes)} -> {list(new.ping_nodes)}")
            last = self.pings.last_reply
            self.pings = PingView(new.ping_nodes, new.ping_groups, new.timing.deadtime_ms / 1000)
            self.pings.last_reply = {a: t for a, t in last.items() if a in self.pings.addresses()}
            self.pings_since = self.now  # the new ones have not been asked yet
        if new.auto_failback != old.auto_failback:
            changed.append(f"auto_failback {old.auto_failback.value} -> {new.auto_failback.value}")
        self.config = new
        return "configuration reloaded: " + ("; ".join(changed) if changed else "nothing the engine uses changed")

    # -- status ---------------------------------------------------------------------------------
    def status(self, now: float) -> dict:
        peers = {}
        for name, track in self.membership.peers.items():
            info = self.peer_info[name]
            links = {}
            for lid, lt in track.links.items():
                age = None if lt.last_heard is None else int(round((now - lt.last_heard) * 1000))
                links[lid] = {"up": lt.state in (Liveness.UP, Liveness.WARN), "state": lt.state.value,
                              "last_beat_ms": age}
            peers[name] = {"alive": self.membership.alive(name), "state": track.state.value,
                           "generation": info.generation, "claims": sorted(info.claims),
                           "ping_count": info.ping_count, "links": links}
        alive = self.peer is not None and self.membership.alive(self.peer)
        verdict = self.pings.judge(now, self.peer_info[self.peer].ping_count if alive else None)
        return {
            "node": self.node,
            "generation": self.generation,
            "leaving": self.leaving,
            "peers": peers,
            "ping": {
                "configured": self.pings.configured,
                "count": self.pings.count(now),
                "nodes": {a: self.pings.visible(a, now) for a in self.pings.addresses()},
                "may_take_over": verdict.may_take_over,
                "should_yield": verdict.should_yield,
                "reason": verdict.reason,
            },
            "groups": {n: self._group_status(g, alive) for n, g in self.groups.items()},
            # what this node knows it cannot use (sends fail here, no route): see _isolated
            "here": {"links_down": sorted(self.links_down), "no_route": sorted(self.unroutable),
                     "isolated": self._isolated(now)},
            "counters": {**{v.name.lower(): c for v, c in self.verifier.counters.items()}, "unechoed": self.unechoed},
        }

    def _group_status(self, g: GroupTrack, peer_alive: bool) -> dict:
        name = g.spec.name
        owner, state, reason = None, g.state.value, g.reason
        if g.state in CLAIMING:
            owner = self.node
        elif peer_alive and name in self.peer_info[self.peer].claims:
            owner, state, reason = self.peer, "started", f"held by {self.peer}"
        return {"owner": owner, "state": state, "preferred": g.spec.preferred_node, "reason": reason,
                "standby": name in self.standby, "resources": self.ops[name].status()}


def _names(value) -> frozenset[str]:
    return frozenset(v for v in value if isinstance(v, str)) if isinstance(value, list) else frozenset()


def _timing(c: Config) -> str:
    t = c.timing
    return f"keepalive {t.keepalive_ms} ms, warntime {t.warntime_ms} ms, deadtime {t.deadtime_ms} ms"
