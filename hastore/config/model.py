"""The one configuration model both front doors (native TOML, legacy Heartbeat files) load into.

Everything here is frozen: a configuration is loaded once, validated whole, and then only read.
Durations are kept in milliseconds (ints) because that is how operators think about heartbeat timers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

DEFAULT_CONFIG_PATH = "/etc/hastore/hastore.toml"
DEFAULT_LEGACY_DIR = "/etc/ha.d"
DEFAULT_SOCKET = "/run/hastore/hastore.sock"
DEFAULT_STATE_DIR = "/var/lib/hastore"
DEFAULT_UDP_PORT = 694
DEFAULT_BAUD = 19200


class LinkKind(enum.Enum):
    UCAST = "ucast"
    BCAST = "bcast"
    MCAST = "mcast"
    SERIAL = "serial"


class AutoFailback(enum.Enum):
    ON = "on"
    OFF = "off"
    LEGACY = "legacy"


class AuthAlgorithm(enum.Enum):
    """HMAC digest per key. crc authenticates nothing and is refused unless allowed as insecure."""

    SHA256 = "sha256"
    SHA1 = "sha1"
    MD5 = "md5"
    CRC = "crc"


@dataclass(frozen=True)
class Timing:
    """Defaults are Heartbeat 3.0.6's (config.c): warntime = deadtime / 2; initdead = deadtime when deadtime
    is over 10 s. The loaders fill unset values by the same rules (hastore.config.common.default_timing)."""

    keepalive_ms: int = 1000
    warntime_ms: int = 15000
    deadtime_ms: int = 30000
    initdead_ms: int = 30000


@dataclass(frozen=True)
class Link:
    """One heartbeat medium (one ha.cf media line, or one expanded interface of a bcast line).

    `id` is stable and human-readable, e.g. ``ucast:eth1:10.0.0.2``, ``bcast:eth1``,
    ``mcast:eth1:239.0.0.1``, ``serial:/dev/ttyS0``. It is the key in status output.
    """

    id: str
    kind: LinkKind
    interface: str | None = None  # UDP kinds: the interface the socket is bound to
    address: str | None = None  # ucast: peer address; mcast: group address
    port: int = DEFAULT_UDP_PORT  # UDP kinds
    ttl: int = 1  # mcast
    loop: bool = False  # mcast
    device: str | None = None  # serial
    baud: int = DEFAULT_BAUD  # serial


@dataclass(frozen=True)
class AuthKey:
    id: int
    algorithm: AuthAlgorithm
    secret: bytes


@dataclass(frozen=True)
class Auth:
    """Keys by id. We sign with `active_key`; we accept any key listed (rotation)."""

    keys: tuple[AuthKey, ...]
    active_key: int
    allow_insecure: bool = False

    def key(self, key_id: int) -> AuthKey | None:
        for k in self.keys:
            if k.id == key_id:
                return k
        return None


@dataclass(frozen=True)
class PingGroup:
    """A ping group counts as one reachable ping node when any of its addresses answers."""

    name: str
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class Resource:
    """One resource of a group, as written: ``Name::arg1::arg2`` in haresources, or a TOML table.

    `agent` is the resource kind (IPaddr, Filesystem, drbddisk, mysql, ...); `args` the positional
    arguments of the haresources form; `params` named parameters (TOML, OCF_RESKEY_*).
    """

    agent: str
    args: tuple[str, ...] = ()
    params: tuple[tuple[str, str], ...] = ()
    raw: str = ""
    # operation timeouts and the monitor interval (0 = not monitored); None = the daemon's defaults
    start_timeout_ms: int | None = None
    stop_timeout_ms: int | None = None
    monitor_timeout_ms: int | None = None
    monitor_interval_ms: int | None = None


@dataclass(frozen=True)
class Group:
    name: str
    preferred_node: str
    resources: tuple[Resource, ...]
    source: str = ""  # "haresources:3" or "groups.web"
    max_restarts: int | None = None  # restarts in place within restart_window before failing over
    restart_window_ms: int | None = None


@dataclass(frozen=True)
class Respawn:
    user: str
    command: str


@dataclass(frozen=True)
class Logging:
    logfile: str | None = None
    debugfile: str | None = None
    logfacility: str | None = None
    use_logd: bool = False


@dataclass(frozen=True)
class Stonith:
    """Heartbeat's `stonith FILE` and `stonith_host HOST TYPE PARAMS...` lines, kept for the fencing issue."""

    config_file: str | None = None
    hosts: tuple[tuple[str, str, tuple[str, ...]], ...] = ()
    type: str | None = None  # the STONITH device type of a `stonith TYPE FILE` line (added by config)


@dataclass(frozen=True)
class Config:
    node: str  # this node's name
    nodes: tuple[str, ...]  # every cluster node, this one included
    timing: Timing = field(default_factory=Timing)
    udpport: int = DEFAULT_UDP_PORT
    links: tuple[Link, ...] = ()
    auth: Auth | None = None
    auto_failback: AutoFailback = AutoFailback.LEGACY
    ping_nodes: tuple[str, ...] = ()
    ping_groups: tuple[PingGroup, ...] = ()
    groups: tuple[Group, ...] = ()
    respawn: tuple[Respawn, ...] = ()
    watchdog: str | None = None
    logging: Logging = field(default_factory=Logging)
    autojoin: str = "none"
    stonith: Stonith = field(default_factory=Stonith)
    control_socket: str = DEFAULT_SOCKET
    state_dir: str = DEFAULT_STATE_DIR
    guard: bool = True  # run the guard: it stops this node's resources when the daemon dies or freezes
    guard_timeout_ms: int | None = None  # None: default_guard_timeout_ms(timing)
    source: str = ""  # the file or directory this came from
    warnings: tuple[str, ...] = ()  # "file:line: message" for directives accepted but ignored

    @property
    def peers(self) -> tuple[str, ...]:
        return tuple(n for n in self.nodes if n != self.node)

    @property
    def guard_timeout(self) -> int:
        """The guard's timeout in ms: as configured, else default_guard_timeout_ms."""
        return self.guard_timeout_ms if self.guard_timeout_ms is not None else default_guard_timeout_ms(self.timing)


def default_guard_timeout_ms(t: Timing) -> int:
    """deadtime - keepalive: the guard stops a frozen node's resources a keepalive before the peer declares it
    dead and starts them. It must also allow more than two missed pets (> 2 x keepalive): where deadtime is under
    3 x keepalive, halfway between the two."""
    k, d = t.keepalive_ms, t.deadtime_ms
    return d - k if d - k > 2 * k else (2 * k + d) // 2
