"""Outputs of the engine: what the shell must do. Frozen dataclasses, executed in order."""

from __future__ import annotations

from dataclasses import dataclass, field

TIMEOUT_RC = -1  # the shell reports an agent it had to kill at its timeout (RunAgent) with this code


@dataclass(frozen=True)
class Send:
    link: str
    data: bytes


@dataclass(frozen=True)
class Ping:
    address: str


@dataclass(frozen=True)
class StartGroup:
    group: str


@dataclass(frozen=True)
class StopGroup:
    group: str


@dataclass(frozen=True)
class PersistGenerations:
    """Highest generation seen per peer: the shell stores them so replays from before a restart stay stale."""

    generations: dict[str, int] = field(hash=False)


@dataclass(frozen=True)
class Notify:
    """Something an operator (and later issues) must hear about: kind is a stable word, detail a sentence.

    kinds: link-up, link-warn, link-dead, peer-up, peer-warn, peer-dead, peer-left, peer-restarted,
    dual-claim, cannot-take-over, yield, group-failed, rejected
    """

    kind: str
    detail: str
    peer: str = ""
    link: str = ""
    group: str = ""


@dataclass(frozen=True)
class Exit:
    """The shell should stop the loop; the engine has said goodbye."""

    code: int = 0



@dataclass(frozen=True)
class Plan:
    """The routine beats of a calm stretch, handed to the shell at once (Engine.plan): it sends each one's actions
    at its due time on its own and hands control back to the engine at `until` at the latest, or as soon as one
    of the conditions that keep the engine calm stops holding:
      - `links`: (peer, link) -> (deadline, extend): a beat from that peer is heard on that link before the
        deadline; each heard at t moves it to t + extend (warntime: the link stays up);
      - `pings`: address -> (deadline, extend): likewise for echo replies (the ping node stays visible);
      - `expected`: per peer, the routine beats it sends next (Verifier.expect): the only datagrams that may come
        without waking the engine (any other one may be news, or an attack, and goes to it).
    A beat found more than `late` past its due (the process was stopped) is not sent: the engine decides first,
    as after any stall. The shell hands back how many of the beats it sent (Engine.unplan) before any other event."""

    beats: tuple[tuple[float, tuple[Send | Ping, ...]], ...]  # (due, actions), in time order
    until: float
    links: dict[tuple[str, str], tuple[float, float]] = field(hash=False)
    pings: dict[str, tuple[float, float]] = field(hash=False)
    expected: dict[str, list[bytes]] = field(hash=False)
    late: float = 0.0


ROUTINE = (Send, Ping)


@dataclass(frozen=True)
class Decision:
    actions: tuple[Action, ...] = ()
    reason: str = ""

    @property
    def routine(self) -> bool:
        """True when the decision only sends beats or pings: the shell need not log it."""
        return all(isinstance(a, ROUTINE) or (isinstance(a, RunAgent) and a.op == "monitor") for a in self.actions)


@dataclass(frozen=True)
class RunAgent:
    """Run one resource agent operation (start | stop | monitor) of resource `index` of `group`.

    The shell kills it at `timeout_s` and reports AgentDone with rc TIMEOUT_RC. `op_id` ties the result to the request.
    """

    group: str
    index: int
    op: str
    timeout_s: float
    op_id: int


Action = Send | Ping | StartGroup | StopGroup | RunAgent | PersistGenerations | Notify | Exit
