"""One group's resources in strict order: start in order, stop in reverse, roll back a half-started group,
monitor, restart a failed resource in place, and say when the group must fail over. Pure: no I/O, no clock.

The engine asks `start`, `stop` or `probe`; this module answers with RunAgent actions (one in flight per
group, each with its timeout) and, when a whole operation ends, an Outcome the engine acts on.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from hastore.config.model import Group, Resource
from hastore.core.actions import TIMEOUT_RC, RunAgent

OCF_SUCCESS, OCF_NOT_RUNNING = 0, 7


class RState(enum.Enum):
    UNKNOWN = "unknown"
    STOPPED = "stopped"
    STARTED = "started"
    FAILED = "failed"  # monitor or start failed; may still be partly held
    STOP_FAILED = "stop-failed"


HOLDING = {RState.STARTED, RState.FAILED, RState.STOP_FAILED}  # may be (partly) running here


@dataclass(frozen=True)
class Policy:
    start_timeout_s: float = 90.0
    stop_timeout_s: float = 90.0
    monitor_timeout_s: float = 20.0
    monitor_interval_s: float = 10.0
    stop_retries: int = 2  # a failed stop is tried this many more times before giving up
    max_restarts: int = 3  # restarts in place allowed within restart_window_s, then the group fails over
    restart_window_s: float = 600.0


@dataclass(frozen=True)
class Outcome:
    """A finished group operation: kind is started | stopped | start-failed | stop-failed | probed | restarted |
    failover (monitoring gave up on restarting in place; the group was stopped here)."""

    kind: str
    reason: str
    running: bool = False  # for probed: every resource is running (adopt), none (clean), or partial


@dataclass
class RTrack:
    spec: Resource
    state: RState = RState.UNKNOWN
    reason: str = "not probed yet"
    next_monitor: float | None = None


def resource_name(r: Resource) -> str:
    return r.raw or "::".join((r.agent, *r.args))


@dataclass
class _Op:
    kind: str  # start | stop | probe | restart
    steps: list[tuple[str, int]]  # remaining (op, index)
    on_fail: str = ""  # what a failure means for this operation
    attempts: int = 0
    rollback: bool = False
    failure: str = ""  # the reason that turned a start into a rollback
    restart_from: int = -1


class GroupOps:
    def __init__(self, group: Group, policy: Policy = Policy()):
        self.group = group
        if group.max_restarts is not None:
            policy = replace(policy, max_restarts=group.max_restarts)
        if group.restart_window_ms is not None:
            policy = replace(policy, restart_window_s=group.restart_window_ms / 1000)
        self.policy = policy
        self.res = [RTrack(r) for r in group.resources]
        self.op: _Op | None = None
        self.inflight: tuple[str, int, int] | None = None  # (op, index, op_id)
        self.op_id = 0
        self.restarts: list[float] = []
        self.periodic = False  # the operation in flight is a periodic monitor, not a step of self.op

    # -- requests -------------------------------------------------------------------------------
    # Each request and each result answers (actions to run, Outcome when a whole operation ended).
    def probe(self, now: float) -> tuple[list[RunAgent], Outcome | None]:
        self.op = _Op("probe", [("monitor", i) for i in range(len(self.res))])
        return self._next(now)

    def start(self, now: float) -> tuple[list[RunAgent], Outcome | None]:
        self.op = _Op("start", [("start", i) for i in range(len(self.res))])
        return self._next(now)

    def stop(self, now: float) -> tuple[list[RunAgent], Outcome | None]:
        self.op = _Op("stop", [("stop", i) for i in reversed(range(len(self.res)))])
        return self._next(now)

    @property
    def busy(self) -> bool:
        return self.op is not None

    # -- results --------------------------------------------------------------------------------
    def on_result(self, op: str, index: int, op_id: int, rc: int, detail: str, now: float
                  ) -> tuple[list[RunAgent], Outcome | None]:
        if self.inflight != (op, index, op_id):
            return [], None  # a late result of an operation we no longer wait for
        self.inflight = None
        r = self.res[index]
        name = resource_name(r.spec)
        said = f"{name}: {op} {_rc_text(rc)}" + (f" ({detail})" if detail else "")
        if self.periodic:
            self.periodic = False
            if self.op is None:
                return self._on_monitor(r, rc, said, now)
            return self._next(now)  # an operation was asked for meanwhile: it starts now
        if op == "monitor":
            r.state = RState.STARTED if rc == OCF_SUCCESS else RState.STOPPED if rc == OCF_NOT_RUNNING else RState.FAILED
            r.reason = said
            r.next_monitor = self._monitor_due(r, now) if rc == OCF_SUCCESS else None  # adopted: watched too
        elif rc == OCF_SUCCESS:
            r.state = RState.STARTED if op == "start" else RState.STOPPED
            r.reason = said
            if op == "start":
                r.next_monitor = self._monitor_due(r, now)
        else:
            return self._on_failure(r, op, index, said, now)
        return self._next(now)

    def _on_failure(self, r: RTrack, op: str, index: int, said: str, now: float):
        assert self.op is not None
        if op == "start":
            r.state, r.reason = RState.FAILED, said
            # roll back: stop this one (it may be half started) and every one started before it, in reverse
            self.op = _Op(self.op.kind, [("stop", i) for i in reversed(range(index + 1))], rollback=True,
                          failure=said)
            return self._next(now)
        # a failed stop: retry, then give up (the node keeps claiming the group so the peer never starts it)
        self.op.attempts += 1
        if self.op.attempts <= self.policy.stop_retries:
            self.op.steps.insert(0, ("stop", index))
            r.reason = f"{said}; retrying ({self.op.attempts} of {self.policy.stop_retries})"
            return self._next(now)
        r.state, r.reason = RState.STOP_FAILED, said
        self.op = None
        return [], Outcome("stop-failed", f"group {self.group.name}: {said}, {self.policy.stop_retries} retries "
                                          f"failed; resources may still be held here")

    def _on_monitor(self, r: RTrack, rc: int, said: str, now: float):
        if rc == OCF_SUCCESS:
            r.next_monitor = self._monitor_due(r, now)
            return self._next(now)
        r.state, r.reason, r.next_monitor = RState.FAILED, said, None
        self.restarts = [t for t in self.restarts if now - t < self.policy.restart_window_s]
        index = self.res.index(r)
        if len(self.restarts) >= self.policy.max_restarts:
            self.op = _Op("failover", [("stop", i) for i in reversed(range(len(self.res)))],
                          failure=f"{said}; {len(self.restarts)} restarts within "
                                  f"{self.policy.restart_window_s:.0f} s already")
            return self._next(now)
        self.restarts.append(now)
        # restart in place: stop the failed resource and everything above it (they depend on it), start again
        steps = [("stop", i) for i in reversed(range(index, len(self.res)))]
        steps += [("start", i) for i in range(index, len(self.res))]
        self.op = _Op("restart", steps, failure=f"{said}; restart {len(self.restarts)} of {self.policy.max_restarts}")
        return self._next(now)

    # -- sequencing -----------------------------------------------------------------------------
    def _next(self, now: float) -> tuple[list[RunAgent], Outcome | None]:
        op = self.op
        if op is None:
            return self._monitors(now), None
        if self.inflight is not None:
            return [], None  # one action in flight per group: the next step waits for the current one
        if op.steps:
            step, index = op.steps.pop(0)
            return [self._run(step, index)], None
        self.op = None
        return [], self._finish(op)

    def _finish(self, op: _Op) -> Outcome:
        g = self.group.name
        if op.kind == "probe":
            running = [resource_name(r.spec) for r in self.res if r.state is RState.STARTED]
            if running and len(running) == len(self.res):
                return Outcome("probed", f"group {g}: every resource is already running here: adopting it", True)
            if running:
                return Outcome("probed", f"group {g}: partly running here ({', '.join(running)}): stopping "
                                         f"what runs before anything else", False)
            return Outcome("probed", f"group {g}: nothing running here", False)
        if op.kind == "failover":
            return Outcome("failover", f"group {g} failed over: {op.failure}; released here")
        if op.rollback:
            return Outcome("start-failed", f"group {g} failed to start: {op.failure}; rolled back")
        if op.kind == "restart":
            return Outcome("restarted", f"group {g} restarted in place: {op.failure}")
        return Outcome("started" if op.kind == "start" else "stopped",
                       f"group {g} {'started' if op.kind == 'start' else 'stopped'}")

    def _monitor_due(self, r: RTrack, now: float) -> float | None:
        interval = r.spec.monitor_interval_ms
        if interval == 0:
            return None  # this resource is not monitored
        return now + (interval / 1000 if interval is not None else self.policy.monitor_interval_s)

    def _run(self, op: str, index: int) -> RunAgent:
        self.op_id += 1
        self.inflight = (op, index, self.op_id)
        return RunAgent(self.group.name, index, op, self.timeout_s(op, index), self.op_id)

    def timeout_s(self, op: str, index: int) -> float:
        """The timeout of `op` on resource `index`: its own if configured, else the policy's."""
        spec = self.res[index].spec
        own = {"start": spec.start_timeout_ms, "stop": spec.stop_timeout_ms}.get(op, spec.monitor_timeout_ms)
        default = {"start": self.policy.start_timeout_s, "stop": self.policy.stop_timeout_s}.get(
            op, self.policy.monitor_timeout_s)
        return own / 1000 if own is not None else default

    def held(self) -> list[int]:
        """The resources that may run here now, in start order: started ones, failed or stop-failed ones (they may
        be partly up), and the one with a start or stop in flight. What the guard stops if the daemon dies."""
        moving = self.inflight[1] if self.inflight is not None and self.inflight[0] in ("start", "stop") else None
        return [i for i, r in enumerate(self.res) if r.state in HOLDING or i == moving]

    def _monitors(self, now: float) -> list[RunAgent]:
        if self.inflight is not None:
            return []
        for i, r in enumerate(self.res):
            if r.state is RState.STARTED and r.next_monitor is not None and now >= r.next_monitor:
                r.next_monitor = None
                action = self._run("monitor", i)
                self.periodic = True
                return [action]
        return []

    def tick(self, now: float) -> list[RunAgent]:
        if self.op is not None or self.inflight is not None:
            return []
        return self._monitors(now)

    def next_deadline(self) -> float | None:
        if self.op is not None or self.inflight is not None:
            return None
        times = [r.next_monitor for r in self.res if r.state is RState.STARTED and r.next_monitor is not None]
        return min(times) if times else None

    def status(self) -> list[dict]:
        return [{"name": resource_name(r.spec), "state": r.state.value, "reason": r.reason} for r in self.res]


def _rc_text(rc: int) -> str:
    if rc == TIMEOUT_RC:
        return "timed out"
    names = {0: "succeeded", 1: "failed (generic error)", 2: "failed (invalid argument)", 3: "unimplemented",
             4: "failed (insufficient privilege)", 5: "failed (not installed)", 6: "failed (not configured)",
             7: "says not running"}
    return names.get(rc, f"failed (exit {rc})")


__all__ = ["GroupOps", "Policy", "Outcome", "RState", "resource_name", "TIMEOUT_RC"]
