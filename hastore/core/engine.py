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

from hastore.config.model import Config, Group
from hastore.core import actions as A
from hastore.core import events as E
from hastore.core.arbitration import PingView
from hastore.core.membership import Change, Liveness, Membership
from hastore.core.wire import Message, MsgType, Verdict, Verifier, encode, signing_key


class GroupState(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    STARTED = "started"
    STOPPING = "stopping"
    FAILED = "failed"  # a start failed here: not retried automatically
    STOP_FAILED = "stop-failed"  # resources may still be held: keep claiming so the peer never starts it


CLAIMING = {GroupState.STARTING, GroupState.STARTED, GroupState.STOPPING, GroupState.STOP_FAILED}


@dataclass
class GroupTrack:
    spec: Group
    state: GroupState = GroupState.STOPPED
    reason: str = "not started yet"


@dataclass
class PeerInfo:
    """What the peer told us in its last accepted beat."""

    generation: int | None = None
    claims: frozenset[str] = frozenset()
    ping_count: int | None = None
    status: str = ""
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


class Engine:
    def __init__(self, config: Config, generation: int, now: float, floors: dict[str, int] | None = None):
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
        self.groups = {g.name: GroupTrack(g) for g in config.groups}
        self.outbox: dict[int, Pending] = {}
        self.next_beat = now
        self.leaving = False
        self.exit_at: float | None = None
        self.unechoed = 0
        self.reported: set[tuple[str, str]] = set()  # one-shot notices, cleared when the condition ends
        self.now = now

    # ------------------------------------------------------------------------------------------
    @property
    def peer(self) -> str | None:
        return self.config.peers[0] if self.config.peers else None

    def handle(self, event: E.Event, now: float) -> A.Decision:
        self.now = now
        out: list[A.Action] = []
        why: list[str] = []
        if isinstance(event, E.PacketReceived):
            if self._on_packet(event, now, out, why) and not out and not why:
                # The same message again over another link, no state changed: nothing to decide. (Half of all
                # packets with two links; the time-driven checks run at next_deadline() anyway.)
                return A.Decision()
        elif isinstance(event, E.PingReply):
            self.pings.reply(event.address, now)
        elif isinstance(event, E.LinkTrouble):
            out.append(A.Notify("link-trouble", f"link {event.link}: {event.detail}", link=event.link))
            why.append(f"link {event.link} reports trouble: {event.detail}")
        elif isinstance(event, E.GroupDone):
            self._on_group_done(event, out, why)
        elif isinstance(event, E.Shutdown):
            if not self.leaving:
                self.leaving = True
                why.append("shutdown requested: releasing groups, then telling the peer")
        elif isinstance(event, E.Reload):
            why.append(self._reload(event.config))
        self._membership_changes(self.membership.tick(now), out, why)
        if self.leaving:
            self._leave(now, out, why)
        else:
            self._place(now, out, why)
        self._send_due(now, out)
        if self.exit_at is not None and now >= self.exit_at:
            out.append(A.Exit(0))
        return A.Decision(tuple(out), "; ".join(w for w in why if w))

    def next_deadline(self) -> float:
        times = [self.next_beat]
        for t in (self.membership.next_deadline(), self.pings.next_expiry(self.now), self.exit_at):
            if t is not None:
                times.append(t)
        times += [p.next_try for p in self.outbox.values()]
        return min(times)

    # -- receiving ------------------------------------------------------------------------------
    def _on_packet(self, ev: E.PacketReceived, now: float, out: list, why: list) -> bool:
        """Returns True when the packet was a duplicate that only refreshed its link."""
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
        self._membership_changes(self.membership.heard(msg.src, ev.link, now), out, why)
        if v.verdict is Verdict.DUPLICATE:
            return True  # the same message over a second link: proves that link alive, processed once already
        if msg.rid:
            self._acknowledge(msg, out)
            if msg.rid in info.seen_rids:
                return
            info.seen_rids.add(msg.rid)
        self._dispatch(msg, info, now, out, why)

    def _dispatch(self, msg: Message, info: PeerInfo, now: float, out: list, why: list) -> None:
        if msg.type is MsgType.BEAT:
            self._on_beat(msg, info)
        elif msg.type is MsgType.ACK:
            pending = self.outbox.pop(msg.ack, None)
            if pending is not None and pending.type is MsgType.LEAVE and self.leaving:
                why.append(f"{msg.src} acknowledged our leaving")
                self.exit_at = now
        elif msg.type is MsgType.LEAVE:
            info.claims = frozenset()
            info.left_generation = msg.generation
            self._membership_changes(self.membership.left(msg.src, now), out, why)

    def _on_beat(self, msg: Message, info: PeerInfo) -> None:
        claims = msg.body.get("g", [])
        info.claims = frozenset(c for c in claims if isinstance(c, str)) if isinstance(claims, list) else frozenset()
        p = msg.body.get("p")
        info.ping_count = p if isinstance(p, int) and not isinstance(p, bool) else None
        info.status = str(msg.body.get("st", ""))

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
    def _on_group_done(self, ev: E.GroupDone, out: list, why: list) -> None:
        g = self.groups.get(ev.group)
        if g is None:
            return
        detail = f": {ev.detail}" if ev.detail else ""
        if ev.op == "start":
            g.state = GroupState.STARTED if ev.ok else GroupState.FAILED
        else:
            g.state = GroupState.STOPPED if ev.ok else GroupState.STOP_FAILED
        verb = {"start": "started", "stop": "stopped"}[ev.op] if ev.ok else f"failed to {ev.op}"
        g.reason = f"group {ev.group} {verb}{detail}"
        why.append(g.reason)
        if not ev.ok:
            out.append(A.Notify("group-failed", g.reason, group=ev.group))
        self.next_beat = self.now  # tell the peer what we hold now, not a keepalive later

    def claims(self) -> list[str]:
        return sorted(n for n, g in self.groups.items() if g.state in CLAIMING)

    def _place(self, now: float, out: list, why: list) -> None:
        peer = self.peer
        if peer is not None and self.membership.state(peer) is Liveness.INIT:
            return  # initdead: wait to hear from the peer before deciding anything
        alive = peer is not None and self.membership.alive(peer)
        info = self.peer_info[peer] if alive else PeerInfo()
        verdict = self.pings.judge(now, info.ping_count if alive else None)
        for name, g in self.groups.items():
            theirs = alive and name in info.claims
            if g.state in CLAIMING and theirs:
                self._once(out, why, "dual-claim", name, f"both nodes claim group {name}: this node ({self.node}) and {peer}")
                continue
            self._resolved("dual-claim", name)
            if g.state is GroupState.STARTED and alive and verdict.should_yield:
                self._set(g, GroupState.STOPPING, f"releasing group {name}: {verdict.reason}", A.StopGroup(name), out, why)
            elif g.state is GroupState.STOPPED and not theirs:
                self._maybe_take(g, peer, alive, info, verdict, out, why)

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
            self._set(g, GroupState.STARTING, f"taking group {name}: {who}", A.StartGroup(name), out, why)
            return
        peer_can = self.pings.configured == 0 or (info.ping_count or 0) >= max(1, self.pings.count(self.now))
        if g.spec.preferred_node == self.node:
            self._set(g, GroupState.STARTING, f"starting group {name}: this node is its preferred node and nobody holds it",
                      A.StartGroup(name), out, why)
        elif not peer_can:
            self._set(g, GroupState.STARTING, f"starting group {name}: nobody holds it and {peer} sees fewer ping nodes",
                      A.StartGroup(name), out, why)

    def _set(self, g: GroupTrack, state: GroupState, reason: str, action: A.Action, out: list, why: list) -> None:
        g.state, g.reason = state, reason
        out.append(action)
        why.append(reason)
        self.next_beat = self.now

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
            if g.state in (GroupState.STARTING, GroupState.STOPPING):
                busy = True
        if busy or self.exit_at is not None or any(p.type is MsgType.LEAVE for p in self.outbox.values()):
            return
        stuck = [n for n, g in self.groups.items() if g.state is GroupState.STOP_FAILED]
        if stuck:
            why.append(f"leaving without telling the peer: group(s) {', '.join(stuck)} failed to stop and may still be held")
            self.exit_at = now
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

    def _broadcast(self, type_: MsgType, dst: str, body: dict, out: list, rid: int = 0, ack: int = 0) -> None:
        self.seq += 1
        msg = Message(type_, self.node, dst, self.generation, self.seq, rid=rid, ack=ack, body=self._body(body))
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
            st = "leaving" if self.leaving else "active"
            body = {"st": st, "g": self.claims()}
            if self.pings.configured:
                body["p"] = self.pings.count(now)
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
            "counters": {**{v.name.lower(): c for v, c in self.verifier.counters.items()}, "unechoed": self.unechoed},
        }

    def _group_status(self, g: GroupTrack, peer_alive: bool) -> dict:
        name = g.spec.name
        owner, state, reason = None, g.state.value, g.reason
        if g.state in CLAIMING:
            owner = self.node
        elif peer_alive and name in self.peer_info[self.peer].claims:
            owner, state, reason = self.peer, "started", f"held by {self.peer}"
        return {"owner": owner, "state": state, "preferred": g.spec.preferred_node, "reason": reason}


def _timing(c: Config) -> str:
    t = c.timing
    return f"keepalive {t.keepalive_ms} ms, warntime {t.warntime_ms} ms, deadtime {t.deadtime_ms} ms"
