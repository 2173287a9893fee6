"""Wiring: the asyncio shell around the engine.

It feeds events to the engine, executes the actions it returns, and re-arms one timer at
`engine.next_deadline()`. Signal handlers only queue an event; the loop acts on it.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

from hastore.config import ConfigError, load
from hastore.config.model import Config, LinkKind
from hastore.core import actions as A
from hastore.core import events as E
from hastore.core.engine import Engine, GroupState
from hastore.core.wire import SEQ_AT
from hastore.io import log as hlog
from hastore.io.agents import AgentRunner
from hastore.io.control import ControlError, ControlServer
from hastore.io.guard import HANDOVER_ENV, RESTART_GRACE_MS, STARTUP_S, GuardClient, GuardError
from hastore.io import pump
from hastore.io.pinger import Pinger
from hastore.io.state import StateError, StateStore
from hastore.io.transports import (SerialTransport, Transport, TransportError, UdpTransport, arrival, claim_port,
                                   make_transport, turn_away)

# Changing these needs a restart: sockets, identities and the control socket are set up once.
RESTART_FIELDS = ("node", "nodes", "links", "udpport", "control_socket", "state_dir", "groups", "guard")

_NOTIFY_LEVEL = {"peer-dead": "warning", "peer-warn": "warning", "link-dead": "warning", "link-warn": "warning",
                 "dual-claim": "error", "group-failed": "error", "cannot-take-over": "warning",
                 "link-trouble": "warning", "unacknowledged": "warning"}


# Notices that are not part of a decision's reason get a log line of their own (rate-limited where noisy).
_OWN_LINE = ("rejected", "link-trouble", "unacknowledged")
# How far ahead the engine hands its routine beats to the beat pump at most (Engine.plan): the daemon wakes at
# least this often, and a daemon frozen while the pump runs stops beating (and petting its guard) by then.
PUMP_HORIZON_S = 5.0
AWAITED_PINGS = 8  # per ping node: echo requests sent before a plan whose replies it still matches
PUMP_ENV = "HASTORE_PUMP"  # "off": never use the beat pump (comparisons, see bench/detection.py)


class _Batch:
    """Feeds inside `with daemon.batch:` re-arm no timer (see Daemon.feed) and drain nothing first: they are part
    of one pass. (A class: a generator-based context manager costs several times more on every beat tick.)"""

    __slots__ = ("on",)

    def __init__(self) -> None:
        self.on = False

    def __enter__(self) -> None:
        self.on = True

    def __exit__(self, *exc) -> None:
        self.on = False


def _describe(a: A.Action) -> str:
    if isinstance(a, A.StartGroup):
        return f"start {a.group}"
    if isinstance(a, A.StopGroup):
        return f"stop {a.group}"
    return "exit"


class Daemon:
    def __init__(self, config: Config, allow_insecure_auth: bool = False):
        self.config = config
        self.allow_insecure_auth = allow_insecure_auth
        self.log = hlog.get()
        self.limiter = hlog.RateLimiter(10.0)
        self.engine: Engine | None = None
        self.transports: dict[str, Transport] = {}
        self.drain_order: list[Transport] = []
        self.port_claims: list[socket.socket] = []  # held for the daemon's life: see claim_port
        self.batch = _Batch()  # on inside the beat timer's drains (see _on_timer)
        self.ticks = 0  # timer ticks since the links were last read on one (see _on_timer)
        self.tick_read = False  # on while the beat timer reads the links: the tick decides on what they held
        self.timer_stats = {"fired": 0, "read": 0}  # the engine's timer: how often it fired, and read first
        self.pings_read = 0.0  # loop time of the last collection of echo replies
        self.pinger: Pinger | None = None
        self.ping_targets: dict[str, str] = {}  # configured name or address -> address pinged
        self.ping_names: dict[str, list[str]] = {}  # address -> configured names
        self.control: ControlServer | None = None
        self.runner = AgentRunner(config.groups, _resource_d(config), self._agent_done, self.log)
        self.timer: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # the running loop, from run() on
        self.finished: asyncio.Future | None = None
        self.state = StateStore(config.state_dir)
        self.guard: GuardClient | None = None
        self.held_key: list[tuple[str, int]] | None = []  # the resources the guard was last told we hold
        #                                                     (None: an inherited guard's list, not known)
        self.restarting = False  # `hastore restart`: the loop ends and the process re-executes itself
        self.handover = ""  # then: what the new image needs to take over the guard (HANDOVER_ENV)
        self.fenced = False  # the guard fenced this node: nothing more is decided, we exit once it is done
        self.farewell_key: tuple | None = None  # what the guard's farewell datagrams were made for
        self.pump: pump.Pump | None = None  # the beat pump, when built and not turned off (PUMP_ENV)
        self.pumped: tuple[list, list, list] | None = None  # while it runs: its inputs, expectations, outputs
        self.pump_stats: Counter = Counter()  # plans handed to the pump, and why each ended (status' "pump")
        self.stall_ms = 0

    # -- lifecycle ------------------------------------------------------------------------------
    async def run(self) -> int:
        self.loop = loop = asyncio.get_running_loop()
        self.finished = loop.create_future()
        self.state.lock()
        generation = self.state.next_generation()
        self.engine = Engine(self.config, generation, loop.time(), self.state.load_floors())
        try:
            await self._open_io()
            for sig, event in ((signal.SIGTERM, E.Shutdown()), (signal.SIGINT, E.Shutdown())):
                loop.add_signal_handler(sig, self.feed, event)
            loop.add_signal_handler(signal.SIGHUP, self.reload)
            self.log.info("started", node=self.config.node, generation=generation, peers=list(self.config.peers),
                          links=list(self.transports), config=self.config.source)
            for w in self.config.warnings:
                self.log.warning("config", detail=w)
            # Everything allocated so far lives as long as the daemon: keep the cyclic GC from re-walking it
            # on every collection (measurably cheaper idle loop, see bench/detection.py).
            gc.collect()
            gc.freeze()
            self.feed(E.Tick())
            return await self.finished
        finally:
            self._close_io()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    async def _open_io(self) -> None:
        # Links bound to the same address, port and interface would share one SO_REUSEPORT group, where the
        # steering's socket indexes no longer mean this link's two sockets: those links wake for everything.
        bound = Counter(_bind_key(link) for link in self.config.links)
        loop = asyncio.get_running_loop()
        for interface, port in sorted({(link.interface or "", link.port) for link in self.config.links
                                       if link.kind is not LinkKind.SERIAL}):
            claim = claim_port(interface, port)  # before any bind (see claim_port); _close_io lets go
            self.port_claims.append(claim)
            loop.add_reader(claim.fileno(), turn_away, claim)
        for link in self.config.links:
            t = make_transport(link)
            t.on_state = self._on_link_state
            # quiet: see hastore.io.transports; news is handled like a tick without the beat (_on_wake)
            await t.open(self._on_packet, self._on_link_error, quiet=bound[_bind_key(link)] == 1,
                         on_wake=self._on_wake)
            self.transports[link.id] = t
        # Drained on the beat timer in this order: the UDP links first, whose datagrams carry the kernel's time, so
        # that a serial frame read late finds the time its copy came over UDP (Engine._arrival).
        self.drain_order = sorted(self.transports.values(), key=lambda t: isinstance(t, SerialTransport))
        if self.config.ping_nodes or self.config.ping_groups:
            self._resolve_ping_targets()
            self.pinger = Pinger()
            self.pinger.on_route = self._on_ping_route
            await self.pinger.open()  # replies are collected on the beat timer, see _on_timer
        if pump.available() and os.environ.get(PUMP_ENV) != "off":
            self.pump = pump.Pump()
            loop.add_reader(self.pump.wake_fd, self._on_pump_wake)
        self.runner.start_launcher()
        self.control = ControlServer(self.config.control_socket, self.handle_request)
        await self.control.open()
        if self.config.guard:  # last: nothing above may block the loop past guard_timeout once it watches
            self.guard = GuardClient(self.config.guard_timeout, self.config.logging.logfile, self._on_guard_change,
                                     asyncio.get_running_loop())
            inherited = os.environ.pop(HANDOVER_ENV, None)
            if inherited:  # we are a `hastore restart`: the guard of the previous image keeps watching
                self.guard.adopt(inherited)
                self.held_key = None
            else:
                self.guard.start()
            self.runner.spawned = self.guard.track_agents

    def _resolve_ping_targets(self) -> None:
        """Ping nodes may be host names (as in ha.cf): resolve them once, at start and on reload."""
        names = list(self.config.ping_nodes) + [a for g in self.config.ping_groups for a in g.addresses]
        self.ping_targets, self.ping_names = {}, {}
        for name in dict.fromkeys(names):
            try:
                address = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)[0][4][0]
            except (socket.gaierror, UnicodeError) as e:
                self.log.error("ping node", detail=f"cannot resolve ping node {name!r}: {e}; it counts as unreachable")
                continue
            self.ping_targets[name] = address
            self.ping_names.setdefault(address, []).append(name)

    def _close_io(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.pump is not None:
            self._own_io()
            self._drop_pump()
        self.runner.cancel_all()
        if self.guard is not None and self.restarting:
            self.handover = self.guard.hand_over()  # the socket outlives exec: the guard sees no EOF
        elif self.guard is not None:
            if self.held_key and not self.fenced:
                self.log.error("exiting", reason=f"exiting while {self._held_names()} may still run here: the guard "
                                                 f"stops them")
            self.guard.close(bye=self.held_key == [])  # bye only once nothing is held: else the guard fences
        for t in self.transports.values():
            t.close()
        for claim in self.port_claims:
            asyncio.get_running_loop().remove_reader(claim.fileno())
            claim.close()
        if self.pinger is not None:
            self.pinger.close()
        if self.control is not None:
            self.control.close()

    # -- the loop -------------------------------------------------------------------------------
    def feed(self, event: E.Event, drained: bool = False) -> None:
        if self.finished is None or self.finished.done():
            return
        self._own_io()
        if not self.batch.on and not drained:
            self._drain_all()  # decide on every beat that has come, not only on those the last tick read
        loop = self.loop
        if not self._guard_ok(loop.time()):
            return
        decision = self.engine.handle(event, loop.time())
        if not decision.actions and not decision.reason:
            if not self.batch.on:
                self._rearm(loop)  # nothing changed (a repeated beat, a ping node still visible): the cheap path
            return
        if decision.reason:
            self._log_decision(decision)
            self._retime_guard()  # first: a peer just heard from may take over deadtime after our next silence
        for action in decision.actions:
            self._execute(action)
        if self.guard is not None and (isinstance(event, E.AgentDone) or
                                       any(isinstance(a, A.RunAgent) for a in decision.actions)):
            self._tell_guard_held()
        if self.guard is not None and self.engine.farewell_key() != self.farewell_key:
            self._tell_guard_farewell()
        self._rearm(loop)

    def _log_decision(self, d: A.Decision) -> None:
        """One line per decision: its reason, what it does, and the kinds of what it noticed."""
        kinds = [a.kind for a in d.actions if isinstance(a, A.Notify) and a.kind not in _OWN_LINE]
        does = [_describe(a) for a in d.actions if isinstance(a, (A.StartGroup, A.StopGroup, A.Exit))]
        levels = [_NOTIFY_LEVEL.get(k, "info") for k in kinds]
        level = "error" if "error" in levels else "warning" if "warning" in levels else "info"
        fields = {k: v for k, v in (("noticed", kinds), ("actions", does)) if v}
        getattr(self.log, level)("decision", reason=d.reason, **fields)

    def _rearm(self, loop: asyncio.AbstractEventLoop) -> None:
        self._plan_beats(loop.time())
        when = self.engine.next_deadline()
        if self.pump is not None and self.pump.running:
            when += self.engine.planned.late  # a backup: the pump wakes us at the plan's end itself
        if self.timer is not None:
            if self.timer.when() == when and not self.timer.cancelled():
                return
            self.timer.cancel()
        self.timer = loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        """The engine's timer: most often our beat. What the quiet links and the ICMP socket hold (routine beats,
        echo replies, all with the kernel's receive time) is read first only when the engine needs it to decide
        (Engine.needs_input): while all is well, on every second or third tick (see status' timer)."""
        self.timer = None  # fired: whatever comes next must arm a new one
        self._own_io()
        self.ticks += 1
        self.timer_stats["fired"] += 1
        try:
            if self.engine.needs_input(self.loop.time()):
                self.timer_stats["read"] += 1
                self._read_pings()  # first, and decided on with the links' news and the tick (PingReply.more)
                self.tick_read = True  # the packets too (PacketReceived.more)
                try:
                    self._drain_all(ticks=self.ticks)
                finally:
                    self.tick_read = False
                self.ticks = 0
            self._quiet_serial()
        finally:
            self.feed(E.Tick(), drained=True)  # whatever went wrong above, the next beat and timer must come

    def _read_pings(self) -> None:
        if self.pinger is None:
            return
        now = self.loop.time()
        since, self.pings_read = self.pings_read, now
        try:
            replies = self.pinger.drain()
        except Exception as e:  # noqa: BLE001 - as for a link (_drain_all): the links and the beat still come
            self.log.error("ping", detail=f"reading echo replies failed: {e!r}")
            return
        with self.batch:
            for address, stamp in replies:
                at = arrival(stamp, now, since)
                for name in self.ping_names.get(address, ()):
                    self.feed(E.PingReply(name, at, more=True))

    def _drain_all(self, ticks: int = 0) -> None:
        """Feed what every link holds, UDP first (see drain_order). What these packets decide re-arms nothing
        (batch): the caller re-arms once."""
        self._own_io()
        with self.batch:
            for t in self.drain_order:
                try:
                    t.drain(ticks)
                except Exception as e:  # noqa: BLE001 - one link's trouble must not stop the beat
                    self.log.error("link-trouble", link=t.link.id, detail=f"reading failed: {e!r}")

    def _on_wake(self) -> None:
        """News on a quiet link: read every link (in arrival order per link) and decide, as a tick would."""
        if self.finished is None or self.finished.done():
            return
        self._drain_all()
        self._rearm(self.loop)

    # -- the beat pump (hastore.io.pump) -----------------------------------------------------------
    def _plan_beats(self, now: float) -> None:
        """While the engine is calm, hand its routine beats for the next stretch to the pump, which wakes the
        daemon only when something happens (see Engine.plan). Not while any link cannot leave its traffic to it."""
        if self.pump is None or self.pump.running or self.fenced or self.finished.done():
            return
        plan = self.engine.plan(now, PUMP_HORIZON_S)
        if plan is None:
            return
        inputs, owners, hooks = [], [], {}
        for t in self.drain_order:
            hook = t.pumped()
            if hook is None:
                self.engine.unplan(0)
                self.pump_stats[f"not while {t.link.id} is busy"] += 1
                return
            hooks[t.link.id] = (t, len(inputs), hook)
            inputs.append(hook[:2])
            owners.append(t)
        icmp = {}  # the ICMP sockets, read only where an echo reply is expected
        watch = {("link", *k): i for i, k in enumerate(plan.links)}
        watch.update({("ping", a): len(plan.links) + i for i, a in enumerate(plan.pings)})
        watches = [*plan.links.values(), *plan.pings.values()]
        expects, meaning = [], []  # meaning: (link, datagram, late) or (None, ping name, False)
        for peer, datagrams in plan.expected.items():
            for link, (t, i, hook) in hooks.items():
                w = watch.get(("link", peer, link))
                for k, data in enumerate(datagrams if w is not None else ()):
                    expects.append((i, w, k, t.pump_bytes(data), None))
                    meaning.append((link, data, hook[1] == pump.STREAM))
        def expect_reply(name: str, fd: int, reply: bytes, source: bytes) -> None:
            if fd not in icmp:
                icmp[fd] = len(inputs)
                inputs.append((fd, pump.ICMP))
                owners.append(None)
            expects.append((icmp[fd], watch[("ping", name)], -1, reply, source))
            meaning.append((None, name, False))
        for name in plan.pings:  # replies still due to echo requests sent before this plan (by the loop or a pump)
            if name in self.ping_targets and self.pinger is not None:
                for fd, reply, source in self.pinger.awaited(self.ping_targets[name], AWAITED_PINGS):
                    expect_reply(name, fd, reply, source)
        outputs, senders = [], []  # senders: the transport of each output (None: a ping)
        for b, (due, actions) in enumerate(plan.beats):
            for a in actions:
                if isinstance(a, A.Send):
                    t, _, hook = hooks[a.link]
                    outputs.append((due, b, hook[0], hook[2], t.pump_bytes(a.data)))
                    senders.append(t)
                elif isinstance(a, A.Ping) and self.pinger is not None and a.address in self.ping_targets:
                    ready = self.pinger.prepare(self.ping_targets[a.address])
                    if ready is None:
                        continue
                    fd, dest, request, reply, source = ready
                    outputs.append((due, b, fd, dest, request))
                    senders.append(None)
                    if ("ping", a.address) in watch:
                        expect_reply(a.address, fd, reply, source)
        g = self.guard
        pets = g.pet_fd if g is not None and g.pets is not None and not g.gone else None
        try:
            self.pump.start(outputs, inputs, expects, watches, plan.until, plan.late, pets,
                            max(map(len, plan.expected.values()), default=0))
        except (OSError, ValueError, RuntimeError) as e:
            self.engine.unplan(0)
            self.log.error("pump", detail=f"the beat pump refused a plan: {e!r}; beating from the loop")
            self._drop_pump()
            return
        self.pumped = (owners, meaning, senders)
        self.pump_stats["plans"] += 1

    def _drop_pump(self) -> None:
        p, self.pump = self.pump, None
        if not self.loop.is_closed():
            self.loop.remove_reader(p.wake_fd)
        p.close()

    def _own_io(self) -> None:
        """Before the daemon reads a link or decides anything: stop the pump, and take in what it did meanwhile."""
        if self.pump is None or not self.pump.running:
            return
        taken = self.pump.stop()
        if self.guard is not None and taken.last_pet:  # first: every feed below asks whether we stalled (_guard_ok)
            self.guard.last_sent = max(self.guard.last_sent, taken.last_pet)
        owners, meaning, senders = self.pumped
        self.pumped = None
        self.pump_stats[taken.why] += 1
        self.engine.unplan(taken.sent)
        for t in self.transports.values():
            t.stats["sent"] += taken.sent
        packets = []
        with self.batch:
            for e, at in taken.matches:
                link, what, late = meaning[e]
                if link is None:
                    self.feed(E.PingReply(what, at, more=True), drained=True)
                else:
                    packets.append(E.PacketReceived(link, what, at, late, True))
            for i, data, at in taken.others:
                t = owners[i]
                if isinstance(t, SerialTransport):
                    packets += [E.PacketReceived(t.link.id, frame, at, True, True) for frame in t.frames(data)]
                elif t is not None and data:
                    packets.append(E.PacketReceived(t.link.id, data, at, False, True))
            packets.sort(key=lambda ev: bytes(ev.data[SEQ_AT]))  # the verifier's marks see them in sequence (all
            # but garbage come from the peer, whose seq numbers grow), whichever link and way they came in
            for ev in packets:
                self.feed(ev, drained=True)
        if taken.failed is not None and senders[taken.failed[0]] is not None:
            # Last, once what was heard is in: this report is decided on at once (LinkTrouble), and a decision on
            # liveness as of the pump's start took a peer that was beating for dead. As if the loop had sent it:
            # a link that cannot be used here is down (LinkState), and not left to the pump while it is
            senders[taken.failed[0]].pump_failed(taken.failed[1])

    def _on_pump_wake(self) -> None:
        """The pump stopped on its own (see hastore.io.pump): a tick, with what it did taken in first."""
        if self.pump is None:
            return
        if not self.pump.running:  # taken meanwhile (an event, the backup timer): nothing left to do
            try:
                os.eventfd_read(self.pump.wake_fd)
            except BlockingIOError:
                pass
            return
        self._own_io()
        if self.timer is not None:
            self.timer.cancel()
        self._on_timer()

    def _execute(self, a: A.Action) -> None:
        if isinstance(a, A.Send):
            t = self.transports.get(a.link)
            if t is not None:
                t.send(a.data)
        elif isinstance(a, A.Ping):
            if self.pinger is not None and a.address in self.ping_targets:
                self.pinger.ping(self.ping_targets[a.address])
        elif isinstance(a, A.RunAgent):
            self.runner.run(a.group, a.index, a.op, a.timeout_s, a.op_id)
        elif isinstance(a, A.PersistGenerations):
            try:
                self.state.save_floors(a.generations)
            except OSError as e:
                self.log.error("state", detail=f"cannot store peer generations: {e}")
        elif isinstance(a, A.Notify) and a.kind in _OWN_LINE:
            self._notify(a)
        elif isinstance(a, A.Exit):
            self.log.info("exiting", node=self.config.node, code=a.code)
            if not self.finished.done():
                self.finished.set_result(a.code)

    def _notify(self, a: A.Notify) -> None:
        if a.kind in ("rejected", "link-trouble"):
            ok, held = self.limiter.allow(f"{a.kind}:{a.link}:{a.detail.split(':')[0]}")
            if not ok:
                return
            if held:
                self.log.warning(a.kind, detail=a.detail, suppressed_since_last=held)
                return
        level = _NOTIFY_LEVEL.get(a.kind, "info")
        getattr(self.log, level)(a.kind, detail=a.detail, **{k: v for k, v in
                                                              (("peer", a.peer), ("link", a.link), ("group", a.group)) if v})

    def _agent_done(self, group: str, index: int, op: str, op_id: int, rc: int, detail: str) -> None:
        self.feed(E.AgentDone(group, index, op, op_id, rc, detail))

    def _on_packet(self, link: str, data: bytes, at: float | None, late: bool) -> None:
        self.feed(E.PacketReceived(link, data, at, late, self.tick_read))

    def _quiet_serial(self) -> None:
        """A serial line waits for the beat timer only while a quiet UDP link carries the peer's beats: news (a
        leave, a request, a changed beat) comes over that at once. Otherwise the serial line is read as frames
        come, so news over it alone is not held back a keepalive."""
        quiet = any(isinstance(t, UdpTransport) and t.quiet and self.engine.link_alive(t.link.id)
                    for t in self.transports.values())
        for t in self.transports.values():
            if isinstance(t, SerialTransport):
                t.set_quiet(quiet)

    def _on_link_error(self, link: str, detail: str) -> None:
        self.feed(E.LinkTrouble(link, detail))

    def _on_link_state(self, link: str, usable: bool) -> None:
        # heard while executing a decision's sends: decided on once that decision is done
        asyncio.get_running_loop().call_soon(self.feed, E.LinkState(link, usable))

    def _on_ping_route(self, address: str, routable: bool) -> None:
        for name in self.ping_names.get(address, ()):
            asyncio.get_running_loop().call_soon(self.feed, E.PingRoute(name, routable))

    # -- the guard ----------------------------------------------------------------------------
    def _tell_guard_held(self) -> None:
        """Send the guard what may run here (started, starting, stopping, failed), in start order, when it changed."""
        if any(g.state is GroupState.PROBING for g in self.engine.groups.values()):
            return  # after a restart the guard keeps the previous list until we know what runs here
        key = [(name, i) for name, ops in self.engine.ops.items() for i in ops.held()]
        if key == self.held_key:
            return
        self.held_key = key
        held = []
        for name, i in key:
            timeout = self.engine.ops[name].timeout_s("stop", i)
            cmd = self.runner.command(name, i, "stop", timeout)
            if cmd is not None:
                held.append({"name": f"{name}/{self.runner.names[(name, i)]}", "argv": list(cmd.argv),
                             "env": cmd.env, "timeout_s": timeout})
        self.guard.hold(held)

    def _tell_guard_farewell(self) -> None:
        """Hand the guard the signed LEAVE it sends to the peer after it has stopped everything here."""
        self.farewell_key = self.engine.farewell_key()
        targets = [t for t in (tr.target() for tr in self.transports.values()) if t is not None]
        self.guard.set_farewell([{**t, "data": data.hex()} for data in self.engine.farewell() for t in targets])

    def _held_names(self) -> str:
        return ", ".join(f"{name}/{self.runner.names[(name, i)]}" for name, i in self.held_key or ())

    def _guard_ok(self, now: float) -> bool:
        """Before every decision: pets the guard (at most every eighth of guard_timeout), and is False once the
        guard fenced this node. Pets go with every event, not only the timer's: an event in the same loop pass
        cancels the timer (_rearm), and the engine's deadlines make some event come at least every keepalive.
        After a stall longer than guard_timeout (the loop did not run: SIGSTOP, a frozen VM) the guard may have
        fenced meanwhile: ask it, and wait for the answer, before deciding anything on a belief that may be stale."""
        if self.guard is None or self.fenced:
            return not self.fenced
        gap, configured = self.guard.silence(now), self.config.guard_timeout / 1000
        if gap <= self.guard.timeout_s or self.guard.gone:
            if gap >= configured / 8:  # guard_timeout's cadence, whatever the guard allows now (_retime_guard)
                self.guard.pet()
            if gap > configured and not self.guard.gone:
                self.log.warning("stalled", reason=f"the daemon did not run for {int(gap * 1000)} ms, more than "
                                                   f"guard_timeout ({self.config.guard_timeout} ms); the guard "
                                                   f"allows {self.guard.timeout_ms} ms while the peer is down: "
                                                   f"carrying on")
            return True
        self.stall_ms = int(gap * 1000)
        answer = self.guard.confirm(max(1.0, self.guard.timeout_s))
        if answer is not False:
            said = "the guard had not fenced" if answer else "the guard does not answer"
            self.log.warning("stalled", reason=f"the daemon did not run for {self.stall_ms} ms (guard_timeout "
                                               f"{self.guard.timeout_ms} ms); {said}: carrying on")
        self._on_guard_change()
        self.stall_ms = 0  # measured for this stall only: a later fencing reports its own freeze
        return not self.fenced

    def _retime_guard(self) -> None:
        """Give the guard the timeout the engine asks for now (Engine.guard_timeout), saying why when it changes."""
        if self.guard is None or self.fenced:
            return
        ms, why = self.engine.guard_timeout()
        if ms != self.guard.timeout_ms:
            self.guard.set_timeout(ms)
            self.log.info("guard", reason=f"guard timeout {why}")

    def _on_guard_change(self) -> None:
        """The guard said it fenced, or it is gone. Idempotent: called by the pipe's reader and after a stall."""
        g = self.guard
        if g is None or self.finished.done():
            return
        if g.fencing is not None and not self.fenced:
            self.fenced = True
            if self.timer is not None:
                self.timer.cancel()
            # since our last message: the freeze, unless _guard_ok measured it before its sync
            frozen = max(self.stall_ms, int(g.silence(time.monotonic()) * 1000))
            self.log.error("fenced", reason=f"the guard self-fenced this node while the daemon was not running "
                                            f"(frozen {frozen} ms); exiting so a supervisor restarts it clean",
                           guard=g.fencing.get("reason"))
        if not g.gone:
            return  # when fenced: wait until the guard has stopped everything, or a restart could adopt it midway
        if self.fenced:
            self.log.info("exiting", node=self.config.node, code=3)
            self.finished.set_result(3)
            return
        self._guard_lost()

    def _guard_lost(self) -> None:
        """The guard exited without fencing (killed, or a bug): start another, unless it dies young."""
        g = self.guard
        lived = time.monotonic() - g.started_at
        what = f"the guard (pid {g.proc.pid}) exited without fencing ({g.describe_exit()})"
        if lived > g.timeout_s:
            self.log.error("guard", reason=f"{what}: starting a new one")
            try:
                # While resources run here: wait no longer than the guard would for us (the peer's deadtime is a
                # keepalive further), not the first start's STARTUP_S
                g.start(wait_s=min(STARTUP_S, max(1.0, g.timeout_s)))
                return
            except GuardError as e:
                what = str(e)
        self.log.error("guard", reason=f"{what}: this node is unguarded; releasing groups and leaving")
        g.close(bye=True)
        self.guard = None
        self.runner.spawned = None
        self.feed(E.Shutdown())

    # -- control and reload ---------------------------------------------------------------------
    def handle_request(self, request: dict) -> dict:
        cmd = request.get("cmd")
        loop = asyncio.get_running_loop()
        if cmd == "status":
            self._on_wake()  # what the quiet links hold (see _on_timer): the ages shown are the last beats'
            status = self.engine.status(loop.time())
            status["links"] = {lid: dict(t.stats) for lid, t in self.transports.items()}
            status["guard"] = self.guard.status() if self.guard is not None else None
            status["timer"] = dict(self.timer_stats)
            status["pump"] = {"on": self.pump is not None, **self.pump_stats}
            return {"ok": True, "status": status}
        if cmd == "reload":
            return self.reload()
        if cmd in ("standby", "takeover"):
            scope = request.get("scope", "all")
            if scope not in ("all", "local", "foreign", "failback"):
                return {"ok": False, "error": f"unknown scope {scope!r}; use all, local, foreign or failback"}
            loop.call_soon(self.feed, E.Admin(cmd, scope))
            return {"ok": True, "detail": f"{cmd} {scope}: asked; `hastore status` shows the groups moving"}
        if cmd == "restart":
            busy = [n for n, g in self.engine.groups.items()
                    if g.state in (GroupState.PROBING, GroupState.STARTING, GroupState.STOPPING)]
            if busy:
                return {"ok": False, "error": f"not restarting while group(s) {', '.join(busy)} are "
                                              f"{'/'.join(sorted({self.engine.groups[n].state.value for n in busy}))}"
                                              f": try again when they have settled"}
            if self.fenced:
                return {"ok": False, "error": "this node was fenced: the daemon is exiting"}
            self.feed(E.Restarting(RESTART_GRACE_MS + self.config.timing.deadtime_ms))
            loop.call_later(0.05, self._restart)  # the beat that tells the peer leaves first (serial: flushed)
            return {"ok": True, "detail": "restarting in place: the new daemon adopts the running resources"}
        if cmd == "shutdown":
            loop.call_soon(self.feed, E.Shutdown())
            return {"ok": True, "detail": "shutting down: releasing groups, then telling the peer"}
        return {"ok": False, "error": f"unknown command {cmd!r}; known: status, reload, restart, standby, takeover, "
                                     f"shutdown"}

    def _restart(self) -> None:
        """`hastore restart`: leave the loop and re-execute this program in place (same pid, same arguments).
        Nothing is stopped and the peer is not told we leave: the new image probes and adopts the resources,
        within deadtime if it starts fast enough (its first beat goes out as soon as it runs)."""
        if self.finished.done():
            return
        self.restarting = True
        self.log.warning("restarting", node=self.config.node, reason="hastore restart: re-executing the daemon "
                                                                     "in place; resources keep running")
        self.finished.set_result(0)

    def reload(self) -> dict:
        try:
            new = load(self.config.source, node=self.config.node, allow_insecure_auth=self.allow_insecure_auth)
        except ConfigError as e:
            self.log.error("reload refused", reason="the new configuration is invalid; keeping the old one",
                           errors=e.errors)
            return {"ok": False, "error": str(e)}
        new = replace(new, control_socket=self.config.control_socket, state_dir=self.config.state_dir)
        needs_restart = [f for f in RESTART_FIELDS if getattr(new, f) != getattr(self.config, f)]
        if needs_restart:
            why = f"changing {', '.join(needs_restart)} needs a restart; keeping the old configuration"
            self.log.error("reload refused", reason=why)
            return {"ok": False, "error": why}
        self.config = new
        if self.pinger is not None:
            self._resolve_ping_targets()
            self.pinger.unroutable.clear()  # addresses may have changed: the next echo requests say again (Reload)
        for w in new.warnings:
            self.log.warning("config", detail=w)
        self.feed(E.Reload(new))  # its decision always has a reason, so feed gives the guard its timeout anew
        return {"ok": True, "detail": "configuration reloaded"}


def _bind_key(link) -> tuple:
    """What a UDP link's socket is bound to (multicast binds the group; ucast and bcast the wildcard)."""
    if link.kind is LinkKind.SERIAL:
        return ("serial", link.id)
    group = link.address.split("%")[0] if link.kind is LinkKind.MCAST else ""
    return (link.interface, link.port, group)


def _resource_d(config: Config) -> Path | None:
    """Heartbeat scripts live in resource.d beside ha.cf."""
    src = Path(config.source) if config.source else None
    if src is None:
        return None
    base = src if src.is_dir() else src.parent
    return base / "resource.d"


def run(config: Config, allow_insecure_auth: bool = False) -> int:
    daemon = Daemon(config, allow_insecure_auth)
    try:
        rc = asyncio.run(daemon.run())
    except (TransportError, ControlError, StateError, GuardError) as e:
        hlog.get().error("cannot start", reason=str(e))
        return 1
    if daemon.restarting:
        _reexec(daemon.handover)
    return rc


def _reexec(handover: str) -> None:
    """Replace this process with a fresh `hastore run` of the same command line; never returns."""
    env = dict(os.environ)
    if handover:
        env[HANDOVER_ENV] = handover
    sys.stdout.flush()
    sys.stderr.flush()
    argv = [sys.executable, *sys.orig_argv[1:]]
    os.execve(sys.executable, argv, env)
