"""Config -> native TOML text (`hastore convert`, and the round-trip tests).

Everything is written explicitly, defaults included, so the file reads the same whatever later
versions choose as defaults. Secrets are written inline: the file must be chmod 600.
"""

from __future__ import annotations

import re

from .durations import format_duration
from .model import DEFAULT_BAUD, AuthKey, Config, Link, LinkKind, Resource

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def quote(text: str) -> str:
    """A TOML basic string."""
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        elif 0xD800 <= ord(ch) <= 0xDFFF:
            out.append("\ufffd")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def _key(name: str) -> str:
    return name if _BARE_KEY.fullmatch(name) else quote(name)


def _section(header: str, pairs: list[tuple[str, object]]) -> list[str]:
    lines = [header]
    lines += [f"{k} = {_value(v)}" for k, v in pairs if v is not None]
    return lines + [""]


def to_toml(cfg: Config) -> str:
    out: list[str] = ["# hastore configuration" + (f", converted from {cfg.source}" if cfg.source else ""),
                      "# It may hold secrets: keep it chmod 600.", ""]
    if cfg.warnings:
        out += ["# Notes from the conversion:"] + [f"#   {w}" for w in cfg.warnings] + [""]
    t = cfg.timing
    out += _section("[cluster]", [("nodes", list(cfg.nodes)), ("udpport", cfg.udpport),
                                  ("auto_failback", cfg.auto_failback.value), ("autojoin", cfg.autojoin)])
    out += _section("[timing]", [(name, format_duration(ms)) for name, ms in (
        ("keepalive", t.keepalive_ms), ("warntime", t.warntime_ms), ("deadtime", t.deadtime_ms),
        ("initdead", t.initdead_ms))])
    out += _section("[daemon]", [("control_socket", cfg.control_socket), ("state_dir", cfg.state_dir),
                                 ("watchdog", cfg.watchdog), ("guard", None if cfg.guard else False),
                                 ("guard_timeout", None if cfg.guard_timeout_ms is None
                                  else format_duration(cfg.guard_timeout_ms))])
    lg = cfg.logging
    out += _section("[logging]", [("logfile", lg.logfile), ("debugfile", lg.debugfile),
                                  ("logfacility", lg.logfacility), ("use_logd", lg.use_logd)])
    for link in cfg.links:
        out += _section("[[links]]", _link_pairs(link, cfg.udpport))
    if cfg.auth is not None:
        out += _section("[auth]", [("active_key", cfg.auth.active_key),
                                   ("allow_insecure", cfg.auth.allow_insecure)])
        for key in cfg.auth.keys:
            out += _section("[[auth.keys]]", _key_pairs(key))
    out += _ping(cfg)
    for group in cfg.groups:
        out += _section("[[groups]]", [("name", group.name), ("preferred_node", group.preferred_node),
                                       ("max_restarts", group.max_restarts),
                                       ("restart_window", None if group.restart_window_ms is None
                                        else format_duration(group.restart_window_ms))])
        for res in group.resources:
            out += _section("[[groups.resources]]", _resource_pairs(res))
    for r in cfg.respawn:
        out += _section("[[respawn]]", [("user", r.user), ("command", r.command)])
    out += _stonith(cfg)
    return "\n".join(out).rstrip("\n") + "\n"


def _link_pairs(link: Link, udpport: int) -> list[tuple[str, object]]:
    pairs: list[tuple[str, object]] = [("kind", link.kind.value)]
    if link.kind is LinkKind.SERIAL:
        return pairs + [("device", link.device), ("baud", link.baud if link.baud != DEFAULT_BAUD else None)]
    pairs.append(("interface", link.interface))
    if link.kind is LinkKind.UCAST:
        pairs.append(("address", link.address))
    if link.kind is LinkKind.MCAST:
        pairs += [("group", link.address), ("ttl", link.ttl), ("loop", link.loop)]
    return pairs + [("port", link.port if link.port != udpport else None)]


def _key_pairs(key: AuthKey) -> list[tuple[str, object]]:
    pairs: list[tuple[str, object]] = [("id", key.id), ("algorithm", key.algorithm.value)]
    if not key.secret:
        return pairs
    try:
        text = key.secret.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and text.isprintable():
        return pairs + [("secret", text)]
    return pairs + [("secret_hex", key.secret.hex())]


def _resource_pairs(res: Resource) -> list[tuple[str, object]]:
    pairs: list[tuple[str, object]] = [("agent", res.agent), ("args", list(res.args) or None)]
    if res.params:
        pairs.append(("params", dict(res.params)))
    if res.raw != "::".join((res.agent,) + res.args):
        pairs.append(("raw", res.raw))
    for op in ("start_timeout", "stop_timeout", "monitor_timeout", "monitor_interval"):
        value = getattr(res, f"{op}_ms")
        if value is not None:
            pairs.append((op, format_duration(value)))
    return pairs


def _ping(cfg: Config) -> list[str]:
    if not cfg.ping_nodes and not cfg.ping_groups:
        return []
    out = _section("[ping]", [("nodes", list(cfg.ping_nodes))])
    for group in cfg.ping_groups:
        out += _section("[[ping.groups]]", [("name", group.name), ("addresses", list(group.addresses))])
    return out


def _stonith(cfg: Config) -> list[str]:
    s = cfg.stonith
    if s.type is None and s.config_file is None and not s.hosts:
        return []
    out = _section("[stonith]", [("type", s.type), ("config_file", s.config_file)])
    for host, kind, params in s.hosts:
        out += _section("[[stonith.hosts]]", [("host", host), ("type", kind), ("params", list(params))])
    return out
