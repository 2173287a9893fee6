"""The native front door: hastore.toml -> Config. Messages are "FILE: key.path: message".

The schema is documented in docs/configuration.md; `to_toml` (convert.py) writes it back.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
from typing import Any

from .common import default_timing, make_link
from .durations import parse_duration
from .errors import ConfigError
from .files import check_private, read_text
from .model import (
    DEFAULT_BAUD,
    DEFAULT_SOCKET,
    DEFAULT_STATE_DIR,
    DEFAULT_UDP_PORT,
    Auth,
    AuthAlgorithm,
    AuthKey,
    AutoFailback,
    Config,
    Group,
    LinkKind,
    Logging,
    PingGroup,
    Resource,
    Respawn,
    Stonith,
)
from .validate import Locator, check

LINK_KEYS = {
    LinkKind.UCAST: ("kind", "interface", "address", "port"),
    LinkKind.BCAST: ("kind", "interface", "port"),
    LinkKind.MCAST: ("kind", "interface", "group", "port", "ttl", "loop"),
    LinkKind.SERIAL: ("kind", "device", "baud"),
}
_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", list: "a list", dict: "a table"}


class Table:
    """One TOML table being read: typed getters that record errors, and a check for unknown keys."""

    def __init__(self, data: dict, path: str, file: str, errors: list[str]) -> None:
        self.data, self.path, self.file, self.errors = data, path, file, errors
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, msg: str) -> None:
        self.errors.append(f"{self.file}: {self.key(name)}: {msg}")

    def get(self, name: str, kind: type, default: Any = None, required: bool = False) -> Any:
        self.used.add(name)
        if name not in self.data:
            if required:
                self.error(name, "is required")
            return default
        value = self.data[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.error(name, f"must be {_TYPE_NAMES[kind]}, not {_describe(value)}")
            return default
        return value

    def strings(self, name: str, required: bool = False) -> list[str]:
        values = self.get(name, list, [], required)
        if not all(isinstance(v, str) for v in values):
            self.error(name, "must be a list of strings")
            return []
        return values

    def table(self, name: str) -> Table:
        return Table(self.get(name, dict, {}), self.key(name), self.file, self.errors)

    def tables(self, name: str, required: bool = False) -> list[Table]:
        items = self.get(name, list, [], required)
        if not all(isinstance(v, dict) for v in items):
            self.error(name, f"must be an array of tables ([[{self.key(name)}]])")
            return []
        return [Table(v, f"{self.key(name)}[{i}]", self.file, self.errors) for i, v in enumerate(items)]

    def finish(self, allowed: tuple[str, ...] | None = None) -> None:
        for name in self.data:
            if name in self.used:
                continue
            choices = list(allowed or self.used)
            hint = difflib.get_close_matches(name, choices, n=1)
            self.error(name, "unknown key" + (f" (did you mean '{hint[0]}'?)" if hint else
                                              f" (this table takes: {', '.join(sorted(choices))})"))


def _describe(value: Any) -> str:
    for kind, text in _TYPE_NAMES.items():
        if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            return text
    return type(value).__name__


def load_toml(path: str, node: str, allow_insecure: bool = False) -> Config:
    errors: list[str] = []
    text = read_text(path, errors)
    if text is None:
        raise ConfigError(errors)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"\(at line (\d+)", str(exc))
        raise ConfigError([f"{path}:{match.group(1) if match else 1}: TOML syntax error: {exc}"]) from None
    top = Table(data, "", path, errors)
    cfg = _config(top, path, node.lower(), allow_insecure)
    top.finish(("cluster", "timing", "daemon", "logging", "auth", "ping", "links", "groups", "respawn",
                "stonith"))
    locator = Locator(lambda key: f"{path}: {key}", nodes_label="cluster.nodes")
    areas = {"auth": "auth", "nodes": "cluster.nodes", "links": "links", "timing": "timing"}
    broken = frozenset(a for a, key in areas.items() if any(e.startswith(f"{path}: {key}") for e in errors))
    more_errors, warnings = check(cfg, locator, broken)
    errors = list(dict.fromkeys(errors + more_errors))  # the mode error once, however many inline keys
    if errors:
        raise ConfigError(errors, warnings)
    return dataclasses.replace(cfg, warnings=tuple(warnings))


def _config(top: Table, path: str, node: str, allow_insecure: bool) -> Config:
    cluster = top.table("cluster")
    nodes = tuple(n.lower() for n in cluster.strings("nodes", required=True))
    udpport = cluster.get("udpport", int, DEFAULT_UDP_PORT)
    failback = _enum(cluster, "auto_failback", AutoFailback, AutoFailback.OFF)
    autojoin = cluster.get("autojoin", str, "none")
    cluster.finish()
    daemon = top.table("daemon")
    control_socket = daemon.get("control_socket", str, DEFAULT_SOCKET)
    state_dir = daemon.get("state_dir", str, DEFAULT_STATE_DIR)
    watchdog = daemon.get("watchdog", str)
    guard = daemon.get("guard", bool, True)
    guard_timeout = _duration(daemon, "guard_timeout")
    daemon.finish()
    ping = top.table("ping")
    ping_nodes = tuple(ping.strings("nodes"))
    ping_groups = tuple(_ping_group(t) for t in ping.tables("groups"))
    ping.finish()
    return Config(
        node=node, nodes=nodes, timing=_timing(top.table("timing")), udpport=udpport,
        links=tuple(filter(None, (_link(t, udpport) for t in top.tables("links")))),
        auth=_auth(top.table("auth"), path, allow_insecure), auto_failback=failback,
        ping_nodes=ping_nodes, ping_groups=ping_groups,
        groups=tuple(_group(t) for t in top.tables("groups")),
        respawn=tuple(_respawn(t) for t in top.tables("respawn")), watchdog=watchdog,
        logging=_logging(top.table("logging")), autojoin=autojoin.lower(),
        stonith=_stonith(top.table("stonith")), control_socket=control_socket, state_dir=state_dir,
        guard=guard, guard_timeout_ms=guard_timeout, source=path,
    )


def _enum(table: Table, name: str, enum: type, default: Any) -> Any:
    value = table.get(name, str)
    if value is None:
        return default
    try:
        return enum(value.lower())
    except ValueError:
        table.error(name, f"{value!r} must be one of: {', '.join(e.value for e in enum)}")
        return default


def _timing(table: Table) -> Any:
    values: dict[str, int | None] = {}
    for name in ("keepalive", "warntime", "deadtime", "initdead"):
        table.used.add(name)
        raw = table.data.get(name)
        values[name] = None
        if isinstance(raw, str):
            try:
                values[name] = parse_duration(raw)
            except ValueError as exc:
                table.error(name, str(exc))
        elif raw is not None:
            table.error(name, f"write durations as strings with a unit, e.g. \"2s\" or \"500ms\", "
                        f"not {_describe(raw)}")
    table.finish()
    return default_timing(values["keepalive"], values["warntime"], values["deadtime"], values["initdead"])


def _link(table: Table, udpport: int) -> Any:
    kind = _enum(table, "kind", LinkKind, None)
    if kind is None:
        if "kind" not in table.data:
            table.error("kind", "is required: ucast, bcast, mcast or serial")
        table.used.update(table.data)
        return None
    allowed = LINK_KEYS[kind]
    for name in table.data:
        if name not in allowed:
            table.used.add(name)
            table.error(name, f"is not a key of a {kind.value} link (it takes: {', '.join(allowed)})")
    if kind is LinkKind.SERIAL:
        device = table.get("device", str, required=True)
        baud = table.get("baud", int, DEFAULT_BAUD)
        return make_link(kind, device=device, baud=baud) if device else None
    iface = table.get("interface", str, required=True)
    port = table.get("port", int, udpport)
    if kind is LinkKind.BCAST:
        return make_link(kind, interface=iface, port=port) if iface else None
    if kind is LinkKind.UCAST:
        address = table.get("address", str, required=True)
        return make_link(kind, interface=iface, address=address, port=port) if iface and address else None
    group = table.get("group", str, required=True)
    ttl = table.get("ttl", int, 1)
    loop = table.get("loop", bool, False)
    return make_link(kind, interface=iface, address=group, port=port, ttl=ttl, loop=loop) if iface and group else None


def _auth(table: Table, path: str, allow_insecure: bool) -> Auth | None:
    if not table.data:
        return None
    keys = [k for k in (_key(t, path) for t in table.tables("keys", required=True)) if k is not None]
    active = table.get("active_key", int, keys[0].id if len(keys) == 1 else None)
    if active is None and len(keys) > 1:
        table.error("active_key", "is required when there are several keys: which one signs heartbeats?")
    allow = table.get("allow_insecure", bool, False) or allow_insecure
    table.finish()
    return Auth(keys=tuple(keys), active_key=active if active is not None else -1, allow_insecure=allow)


def _key(table: Table, path: str) -> AuthKey | None:
    key_id = table.get("id", int, required=True)
    algorithm = _enum(table, "algorithm", AuthAlgorithm, None)
    if algorithm is None and "algorithm" not in table.data:
        table.error("algorithm", "is required: sha256, sha1, md5 (or crc)")
    sources = [s for s in ("secret", "secret_hex", "secret_file") if s in table.data]
    secret = b""
    table.used.update(sources)
    if len(sources) > 1:
        table.error(sources[1], f"give only one of secret, secret_hex, secret_file (found {', '.join(sources)})")
    elif sources:
        secret = _secret(table, sources[0], path)
    table.finish()
    if key_id is None or algorithm is None:
        return None
    return AuthKey(id=key_id, algorithm=algorithm, secret=secret)


def _secret(table: Table, source: str, path: str) -> bytes:
    value = table.get(source, str, "")
    if source == "secret":
        check_private(path, table.errors, "an inline secret (or use secret_file)")
        return value.encode("utf-8")
    if source == "secret_hex":
        check_private(path, table.errors, "an inline secret (or use secret_file)")
        try:
            return bytes.fromhex(value)
        except ValueError:
            table.error(source, "is not hexadecimal (pairs of 0-9a-f)")
            return b""
    secret_path = os.path.join(os.path.dirname(path), value)
    before = len(table.errors)
    text = read_text(secret_path, table.errors, raw=True)
    if text is None:
        table.errors[before:] = [f"{table.file}: {table.key(source)}: {e}" for e in table.errors[before:]]
        return b""
    check_private(secret_path, table.errors, "a heartbeat signing key")
    return text.removesuffix("\n").removesuffix("\r").encode("utf-8", "surrogateescape")


def _ping_group(table: Table) -> PingGroup:
    group = PingGroup(name=table.get("name", str, "", required=True),
                      addresses=tuple(table.strings("addresses", required=True)))
    table.finish()
    return group


def _group(table: Table) -> Group:
    resources = tuple(filter(None, (_resource(t) for t in table.tables("resources", required=True))))
    max_restarts = table.get("max_restarts", int)
    if max_restarts is not None and max_restarts < 0:
        table.error("max_restarts", "must be 0 or more")
    group = Group(name=table.get("name", str, "", required=True),
                  preferred_node=table.get("preferred_node", str, "", required=True).lower(),
                  resources=resources, source=f"{table.file}: {table.path}",
                  max_restarts=max_restarts, restart_window_ms=_duration(table, "restart_window"))
    table.finish()
    return group


def _resource(table: Table) -> Resource | None:
    agent = table.get("agent", str, required=True)
    args = tuple(table.strings("args"))
    params = []
    for name, value in table.get("params", dict, {}).items():
        if isinstance(value, (str, int, float, bool)):
            params.append((name, str(value).lower() if isinstance(value, bool) else str(value)))
        else:
            table.error("params", f"{name}: must be a string, not {_describe(value)}")
    raw = table.get("raw", str, "::".join((agent or "",) + args))
    ops = {name: _duration(table, name) for name in RESOURCE_OPS}
    table.finish()
    if not agent:
        return None
    return Resource(agent=agent, args=args, params=tuple(params), raw=raw,
                    **{f"{name}_ms": value for name, value in ops.items()})


RESOURCE_OPS = ("start_timeout", "stop_timeout", "monitor_timeout", "monitor_interval")


def _duration(table: Table, name: str) -> int | None:
    raw = table.get(name, str)
    if raw is None:
        return None
    try:
        return parse_duration(raw)
    except ValueError as exc:
        table.error(name, str(exc))
        return None


def _respawn(table: Table) -> Respawn:
    respawn = Respawn(user=table.get("user", str, "", required=True),
                      command=table.get("command", str, "", required=True))
    table.finish()
    return respawn


def _logging(table: Table) -> Logging:
    facility = table.get("logfacility", str)
    logging = Logging(logfile=table.get("logfile", str), debugfile=table.get("debugfile", str),
                      logfacility=facility.lower() if facility else None,
                      use_logd=table.get("use_logd", bool, False))
    table.finish()
    return logging


def _stonith(table: Table) -> Stonith:
    hosts = []
    for t in table.tables("hosts"):
        hosts.append((t.get("host", str, "", required=True).lower(), t.get("type", str, "", required=True),
                      tuple(t.strings("params"))))
        t.finish()
    stonith = Stonith(type=table.get("type", str), config_file=table.get("config_file", str),
                      hosts=tuple(hosts))
    table.finish()
    return stonith
