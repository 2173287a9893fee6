"""Construction rules both front doors share, so a ha.cf and its TOML conversion load equal."""

from __future__ import annotations

from .model import DEFAULT_BAUD, DEFAULT_UDP_PORT, Link, LinkKind, Timing

DEFAULT_KEEPALIVE_MS = 1000
DEFAULT_DEADTIME_MS = 30000


def default_timing(keepalive: int | None = None, warntime: int | None = None,
                   deadtime: int | None = None, initdead: int | None = None) -> Timing:
    """Fill unset timers the way Heartbeat 3.0.6 does (config.c init_config):
    keepalive 1s, deadtime 30s, warntime deadtime/2, and initdead = deadtime when deadtime > 10s,
    12s when deadtime < 6s, else 2 x deadtime."""
    k = DEFAULT_KEEPALIVE_MS if keepalive is None else keepalive
    d = DEFAULT_DEADTIME_MS if deadtime is None else deadtime
    w = d // 2 if warntime is None else warntime
    if initdead is None:
        initdead = d if d > 10000 else 12000 if d < 6000 else 2 * d
    return Timing(keepalive_ms=k, warntime_ms=w, deadtime_ms=d, initdead_ms=initdead)


def make_link(kind: LinkKind, *, interface: str | None = None, address: str | None = None,
              port: int = DEFAULT_UDP_PORT, ttl: int = 1, loop: bool = False,
              device: str | None = None, baud: int = DEFAULT_BAUD) -> Link:
    """A Link with its stable id; fields that do not apply to `kind` keep their defaults."""
    if kind is LinkKind.SERIAL:
        return Link(id=f"serial:{device}", kind=kind, device=device, baud=baud)
    if kind is LinkKind.BCAST:
        return Link(id=f"bcast:{interface}", kind=kind, interface=interface, port=port)
    if kind is LinkKind.UCAST:
        return Link(id=f"ucast:{interface}:{address}", kind=kind, interface=interface, address=address,
                    port=port)
    return Link(id=f"mcast:{interface}:{address}", kind=kind, interface=interface, address=address,
                port=port, ttl=ttl, loop=loop)
