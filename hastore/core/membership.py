"""Peer and link liveness: up / warn / dead from the time of the last verified beat on each link.

Pure: times are monotonic seconds passed in by the caller. A link is up while beats arrive on it, warns
after warntime of silence (seen at the first tick after it: see next_deadline) and is dead after deadtime. A link never heard from is `init` until initdead has
passed since start, then dead. The peer is alive while any link is up or warning; dead only when every
link is dead (or it announced that it is leaving).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from hastore.config.model import Timing


class Liveness(enum.Enum):
    INIT = "init"
    UP = "up"
    WARN = "warn"
    DEAD = "dead"


_RANK = {Liveness.UP: 3, Liveness.WARN: 2, Liveness.INIT: 1, Liveness.DEAD: 0}


@dataclass(frozen=True)
class Change:
    """One state change of a link (link set) or of a whole peer (link empty), with its reason."""

    peer: str
    link: str
    old: Liveness
    new: Liveness
    reason: str


@dataclass
class LinkTrack:
    last_heard: float | None = None
    state: Liveness = Liveness.INIT


@dataclass
class PeerTrack:
    name: str
    links: dict[str, LinkTrack] = field(default_factory=dict)
    state: Liveness = Liveness.INIT
    left_at: float | None = None  # set when the peer announced a clean shutdown
    grace_until: float | None = None  # the peer restarts in place: its links do not die before this

    def best_link_state(self) -> Liveness:
        if not self.links:
            return Liveness.DEAD
        return max((lt.state for lt in self.links.values()), key=_RANK.__getitem__)


EPS = 1e-6  # a deadline reached exactly counts as reached despite float rounding


def _ms(seconds: float) -> int:
    return int(round(seconds * 1000))


class Membership:
    def __init__(self, peers: tuple[str, ...], links: tuple[str, ...], timing: Timing, started: float):
        self.timing = timing
        self.started = started
        self.peers = {p: PeerTrack(p, {l: LinkTrack() for l in links}) for p in peers}

    # -- inputs -------------------------------------------------------------------------------
    def heard(self, peer: str, link: str, now: float) -> list[Change]:
        """A verified message from `peer` arrived over `link` at `now` (which may be a little in the past: the
        kernel's receive time of a datagram read later; see Engine._arrival)."""
        track = self.peers[peer]
        lt = track.links.setdefault(link, LinkTrack())
        lt.last_heard = now if lt.last_heard is None else max(lt.last_heard, now)
        track.left_at = None
        changes = []
        if lt.state is not Liveness.UP:
            was = "first beat" if lt.state is Liveness.INIT else f"beats again after {lt.state.value}"
            changes.append(Change(peer, link, lt.state, Liveness.UP, f"link {link} to {peer} is up ({was})"))
            lt.state = Liveness.UP
        return changes + self._settle_peer(track, now)

    def left(self, peer: str, now: float, why: str = "") -> list[Change]:
        """The peer said it is shutting down (or its guard said it stopped everything): dead now, without waiting
        for deadtime."""
        track = self.peers[peer]
        track.left_at = now
        changes = []
        for link, lt in track.links.items():
            if lt.state is not Liveness.DEAD:
                changes.append(Change(peer, link, lt.state, Liveness.DEAD, f"link {link} to {peer} closed: {peer} is leaving"))
                lt.state = Liveness.DEAD
        return changes + self._settle_peer(track, now, why or f"{peer} announced a clean shutdown")

    def grace(self, peer: str, until: float | None) -> bool:
        """The peer restarts in place: none of its links is declared dead before `until` (None: no grace).
        True when that changed the grace."""
        track = self.peers[peer]
        changed, track.grace_until = track.grace_until != until, until
        return changed

    def tick(self, now: float) -> list[Change]:
        changes: list[Change] = []
        for track in self.peers.values():
            for link, lt in track.links.items():
                new, why = self._link_state(lt, now, track.grace_until)
                if new is not lt.state:
                    changes.append(Change(track.name, link, lt.state, new, f"link {link} to {track.name}: {why}"))
                    lt.state = new
            changes += self._settle_peer(track, now)
        return changes

    def set_timing(self, timing: Timing) -> None:
        self.timing = timing

    # -- queries ------------------------------------------------------------------------------
    def state(self, peer: str) -> Liveness:
        return self.peers[peer].state

    def alive(self, peer: str) -> bool:
        return self.peers[peer].state in (Liveness.UP, Liveness.WARN)

    def next_deadline(self) -> float | None:
        """The earliest time at which a link dies (or initdead ends) if nothing more is heard. Warntime is no
        deadline of its own: a warning decides nothing, and the engine ticks at least every keepalive (its beat),
        so a quiet link turns `warn` at the first tick after warntime. That spares the daemon a wakeup of its own
        and lets it leave routine beats unread on most ticks (see calm_until)."""
        t = self.timing
        deadlines = []
        for track in self.peers.values():
            for lt in track.links.values():
                if lt.state is Liveness.INIT:
                    deadlines.append(self.started + t.initdead_ms / 1000)
                elif lt.state is Liveness.UP and lt.last_heard is not None:
                    deadlines.append(lt.last_heard + t.deadtime_ms / 1000)
                elif lt.state is Liveness.WARN and lt.last_heard is not None:
                    deadlines.append(max(lt.last_heard + t.deadtime_ms / 1000, track.grace_until or 0.0))
        return min(deadlines) if deadlines else None

    def calm_until(self) -> float | None:
        """Until when nothing heard could change a state: the first time an up link turns `warn` if nothing
        more is heard. None when some link is not up (there, what arrives matters at once)."""
        until = float("inf")
        for track in self.peers.values():
            for lt in track.links.values():
                if lt.state is not Liveness.UP or lt.last_heard is None:
                    return None
                until = min(until, lt.last_heard + self.timing.warntime_ms / 1000)
        return until

    # -- internals ----------------------------------------------------------------------------
    def _link_state(self, lt: LinkTrack, now: float, grace_until: float | None = None) -> tuple[Liveness, str]:
        t = self.timing
        if lt.state is Liveness.DEAD:
            return Liveness.DEAD, "dead"  # only a new verified beat revives a dead link
        if lt.last_heard is None:
            if now - self.started + EPS >= t.initdead_ms / 1000:
                return Liveness.DEAD, f"no beat within initdead ({t.initdead_ms} ms)"
            return Liveness.INIT, "waiting for the first beat"
        silent = now - lt.last_heard
        if silent + EPS >= t.deadtime_ms / 1000:
            if grace_until is not None and now + EPS < grace_until:
                return Liveness.WARN, f"no beat for {_ms(silent)} ms: it is restarting (grace)"
            grace = " and its restart grace" if grace_until is not None else ""
            return Liveness.DEAD, f"no beat for {_ms(silent)} ms (deadtime {t.deadtime_ms} ms{grace})"
        if silent + EPS >= t.warntime_ms / 1000:
            return Liveness.WARN, f"no beat for {_ms(silent)} ms (warntime {t.warntime_ms} ms)"
        return Liveness.UP, "beating"

    def _settle_peer(self, track: PeerTrack, now: float, why: str | None = None) -> list[Change]:
        new = Liveness.DEAD if track.left_at is not None else track.best_link_state()
        if new is track.state:
            return []
        old, track.state = track.state, new
        if why is None:
            why = self._peer_reason(track, new)
        return [Change(track.name, "", old, new, why)]

    def _peer_reason(self, track: PeerTrack, new: Liveness) -> str:
        t = self.timing
        up = sorted(l for l, lt in track.links.items() if lt.state is Liveness.UP)
        if new is Liveness.UP:
            return f"{track.name} is alive (beats on {', '.join(up)})"
        if new is Liveness.WARN:
            return f"{track.name} is late: no beat on any link for warntime ({t.warntime_ms} ms)"
        if new is Liveness.DEAD:
            if all(lt.last_heard is None for lt in track.links.values()):
                return f"{track.name} is dead: never heard from within initdead ({t.initdead_ms} ms)"
            return f"{track.name} is dead: no beat on any of its {len(track.links)} links for deadtime ({t.deadtime_ms} ms)"
        return f"{track.name} is {new.value}"
