"""Heartbeat's /etc/ha.d/ha.cf, read line by line into a `HaCf` (raw material for the Config).

Every directive Heartbeat 3.0.6 knows (config.c `Directives[]`, `WLdirectives[]` and the HBcomm
media plugins) is known here: supported ones map into the model, the rest are accepted with a
warning, media types hastore cannot speak are refused. Anything else is an error naming file:line.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from .durations import parse_duration
from .model import AutoFailback, LinkKind, PingGroup, Respawn

# Heartbeat directives hastore accepts and ignores, with the reason shown in the warning.
IGNORED: dict[str, str] = {
    "crm": "hastore manages resources itself, from haresources (Heartbeat v1 style)",
    "apiauth": "hastore has no Heartbeat client API",
    "compression": "",
    "compression_threshold": "",
    "traditional_compression": "",
    "hopfudge": "",
    "realtime": "",
    "rtprio": "",
    "coredumps": "",
    "coreroot": "",
    "msgfmt": "",
    "conn_logd_time": "",
    "debug": "",
    "deadping": "ping nodes are declared dead after deadtime",
    "hbgenmethod": "",
    "max_rexmit_delay": "",
    "uuidfrom": "",
    "record_config_changes": "",
    "record_pengine_inputs": "",
    "enable_config_writes": "",
    "memreserve": "",
    "log_badpack": "",
    "use_apphbd": "",
    "normalpoll": "",
    "env": "respawned programs get hastore's environment",
    "cluster": "",
    "quorum_server": "hastore is a two-node cluster without a quorum server",
}
# Heartbeat media plugins hastore cannot speak: ignoring one would silently drop a heartbeat path.
UNSUPPORTED_MEDIA = ("mcast6", "ping6", "hbaping", "openais", "tipc")
# Programs that talk to Heartbeat's client API, which hastore does not provide.
API_CLIENTS: dict[str, str] = {
    "ipfail": "hastore has ipfail built in (ping / ping_group decide which node may hold resources)",
    "dopd": "hastore fences DRBD peers itself",
    "ccm": "", "cib": "", "crmd": "", "lrmd": "", "stonithd": "", "attrd": "", "mgmtd": "", "pingd": "",
}
BOOLEANS = {"true": True, "on": True, "yes": True, "y": True, "1": True,
            "false": False, "off": False, "no": False, "n": False, "0": False}
TIMERS = {"keepalive": "keepalive_ms", "warntime": "warntime_ms", "deadtime": "deadtime_ms",
          "initdead": "initdead_ms"}
SPEEDS = (9600, 19200, 38400, 57600, 115200, 230400, 460800)
SINGLE = ("keepalive", "warntime", "deadtime", "initdead", "udpport", "auto_failback", "nice_failback",
          "logfile", "debugfile", "logfacility", "use_logd", "autojoin", "stonith")
_SLASH_COMMENT = re.compile(r"(?:^|\s)(//.*)$")


@dataclass
class Line:
    path: str
    no: int
    directive: str
    words: list[str]
    rest: str  # the text after the directive, for whole-line directives (respawn)

    @property
    def at(self) -> str:
        return f"{self.path}:{self.no}"


@dataclass
class HaCf:
    """What ha.cf said, before it becomes a Config. `where` maps model key paths to "file:line"."""

    path: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    where: dict[str, str] = field(default_factory=dict)
    broken: set[str] = field(default_factory=set)
    seen: dict[str, int] = field(default_factory=dict)
    nodes: list[str] = field(default_factory=list)
    timing: dict[str, int] = field(default_factory=dict)
    udpport: int | None = None
    baud: int | None = None
    media: list[tuple[dict, str]] = field(default_factory=list)
    auto_failback: AutoFailback | None = None
    ping_nodes: list[str] = field(default_factory=list)
    ping_groups: list[PingGroup] = field(default_factory=list)
    respawn: list[Respawn] = field(default_factory=list)
    watchdog: str | None = None
    logging: dict = field(default_factory=dict)
    autojoin: str = "none"
    stonith: tuple[str | None, str | None] = (None, None)
    stonith_hosts: list[tuple[str, str, tuple[str, ...]]] = field(default_factory=list)

    def error(self, line: Line, msg: str, area: str | None = None) -> None:
        self.errors.append(f"{line.at}: {msg}")
        if area:
            self.broken.add(area)

    def place(self, key: str, line: Line) -> None:
        self.where.setdefault(key, line.at)


def parse_hacf(path: str, text: str) -> HaCf:
    cf = HaCf(path)
    for no, raw in enumerate(text.splitlines(), start=1):
        line = _tokenize(cf, path, no, raw)
        if line is not None:
            _dispatch(cf, line)
    return cf


def _tokenize(cf: HaCf, path: str, no: int, raw: str) -> Line | None:
    text = raw.split("#", 1)[0].strip()  # Heartbeat: everything from the first '#' is a comment
    if not text:
        return None
    slash = _SLASH_COMMENT.search(text)
    if slash:
        cf.errors.append(f"{path}:{no}: '//' does not start a comment in ha.cf, only '#' does: "
                         f"change {_clip(slash.group(1))!r} to '# ...'")
        text = text[: slash.start(1)].rstrip()
        if not text:
            return None
    parts = text.split(None, 1)
    directive = parts[0]
    rest = parts[1] if len(parts) > 1 else ""
    words = rest.replace(",", " ").split()
    line = Line(path, no, directive, words, rest)
    if "{{" in text or "}}" in text:
        cf.error(line, f"{_clip(text)!r} holds a template placeholder ('{{{{ ... }}}}') that was never "
                 f"filled in: replace it with the real value", _area(directive))
        return None
    return line


def _clip(text: str, width: int = 30) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _area(directive: str) -> str | None:
    if directive in ("bcast", "udp", "mcast", "ucast", "serial", "baud", "udpport"):
        return "links"
    if directive in TIMERS:
        return "timing"
    if directive == "node":
        return "nodes"
    return None


def _dispatch(cf: HaCf, line: Line) -> None:
    d = line.directive
    if d in SINGLE or d in ("baud", "watchdog"):
        first = cf.seen.get(d)
        if first is not None and d in ("baud", "watchdog"):
            cf.error(line, f"{d} is given twice (first at line {first}); Heartbeat refuses that too",
                     _area(d))
            return
        if first is not None:
            cf.warnings.append(f"{line.at}: {d} is given again (first at line {first}); "
                               f"this line wins, as in Heartbeat")
        cf.seen.setdefault(d, line.no)
    handler = HANDLERS.get(d)
    if handler is not None:
        handler(cf, line)
    elif d in IGNORED:
        why = IGNORED[d]
        cf.warnings.append(f"{line.at}: '{d}' is a Heartbeat directive hastore ignores" + (f": {why}" if why else ""))
    elif d in UNSUPPORTED_MEDIA:
        cf.error(line, f"'{d}' is a Heartbeat media type hastore does not support; "
                 f"use ucast, bcast, mcast or serial", "links")
    else:
        hint = difflib.get_close_matches(d, list(HANDLERS) + list(IGNORED), n=1)
        cf.error(line, f"unknown directive '{d}': not an ha.cf directive"
                 + (f" (did you mean '{hint[0]}'?)" if hint else ""))


def _count(cf: HaCf, line: Line, low: int, high: int | None, usage: str) -> bool:
    n = len(line.words)
    if n < low or (high is not None and n > high):
        cf.error(line, f"{line.directive} takes {usage}; got {n} value{'s' if n != 1 else ''}"
                 + (f": {' '.join(line.words)}" if n else ""), _area(line.directive))
        return False
    return True


def _int(cf: HaCf, line: Line, text: str, what: str) -> int | None:
    if not text.isdigit():
        cf.error(line, f"{what} {text!r} is not a whole number", _area(line.directive))
        return None
    return int(text)


def _timer(cf: HaCf, line: Line) -> None:
    if not _count(cf, line, 1, 1, "one duration (seconds, or with ms)"):
        return
    try:
        cf.timing[TIMERS[line.directive]] = parse_duration(line.words[0])
    except ValueError as exc:
        cf.error(line, f"{line.directive}: {exc}", "timing")
        return
    cf.where[f"timing.{line.directive}"] = line.at


def _udpport(cf: HaCf, line: Line) -> None:
    if _count(cf, line, 1, 1, "one port number"):
        port = _int(cf, line, line.words[0], "udpport")
        if port is not None:
            cf.udpport = port
            cf.where["cluster.udpport"] = line.at


def _baud(cf: HaCf, line: Line) -> None:
    if _count(cf, line, 1, 1, "one speed, such as 19200"):
        baud = _int(cf, line, line.words[0], "baud")
        if baud is not None and baud not in SPEEDS:
            cf.error(line, f"baud {baud} is not a serial speed Heartbeat supports "
                     f"({', '.join(map(str, SPEEDS))})", "links")
        elif baud is not None:
            cf.baud = baud


def _node(cf: HaCf, line: Line) -> None:
    if not _count(cf, line, 1, None, "one or more node names"):
        return
    cf.place("cluster.nodes", line)
    for name in line.words:
        name = name.lower()  # Heartbeat folds node names to lower case
        if name in cf.nodes:
            cf.warnings.append(f"{line.at}: node {name} is listed twice")
        else:
            cf.nodes.append(name)


def _add_link(cf: HaCf, line: Line, **spec) -> None:
    cf.where[f"links[{len(cf.media)}]"] = line.at
    cf.place("links", line)
    cf.media.append((spec, line.at))


def _bcast(cf: HaCf, line: Line) -> None:
    if line.directive == "udp":
        cf.warnings.append(f"{line.at}: 'udp' is Heartbeat's old name for 'bcast'; read as bcast")
    if _count(cf, line, 1, None, "one or more interface names"):
        for iface in line.words:
            _add_link(cf, line, kind=LinkKind.BCAST, interface=iface)


def _ucast(cf: HaCf, line: Line) -> None:
    if _count(cf, line, 2, 2, "an interface and the peer's address (ucast eth1 10.0.0.2)"):
        _add_link(cf, line, kind=LinkKind.UCAST, interface=line.words[0], address=line.words[1])


def _mcast(cf: HaCf, line: Line) -> None:
    if not _count(cf, line, 5, 5, "IF GROUP PORT TTL LOOP (mcast eth1 225.0.0.1 694 1 0)"):
        return
    iface, group, port, ttl, loop = line.words
    nport = _int(cf, line, port, "mcast port")
    nttl = _int(cf, line, ttl, "mcast ttl")
    if loop not in ("0", "1"):
        cf.error(line, f"mcast loop {loop!r} must be 0 or 1", "links")
        return
    if nport is not None and nttl is not None:
        _add_link(cf, line, kind=LinkKind.MCAST, interface=iface, address=group, port=nport,
                  ttl=nttl, loop=loop == "1")


def _serial(cf: HaCf, line: Line) -> None:
    if _count(cf, line, 1, None, "one or more serial devices"):
        for dev in line.words:
            _add_link(cf, line, kind=LinkKind.SERIAL, device=dev)


def _auto_failback(cf: HaCf, line: Line) -> None:
    if not _count(cf, line, 1, 1, "on, off or legacy"):
        return
    word = line.words[0].lower()
    if word == "legacy":
        cf.auto_failback = AutoFailback.LEGACY
    elif word in BOOLEANS:
        cf.auto_failback = AutoFailback.ON if BOOLEANS[word] else AutoFailback.OFF
    else:
        cf.error(line, f"auto_failback {line.words[0]!r} must be on, off or legacy")
        return
    cf.where["cluster.auto_failback"] = line.at


def _nice_failback(cf: HaCf, line: Line) -> None:
    if not _count(cf, line, 1, 1, "on or off"):
        return
    word = line.words[0].lower()
    if word not in BOOLEANS:
        cf.error(line, f"nice_failback {line.words[0]!r} must be on or off")
        return
    cf.auto_failback = AutoFailback.OFF if BOOLEANS[word] else AutoFailback.LEGACY
    cf.warnings.append(f"{line.at}: nice_failback is obsolete; read as 'auto_failback "
                       f"{cf.auto_failback.value}' (as Heartbeat does): write that instead")


def _ping(cf: HaCf, line: Line) -> None:
    if _count(cf, line, 1, None, "one or more addresses"):
        for addr in line.words:
            cf.where[f"ping.nodes[{len(cf.ping_nodes)}]"] = line.at
            cf.ping_nodes.append(addr)


def _ping_group(cf: HaCf, line: Line) -> None:
    if _count(cf, line, 2, None, "a group name and one or more addresses"):
        cf.where[f"ping.groups[{len(cf.ping_groups)}]"] = line.at
        cf.ping_groups.append(PingGroup(line.words[0], tuple(line.words[1:])))


def _respawn(cf: HaCf, line: Line) -> None:
    parts = line.rest.split(None, 1)
    if len(parts) < 2:
        cf.error(line, "respawn takes a user and a command (respawn hacluster /usr/lib/heartbeat/ipfail)")
        return
    user, command = parts[0], parts[1].strip()
    cf.where[f"respawn[{len(cf.respawn)}]"] = line.at
    cf.respawn.append(Respawn(user, command))
    program = command.split()[0].rsplit("/", 1)[-1]
    if program in API_CLIENTS:
        why = API_CLIENTS[program]
        cf.warnings.append(f"{line.at}: respawn of Heartbeat's {program} kept, but it needs Heartbeat's "
                           f"client API, which hastore does not provide" + (f"; {why}" if why else ""))


def _path_value(attr: str, key: str) -> Callable[[HaCf, Line], None]:
    def handle(cf: HaCf, line: Line) -> None:
        if _count(cf, line, 1, 1, "one path or name"):
            if attr == "watchdog":
                cf.watchdog = line.words[0]
            else:
                cf.logging[attr] = line.words[0].lower() if attr == "logfacility" else line.words[0]
            cf.where[key] = line.at
    return handle


def _use_logd(cf: HaCf, line: Line) -> None:
    if _count(cf, line, 1, 1, "yes or no"):
        word = line.words[0].lower()
        if word not in BOOLEANS:
            cf.error(line, f"use_logd {line.words[0]!r} must be yes or no")
        else:
            cf.logging["use_logd"] = BOOLEANS[word]


def _autojoin(cf: HaCf, line: Line) -> None:
    if _count(cf, line, 1, 1, "none, other or any"):
        cf.autojoin = line.words[0].lower()
        cf.where["cluster.autojoin"] = line.at


def _stonith(cf: HaCf, line: Line) -> None:
    words = line.rest.split()
    if len(words) != 2:
        cf.error(line, "stonith takes a STONITH type and its configuration file "
                 "(stonith baytech /etc/ha.d/conf/stonith.baytech)")
        return
    cf.stonith = (words[0], words[1])


def _stonith_host(cf: HaCf, line: Line) -> None:
    words = line.rest.split()
    if len(words) < 2:
        cf.error(line, "stonith_host takes a host (or *), a STONITH type and its parameters")
        return
    cf.stonith_hosts.append((words[0].lower(), words[1], tuple(words[2:])))


HANDLERS: dict[str, Callable[[HaCf, Line], None]] = {
    "keepalive": _timer, "warntime": _timer, "deadtime": _timer, "initdead": _timer,
    "udpport": _udpport, "baud": _baud, "node": _node,
    "bcast": _bcast, "udp": _bcast, "ucast": _ucast, "mcast": _mcast, "serial": _serial,
    "auto_failback": _auto_failback, "nice_failback": _nice_failback,
    "ping": _ping, "ping_group": _ping_group, "respawn": _respawn,
    "watchdog": _path_value("watchdog", "daemon.watchdog"),
    "logfile": _path_value("logfile", "logging.logfile"),
    "debugfile": _path_value("debugfile", "logging.debugfile"),
    "logfacility": _path_value("logfacility", "logging.logfacility"),
    "use_logd": _use_logd, "autojoin": _autojoin,
    "stonith": _stonith, "stonith_host": _stonith_host,
}
