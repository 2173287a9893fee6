"""Wiring: the asyncio shell around the engine.

It feeds events to the engine, executes the actions it returns, and re-arms one timer at
`engine.next_deadline()`. Signal handlers only queue an event; the loop acts on it.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import socket
from pathlib import Path
from dataclasses import replace

from hastore.config import ConfigError, load
from hastore.config.model import Config
from hastore.core import actions as A
from hastore.core import events as E
from hastore.core.engine import Engine
from hastore.io import log as hlog
from hastore.io.agents import AgentRunner
from hastore.io.control import ControlError, ControlServer
from hastore.io.pinger import Pinger
from hastore.io.state import StateError, StateStore
from hastore.io.transports import Transport, TransportError, make_transport

# Changing these needs a restart: sockets, identities and the control socket are set up once.
RESTART_FIELDS = ("node", "nodes", "links", "udpport", "control_socket", "state_dir", "groups")

_NOTIFY_LEVEL = {"peer-dead": "warning", "peer-warn": "warning", "link-dead": "warning", "link-warn": "warning",
                 "dual-claim": "error", "group-failed": "error", "cannot-take-over": "warning",
                 "link-trouble": "warning", "unacknowledged": "warning"}


# Notices that are not part of a decision's reason get a log line of their own (rate-limited where noisy).
_OWN_LINE = ("rejected", "link-trouble", "unacknowledged")


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
        self.pinger: Pinger | None = None
        self.ping_targets: dict[str, str] = {}  # configured name or address -> address pinged
        self.ping_names: dict[str, list[str]] = {}  # address -> configured names
        self.control: ControlServer | None = None
        self.runner = AgentRunner(config.groups, _resource_d(config), self._agent_done)
        self.timer: asyncio.TimerHandle | None = None
        self.finished: asyncio.Future | None = None
        self.state = StateStore(config.state_dir)

    # -- lifecycle ------------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.finished = loop.create_future()
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
        for link in self.config.links:
            t = make_transport(link)
            await t.open(self._on_packet, self._on_link_error)
            self.transports[link.id] = t
        if self.config.ping_nodes or self.config.ping_groups:
            self._resolve_ping_targets()
            self.pinger = Pinger()
            await self.pinger.open()  # replies are collected on the beat timer, see _on_timer
        self.control = ControlServer(self.config.control_socket, self.handle_request)
        await self.control.open()

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
        self.runner.cancel_all()
        for t in self.transports.values():
            t.close()
        if self.pinger is not None:
            self.pinger.close()
        if self.control is not None:
            self.control.close()

    # -- the loop -------------------------------------------------------------------------------
    def feed(self, event: E.Event) -> None:
        if self.finished is None or self.finished.done():
            return
        loop = asyncio.get_running_loop()
        decision = self.engine.handle(event, loop.time())
        if decision.reason:
            self._log_decision(decision)
        for action in decision.actions:
            self._execute(action)
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
        if self.timer is not None:
            self.timer.cancel()
        self.timer = loop.call_at(self.engine.next_deadline(), self._on_timer)

    def _on_timer(self) -> None:
        if self.pinger is not None:
            for address in self.pinger.drain():
                for name in self.ping_names.get(address, ()):
                    self.feed(E.PingReply(name))
        self.feed(E.Tick())

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

    def _on_packet(self, link: str, data: bytes) -> None:
        self.feed(E.PacketReceived(link, data))

    def _on_link_error(self, link: str, detail: str) -> None:
        self.feed(E.LinkTrouble(link, detail))

    # -- control and reload ---------------------------------------------------------------------
    def handle_request(self, request: dict) -> dict:
        cmd = request.get("cmd")
        loop = asyncio.get_running_loop()
        if cmd == "status":
            status = self.engine.status(loop.time())
            status["links"] = {lid: dict(t.stats) for lid, t in self.transports.items()}
            return {"ok": True, "status": status}
        if cmd == "reload":
            return self.reload()
        if cmd in ("standby", "takeover"):
            scope = request.get("scope", "all")
            if scope not in ("all", "local", "foreign", "failback"):
                return {"ok": False, "error": f"unknown scope {scope!r}; use all, local, foreign or failback"}
            loop.call_soon(self.feed, E.Admin(cmd, scope))
            return {"ok": True, "detail": f"{cmd} {scope}: asked; `hastore status` shows the groups moving"}
        if cmd == "shutdown":
            loop.call_soon(self.feed, E.Shutdown())
            return {"ok": True, "detail": "shutting down: releasing groups, then telling the peer"}
        return {"ok": False, "error": f"unknown command {cmd!r}; known: status, reload, standby, takeover, shutdown"}

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
        for w in new.warnings:
            self.log.warning("config", detail=w)
        self.feed(E.Reload(new))
        return {"ok": True, "detail": "configuration reloaded"}


def _resource_d(config: Config) -> Path | None:
    """Heartbeat scripts live in resource.d beside ha.cf."""
    src = Path(config.source) if config.source else None
    if src is None:
        return None
    base = src if src.is_dir() else src.parent
    return base / "resource.d"


def run(config: Config, allow_insecure_auth: bool = False) -> int:
    try:
        return asyncio.run(Daemon(config, allow_insecure_auth).run())
    except (TransportError, ControlError, StateError) as e:
        hlog.get().error("cannot start", reason=str(e))
        return 1
