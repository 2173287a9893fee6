"""Whole-model checks shared by both front doors.

`check(cfg, where)` looks at a finished Config and returns (errors, warnings). It knows nothing about
file formats: `where` turns a key path ("timing.deadtime", "links[2]") into the prefix of the message,
"ha.cf:7" for legacy files or "hastore.toml: timing.deadtime" for TOML.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable

from .durations import format_duration as fmt
from .hacf import SPEEDS
from .model import AuthAlgorithm, Config, Link, LinkKind, Timing

_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*")
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
FACILITIES = frozenset(
    "auth authpriv cron daemon ftp kern lpr mail news syslog user uucp none".split()
    + [f"local{i}" for i in range(8)]
)
AUTOJOIN = ("none", "other", "any")
IP_AGENTS = ("IPaddr", "IPaddr2")


class Locator:
    """Maps key paths to message prefixes. `known` holds the keys a front door could place."""

    def __init__(self, fallback: Callable[[str], str], known: dict[str, str] | None = None,
                 nodes_label: str = "cluster.nodes") -> None:
        self.fallback = fallback
        self.known = known or {}
        self.nodes_label = nodes_label

    def at(self, *keys: str) -> str:
        for key in keys:
            probe = key
            while probe:
                if probe in self.known:
                    return self.known[probe]
                probe = _parent(probe)
        return self.fallback(keys[0])


def _parent(key: str) -> str:
    cut = max(key.rfind("."), key.rfind("["))
    return key[:cut] if cut > 0 else ""


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def check(cfg: Config, where: Locator, skip: frozenset[str] = frozenset()) -> tuple[list[str], list[str]]:
    """Every whole-model problem. `skip` names areas a front door already reported broken
    ("links", "auth", "nodes", "timing"), so one mistake is not reported twice."""
    errors: list[str] = []
    warnings: list[str] = []

    def err(key: str | tuple[str, ...], msg: str) -> None:
        keys = (key,) if isinstance(key, str) else key
        errors.append(f"{where.at(*keys)}: {msg}")

    def warn(key: str, msg: str) -> None:
        warnings.append(f"{where.at(key)}: {msg}")

    if "timing" not in skip:
        _check_timing(cfg, err, warn)
        _check_guard(cfg, err)
    if "nodes" not in skip:
        _check_nodes(cfg, where, err, warn)
    _check_links(cfg, err, "links" in skip)
    _check_auth(cfg, err, "auth" in skip)
    _check_ping(cfg, err)
    _check_groups(cfg, where, err, "nodes" in skip)
    _check_misc(cfg, err)
    return errors, warnings


def timing_errors(t: Timing) -> list[str]:
    """What the timing checks reject in `t`, as bare sentences (for callers with no file to point at)."""
    errors: list[str] = []
    _check_timing(Config(node="-", nodes=("-",), timing=t), lambda key, msg: errors.append(msg), lambda *_: None)
    return errors


def _check_timing(cfg: Config, err, warn) -> None:
    t = cfg.timing
    k, w, d, i = t.keepalive_ms, t.warntime_ms, t.deadtime_ms, t.initdead_ms
    if k <= 0:
        err("timing.keepalive", f"keepalive {fmt(k)} must be more than zero")
        return
    if d <= 2 * k:
        err(("timing.deadtime", "timing.keepalive"),
            f"deadtime {fmt(d)} must be more than 2 x keepalive {fmt(k)} (= {fmt(2 * k)}), "
            f"Heartbeat's rule: a peer must be allowed to miss two beats before it is declared dead")
    elif not k <= w <= d:  # (a default warntime is only wrong when deadtime is)
        err(("timing.warntime", "timing.deadtime"),
            f"warntime {fmt(w)} must lie between keepalive {fmt(k)} and deadtime {fmt(d)}")
    if i < d:
        err(("timing.initdead", "timing.deadtime"), f"initdead {fmt(i)} must be at least deadtime {fmt(d)}")
    elif i < 10000:
        warn("timing.initdead", f"initdead {fmt(i)} may be too short for a slow network start "
             f"(Heartbeat advises >= deadtime and >= 10s)")


def _check_guard(cfg: Config, err) -> None:
    """Only a configured guard_timeout can be wrong: the default always lies between the two bounds."""
    g, k, d = cfg.guard_timeout_ms, cfg.timing.keepalive_ms, cfg.timing.deadtime_ms
    if g is None or k <= 0:
        return
    if g <= 2 * k:
        err("daemon.guard_timeout", f"guard_timeout {fmt(g)} must be more than 2 x keepalive {fmt(k)} "
            f"(= {fmt(2 * k)}): the guard must not stop the resources of a daemon that only missed two beats")
    elif g >= d:
        err("daemon.guard_timeout", f"guard_timeout {fmt(g)} must be less than deadtime {fmt(d)}: the guard must "
            f"stop this node's resources before the peer declares it dead and starts them")


def _check_nodes(cfg: Config, where: Locator, err, warn) -> None:
    nodes = cfg.nodes
    label = where.nodes_label
    if not nodes:
        err("cluster.nodes", f"no cluster nodes are listed; hastore needs this node and its peer ({label})")
        return
    if cfg.node not in nodes:
        err("cluster.nodes",
            f"this node is {cfg.node} (uname -n or --node); {label} lists: {', '.join(nodes)} "
            f"— if this machine is one of them, run with --node NAME")
    if len(nodes) > 2:
        err("cluster.nodes", f"hastore runs two-node clusters; {label} lists {len(nodes)}: {', '.join(nodes)}")
    elif len(nodes) == 1:
        warn("cluster.nodes", f"only one node is listed ({nodes[0]}); there is no peer to fail over to")
    for n in nodes:
        if not HOSTNAME.fullmatch(n):
            err("cluster.nodes", f"node name {n!r} is not a host name (as printed by uname -n)")


def _check_links(cfg: Config, err, links_broken: bool) -> None:
    if not cfg.links and not links_broken:
        err("links", "no heartbeat links: add at least one ucast, bcast, mcast or serial link "
            "(two independent paths are better than one)")
    if not 0 < cfg.udpport < 65536:
        err("cluster.udpport", f"udpport {cfg.udpport} is not a UDP port (1-65535)")
    seen: dict[str, int] = {}
    for i, link in enumerate(cfg.links):
        key = f"links[{i}]"
        if link.id in seen:
            err(key, f"link {link.id} is given twice (also links[{seen[link.id]}])")
        seen.setdefault(link.id, i)
        for msg in _link_problems(link, cfg.udpport):
            err(key, msg)


def _link_problems(link: Link, udpport: int) -> list[str]:
    out: list[str] = []
    if link.kind is LinkKind.SERIAL:
        if not link.device:
            out.append("serial link needs a device such as /dev/ttyS0")
        elif not os.path.exists(link.device):
            out.append(f"serial device {link.device} does not exist on this machine "
                       f"(check the cable's port name, or remove the serial line)")
        if link.baud not in SPEEDS:
            out.append(f"baud {link.baud} is not a serial speed Heartbeat supports "
                       f"({', '.join(map(str, SPEEDS))})")
        return out
    iface = link.interface or ""
    if not iface or len(iface) > 15 or "/" in iface or any(c.isspace() for c in iface):
        out.append(f"{link.kind.value} link needs a network interface name (at most 15 characters), "
                   f"got {iface!r}")
    if link.port != udpport and not 0 < link.port < 65536:
        out.append(f"port {link.port} is not a UDP port (1-65535)")
    if link.kind is LinkKind.UCAST and not is_ip(link.address or ""):
        out.append(f"ucast peer address {link.address!r} is not an IP address "
                   f"(hastore does not resolve host names for heartbeat links: write the peer's IP)")
    if link.kind is LinkKind.MCAST:
        if not is_ip(link.address or "") or not ipaddress.ip_address(link.address).is_multicast:
            out.append(f"mcast group {link.address!r} is not a multicast address (224.0.0.0-239.255.255.255)")
        if not 1 <= link.ttl <= 255:
            out.append(f"mcast ttl {link.ttl} must be 1-255 (0 would keep beats on this host)")
    return out


def _check_auth(cfg: Config, err, auth_broken: bool) -> None:
    auth = cfg.auth
    if auth is None or not auth.keys:
        if not auth_broken:
            err("auth", "no authentication keys: heartbeats must be signed (authkeys: 'auth 1' and "
            "'1 sha1 SECRET'; hastore.toml: [auth] with [[auth.keys]])")
        return
    ids = [k.id for k in auth.keys]
    for i, key in enumerate(auth.keys):
        where = f"auth.keys[{i}]"
        if not 0 <= key.id <= 15:
            err(where, f"key number {key.id} must be 0-15")
        if ids.count(key.id) > 1 and ids.index(key.id) != i:
            err(where, f"key number {key.id} is defined twice")
        if key.algorithm is AuthAlgorithm.CRC and not auth.allow_insecure:
            err(where, f"key {key.id} uses crc, which authenticates nothing: anyone on the heartbeat "
                "network could forge beats and make both nodes take the resources (split brain). "
                "Use sha256, sha1 or md5 with a secret; to run with crc anyway (a lab, never "
                "production) pass --allow-insecure-auth (TOML: auth.allow_insecure = true)")
        elif key.algorithm is not AuthAlgorithm.CRC and not key.secret and not auth_broken:
            err(where, f"key {key.id} ({key.algorithm.value}) needs a secret")
    if auth.key(auth.active_key) is None and not auth_broken:
        err("auth.active_key", f"signing key {auth.active_key} is not defined "
            f"(defined: {', '.join(str(i) for i in ids)})")


def _check_ping(cfg: Config, err) -> None:
    for i, addr in enumerate(cfg.ping_nodes):
        if not (is_ip(addr) or HOSTNAME.fullmatch(addr)):
            err(f"ping.nodes[{i}]", f"ping node {addr!r} is neither an IP address nor a host name")
    names: set[str] = set()
    for i, group in enumerate(cfg.ping_groups):
        key = f"ping.groups[{i}]"
        if not NAME.fullmatch(group.name):
            err(key, f"ping group name {group.name!r} must be letters, digits, '_', '.', '-'")
        if group.name in names:
            err(key, f"ping group {group.name!r} is defined twice")
        names.add(group.name)
        if not group.addresses:
            err(key, f"ping group {group.name!r} lists no addresses")
        for addr in group.addresses:
            if not (is_ip(addr) or HOSTNAME.fullmatch(addr)):
                err(key, f"ping group {group.name!r}: {addr!r} is neither an IP address nor a host name")


OCF_NAME = re.compile(r"ocf:[A-Za-z0-9_.+-]+:[A-Za-z0-9_.+-]+")


def _check_groups(cfg: Config, where: Locator, err, nodes_broken: bool) -> None:
    names: set[str] = set()
    for i, group in enumerate(cfg.groups):
        key = f"groups[{i}]"
        if not NAME.fullmatch(group.name):
            err(key, f"group name {group.name!r} must be letters, digits, '_', '.', '-'")
        if group.name in names:
            err(key, f"group name {group.name!r} is used twice")
        names.add(group.name)
        if cfg.nodes and not nodes_broken and group.preferred_node not in cfg.nodes:
            err(f"{key}.preferred_node",
                f"preferred node '{group.preferred_node}' is not a cluster node "
                f"({where.nodes_label} lists: {', '.join(cfg.nodes)}); the names must match exactly")
        if not group.resources:
            err(key, f"group {group.name!r} has no resources")
        for j, res in enumerate(group.resources):
            rkey = f"{key}.resources[{j}]"
            if not (NAME.fullmatch(res.agent) or OCF_NAME.fullmatch(res.agent)):
                err(rkey, f"resource agent name {res.agent!r} must be letters, digits, '_', '.', '-', '+', "
                          f"or ocf:PROVIDER:TYPE")
            if res.agent in IP_AGENTS and res.args and not is_ip(res.args[0].split("/")[0]):
                err(rkey, f"{res.agent} address {res.args[0]!r} does not start with an IP address")


def _check_misc(cfg: Config, err) -> None:
    for i, r in enumerate(cfg.respawn):
        if not r.user:
            err(f"respawn[{i}]", "respawn needs a user and a command")
        if not r.command.startswith("/"):
            err(f"respawn[{i}]", f"respawn command {r.command!r} must be a full path (starting with /)")
    if cfg.autojoin not in AUTOJOIN:
        err("cluster.autojoin", f"autojoin {cfg.autojoin!r} must be one of: {', '.join(AUTOJOIN)}")
    facility = cfg.logging.logfacility
    if facility is not None and facility not in FACILITIES:
        err("logging.logfacility", f"logfacility {facility!r} is not a syslog facility "
            f"(daemon, local0-local7, user, ...)")
    for key, value in (("daemon.control_socket", cfg.control_socket), ("daemon.state_dir", cfg.state_dir)):
        if not value.startswith("/"):
            err(key, f"{value!r} must be an absolute path")
