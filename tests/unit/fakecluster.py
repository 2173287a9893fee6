"""Two engines joined by a fake network and a fake clock: a whole cluster in a unit test.

Datagrams are delivered after `latency` unless the link is cut in that direction. Group starts and stops
finish after `op_time`. Ping replies come back for the ping nodes a node can currently see.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from hastore.config.model import (Auth, AuthAlgorithm, AuthKey, Config, Group, Link, LinkKind, PingGroup,
                                  Resource, Timing)
from hastore.core import actions as A
from hastore.core import events as E
from hastore.core.engine import Engine
from hastore.core.wire import SEQ_AT

LINKS = ("ucast:eth1:peer", "serial:/dev/ttyS0")
KEY = AuthKey(1, AuthAlgorithm.SHA256, b"secret")


def make_config(node: str, timing: Timing = Timing(200, 500, 1000, 2000), ping=(), ping_groups=(),
                links=LINKS, groups=None, nodes=("alpha", "bravo"), keys=(KEY,), active_key=1) -> Config:
    if groups is None:
        groups = (Group("web", "alpha", (Resource("IPaddr", ("10.0.0.100",)),)),)
    link_objs = tuple(Link(l, LinkKind.SERIAL if l.startswith("serial") else LinkKind.UCAST) for l in links)
    return Config(node=node, nodes=nodes, timing=timing, links=link_objs, auth=Auth(tuple(keys), active_key),
                  ping_nodes=tuple(ping), ping_groups=tuple(PingGroup(n, tuple(a)) for n, a in ping_groups),
                  groups=groups)


@dataclass
class Node:
    engine: Engine
    log: list = field(default_factory=list)  # (time, Decision) of every non-empty decision
    running_daemon: bool = True
    frozen: bool = False
    sees_pings: set = field(default_factory=set)
    running: set = field(default_factory=set)  # (group, index) of resources "running" here
    faults: dict = field(default_factory=dict)  # (group, index, op) -> exit code the fake agent returns
    ops_log: list = field(default_factory=list)  # (time, group, index, op, rc) of every agent run
    handled: int = 0  # events the engine handled
    # the fake beat pump (FakeCluster(pump=True)): the engine's Plan, how many of its beats went out, the
    # conditions' deadlines, the peer datagrams it expects (-> sender) and the last input matched per link / address
    plan: A.Plan | None = None
    plans: int = 0  # plans made
    plan_sent: int = 0
    plan_watch: dict = field(default_factory=dict)
    plan_expected: dict = field(default_factory=dict)
    plan_heard: dict = field(default_factory=dict)

    @property
    def held(self) -> set:
        """Groups with any resource running here (from the moment a start begins until a stop succeeds)."""
        return {g for g, _ in self.running}


SPIN_TICKS = 1000  # ticks of one node at one time before run_until calls it a spin (a test then fails, not hangs)


class FakeCluster:
    def __init__(self, configs: dict[str, Config], latency=0.001, op_time=0.05, start=100.0, generations=None,
                 policy=None, pump: float = 0.0):
        """pump > 0: after each decision a node hands its routine beats for up to `pump` seconds to a fake beat
        pump (Engine.plan), which sends them on time and wakes the engine only when a plan's condition fails, an
        unexpected input comes or the plan ends: what the daemon's shell does with a real one."""
        self.policy = policy
        self.pump = pump
        self.now = start
        self.latency = latency
        self.op_time = op_time
        self.cut: set[tuple[str, str]] = set()  # (link, receiving node)
        self.queue: list = []
        self.counter = itertools.count()
        self.nodes: dict[str, Node] = {}
        self.wire_log: list[tuple[float, str, str, bytes]] = []
        self.overlaps: list = []  # (time, group, holders) whenever two nodes that can talk hold one group  # every delivered datagram (time, to, link, data)
        generations = generations or {}
        for name, cfg in configs.items():
            self.nodes[name] = Node(Engine(cfg, generations.get(name, 1), self.now, policy=policy))

    def schedule(self, t: float, node: str, event) -> None:
        heapq.heappush(self.queue, (t, next(self.counter), node, event))

    def restart(self, name: str, cfg: Config, generation: int, floors=None) -> None:
        old = self.nodes[name]
        self.nodes[name] = Node(Engine(cfg, generation, self.now, floors, policy=self.policy),
                                sees_pings=old.sees_pings, running=old.running, faults=old.faults)

    def cut_link(self, link: str, node: str | None = None) -> None:
        """Cut a link in both directions (or only towards `node`)."""
        for n in self.nodes:
            if node is None or n == node:
                self.cut.add((link, n))

    def heal(self) -> None:
        self.cut.clear()

    def deliver(self, event, name: str) -> A.Decision:
        node = self.nodes[name]
        if node.plan is not None:
            self._wake(name)
        d = self._handle(name, event)
        for group in {g for n in self.nodes.values() for g in n.held}:
            holders = self.holders(group)
            if len(holders) > 1 and not self.cut:
                self.overlaps.append((self.now, group, holders))  # both nodes hold it while they can talk
        if self.pump and node.running_daemon and not node.frozen:
            self._plan(name)
        return d

    # -- the fake beat pump -------------------------------------------------------------------------
    def _plan(self, name: str) -> None:
        node = self.nodes[name]
        p = node.engine.plan(self.now, self.pump)
        if p is None:
            return
        node.plan, node.plan_sent, node.plan_heard = p, 0, {}
        node.plans += 1
        node.plan_watch = {**{("link", *k): d for k, (d, _) in p.links.items()},
                           **{("ping", a): d for a, (d, _) in p.pings.items()}}
        node.plan_expected = {data: peer for peer, datagrams in p.expected.items() for data in datagrams}

    def _wake(self, name: str) -> None:
        """Hand the engine back its beats, then what was matched meanwhile: the newest per link, in seq order."""
        node = self.nodes[name]
        node.engine.unplan(node.plan_sent)
        node.plan = None
        heard = sorted(node.plan_heard.values(), key=lambda ev: ev.data[SEQ_AT] if hasattr(ev, "data") else b"")
        for ev in heard:
            self._handle(name, ev)

    def _handle(self, name: str, event) -> A.Decision:
        node = self.nodes[name]
        node.handled += 1
        d = node.engine.handle(event, self.now)
        if d.actions or d.reason:
            node.log.append((self.now, d))
        for a in d.actions:
            self.execute(name, a)
        return d

    def _pumped(self, name: str, event) -> bool:
        """An input the pump takes in without waking the engine: an expected beat or a watched ping node's reply."""
        node = self.nodes[name]
        p = node.plan
        if isinstance(event, E.PacketReceived) and event.data in node.plan_expected:
            cond = (node.plan_expected[event.data], event.link)
            key, extend = ("link", *cond), p.links[cond][1]
            heard = E.PacketReceived(event.link, event.data, self.now, more=True)
        elif isinstance(event, E.PingReply) and event.address in p.pings:
            key, extend = ("ping", event.address), p.pings[event.address][1]
            heard = E.PingReply(event.address, self.now, more=True)
        else:
            return False
        node.plan_watch[key] = max(node.plan_watch[key], self.now + extend)
        node.plan_heard[key] = heard
        return True

    def _pump_due(self, node: Node) -> tuple[float, bool] | None:
        """When the pump acts next: (time, True) to send a beat, (time, False) to wake the engine."""
        p = node.plan
        wake = min([p.until, *node.plan_watch.values()])
        if node.plan_sent < len(p.beats) and p.beats[node.plan_sent][0] < wake:
            due = p.beats[node.plan_sent][0]
            return (due, True) if self.now - due <= p.late else (self.now, False)  # late: stopped meanwhile
        return wake, False

    def execute(self, name: str, a) -> None:
        node = self.nodes[name]
        if isinstance(a, A.Send):
            for other in self.nodes:
                if other != name and (a.link, other) not in self.cut:
                    self.schedule(self.now + self.latency, other, E.PacketReceived(a.link, a.data))
        elif isinstance(a, A.Ping):
            if a.address in node.sees_pings:
                self.schedule(self.now + self.latency, name, E.PingReply(a.address))
        elif isinstance(a, A.RunAgent):
            key = (a.group, a.index)
            rc = node.faults.get((a.group, a.index, a.op))
            if a.op == "start":
                node.running.add(key)  # held from the moment the start begins (worst case for overlap checks)
                rc = 0 if rc is None else rc
            elif a.op == "stop":
                rc = 0 if rc is None else rc
            else:
                rc = (0 if key in node.running else 7) if rc is None else rc
            node.ops_log.append((self.now, a.group, a.index, a.op, rc))
            self.schedule(self.now + self.op_time, name, E.AgentDone(a.group, a.index, a.op, a.op_id, rc))
        elif isinstance(a, A.Exit):
            node.running_daemon = False

    def run_until(self, t_end: float) -> None:
        spin = (None, None, 0)  # (node, time, ticks): the same node's timer firing again and again at one time
        while True:
            candidates = [(self.queue[0][0], 0, "")] if self.queue else []
            for name, node in self.nodes.items():
                if node.running_daemon and not node.frozen:
                    if node.plan is not None:
                        t, send = self._pump_due(node)
                        candidates.append((max(self.now, t), 2 if send else 1, name))
                    else:
                        candidates.append((max(self.now, node.engine.next_deadline()), 1, name))
            if not candidates or min(candidates)[0] > t_end:
                self.now = t_end
                return
            t, from_queue, name = min(candidates)
            self.now = max(self.now, t)
            if from_queue == 2:
                node = self.nodes[name]
                for a in node.plan.beats[node.plan_sent][1]:
                    self.execute(name, a)
                node.plan_sent += 1
                continue
            if from_queue == 1:
                spin = (name, t, spin[2] + 1) if spin[:2] == (name, t) else (name, t, 1)
                if spin[2] > SPIN_TICKS:
                    raise AssertionError(f"{name}'s next_deadline() stays at {t:.3f} after {SPIN_TICKS} ticks there: "
                                         f"a daemon's timer would spin (a deadline the tick does not move)")
                self.deliver(E.Tick(), name)
                continue
            _, _, name, event = heapq.heappop(self.queue)
            node = self.nodes[name]
            if isinstance(event, E.PacketReceived):
                self.wire_log.append((self.now, name, event.link, event.data))
            if isinstance(event, E.AgentDone) and event.op == "stop" and event.rc == 0:
                node.running.discard((event.group, event.index))  # released only when the stop succeeded
            if node.running_daemon and not node.frozen and not (node.plan is not None and self._pumped(name, event)):
                self.deliver(event, name)

    def advance(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    # -- queries --------------------------------------------------------------------------------
    def notices(self, name: str, kind: str) -> list[tuple[float, A.Notify]]:
        return [(t, a) for t, d in self.nodes[name].log for a in d.actions
                if isinstance(a, A.Notify) and a.kind == kind]

    def first(self, name: str, kind: str) -> float | None:
        n = self.notices(name, kind)
        return n[0][0] if n else None

    def status(self, name: str) -> dict:
        node = self.nodes[name]
        if node.plan is None:
            return node.engine.status(self.now)
        self._wake(name)  # as the daemon's shell does for `hastore status`: with what the pump heard meanwhile
        st = node.engine.status(self.now)
        self._plan(name)
        return st

    def holders(self, group: str) -> set[str]:
        return {n for n, node in self.nodes.items() if group in node.held}

    def reasons(self, name: str) -> str:
        return "\n".join(d.reason for _, d in self.nodes[name].log if d.reason)
