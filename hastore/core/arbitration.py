"""Ping-node arbitration, Heartbeat's ipfail built in.

A ping node counts as visible while it answered an echo within deadtime; a ping group counts as one visible
node while any of its members is visible. The node that sees fewer yields to a peer that sees more; a node
that sees none (when ping nodes are configured) never takes over.
"""

from __future__ import annotations

from dataclasses import dataclass

from hastore.config.model import PingGroup


@dataclass(frozen=True)
class Verdict:
    may_take_over: bool
    should_yield: bool
    reason: str


class PingView:
    def __init__(self, nodes: tuple[str, ...], groups: tuple[PingGroup, ...], window_s: float):
        self.nodes = nodes
        self.groups = groups
        self.window_s = window_s
        self.last_reply: dict[str, float] = {}

    @property
    def configured(self) -> int:
        return len(self.nodes) + len(self.groups)

    def addresses(self) -> tuple[str, ...]:
        seen: dict[str, None] = dict.fromkeys(self.nodes)
        for g in self.groups:
            seen.update(dict.fromkeys(g.addresses))
        return tuple(seen)

    def reply(self, address: str, now: float) -> bool:
        """Record an echo reply. Returns False for an address we never asked about."""
        if address not in self.addresses():
            return False
        self.last_reply[address] = max(now, self.last_reply.get(address, now))  # replies read late come in any order
        return True

    def visible(self, address: str, now: float) -> bool:
        t = self.last_reply.get(address)
        return t is not None and now - t < self.window_s

    def count(self, now: float) -> int:
        n = sum(1 for a in self.nodes if self.visible(a, now))
        n += sum(1 for g in self.groups if any(self.visible(a, now) for a in g.addresses))
        return n

    def next_expiry(self, now: float) -> float | None:
        """When a currently visible address would stop counting (so the count can change)."""
        times = [t + self.window_s for t in self.last_reply.values() if t + self.window_s > now]
        return min(times) if times else None

    def judge(self, now: float, peer_count: int | None) -> Verdict:
        """peer_count is None when the peer is not alive (nothing to compare with)."""
        if self.configured == 0:
            return Verdict(True, False, "no ping nodes configured: arbitration is off")
        mine = self.count(now)
        may = mine > 0
        if peer_count is None:
            why = f"this node sees {mine} of {self.configured} ping nodes"
            return Verdict(may, False, why + ("" if may else ": it never takes over while it sees none"))
        yield_ = peer_count > mine
        if yield_:
            why = f"this node sees {mine} ping nodes, the peer sees {peer_count}: the node that sees fewer yields"
        else:
            why = f"this node sees {mine} ping nodes, the peer sees {peer_count}"
        if not may:
            why += ": it never takes over while it sees none"
        return Verdict(may, yield_, why)
