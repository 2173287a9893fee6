"""Inputs to the engine. Every event is a frozen dataclass; time is passed beside it, never inside."""

from __future__ import annotations

from dataclasses import dataclass

from hastore.config.model import Config


@dataclass(frozen=True)
class Tick:
    """The timer the shell armed at `Engine.next_deadline()` fired."""


@dataclass(frozen=True)
class PacketReceived:
    """A datagram or frame from `link`. `at`: when the kernel received it (monotonic seconds), if the shell read it
    later than that; None means now. `late`: it was read up to one keepalive after it arrived and when exactly is
    not known (a serial line drained on the beat timer): see Engine._arrival."""

    link: str
    data: bytes
    at: float | None = None
    late: bool = False
    # Read on the beat tick, which decides next (see PingReply.more): the packet is taken in without a pass of its
    # own, so that no pass judges a link whose packets in the same read still wait their turn (a late tick read
    # one link's beats, a pass on the first that changed a state saw the other link silent past warntime, and the
    # next packet brought it back: a warn and an up logged for nothing).
    more: bool = False


@dataclass(frozen=True)
class LinkTrouble:
    """A transport reported an error (device gone, interface down). Liveness is still decided by beats."""

    link: str
    detail: str


@dataclass(frozen=True)
class LinkState:
    """Whether this node can use `link` at all: False once sending on it failed in a way that is certain here (no
    route, interface down, device gone or hung up), True again at the first send that works."""

    link: str
    usable: bool


@dataclass(frozen=True)
class PingReply:
    address: str
    at: float | None = None  # when the reply arrived (the kernel's receive time), if known; else when it was read
    # More of what the shell read comes before the engine decides (the beat tick reads the echo replies first, then
    # the links, then ticks): record the reply and leave the pass to the events that follow, so that no pass on
    # one kind of input judges the other kind unread (a late tick past a ping node's expiry, deciding on a beat
    # before the reply waiting in the socket was read, made a holder yield its group).
    more: bool = False


@dataclass(frozen=True)
class PingRoute:
    """Whether this node has a route to ping node `address`: False once an echo request could not be sent for lack
    of one (the interface towards it is down), True again once one could."""

    address: str
    routable: bool


@dataclass(frozen=True)
class GroupDone:
    """The shell finished starting or stopping a group (op is "start" or "stop")."""

    group: str
    op: str
    ok: bool
    detail: str = ""


@dataclass(frozen=True)
class AgentDone:
    """A RunAgent finished: rc is the agent's exit code, or -1 when the shell killed it at its timeout."""

    group: str
    index: int
    op: str
    op_id: int
    rc: int
    detail: str = ""


@dataclass(frozen=True)
class Admin:
    """An operator's command from the control socket: standby or takeover of all | local | foreign groups."""

    command: str
    scope: str = "all"


@dataclass(frozen=True)
class Shutdown:
    """SIGTERM or `hastore stop`: release what we hold, tell the peer, then exit."""


@dataclass(frozen=True)
class Restarting:
    """`hastore restart`: the daemon is about to re-execute itself; the peer is asked to wait grace_ms."""

    grace_ms: int


@dataclass(frozen=True)
class Reload:
    """SIGHUP: a new configuration, already validated by the shell."""

    config: Config


Event = (Tick | PacketReceived | LinkTrouble | PingReply | GroupDone | AgentDone | Admin | Shutdown | Restarting
         | Reload)
