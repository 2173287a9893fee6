"""The guard with two real daemons in the namespace lab: a killed or frozen daemon's resources are stopped before
the peer starts them, and a clean stop is not mistaken for either. The "service" is the labflag resource.d script:
a flag file in the node's private /run, read here through the node's anchor process (/proc/PID/root)."""

import signal
import threading
import time
from pathlib import Path

import pytest

from hastore.lab.pair import Pair, PairTiming, _env, hastore_argv, peer_alive

pytestmark = pytest.mark.root

GUARD_TIMEOUT, DEADTIME = 0.8, 1.0  # PairTiming: keepalive 200 ms, deadtime 1 s -> guard_timeout 800 ms
RESOURCE = "group1/labflag::web"


@pytest.fixture
def pair(lab):
    """Both daemons up, the group started with its guard told; `pair.a` holds it (alpha, its preferred node, unless a
    slow first ping made alpha yield it at start), `pair.b` is the other."""
    with Pair(lab, PairTiming()) as p:
        p.start_all()
        for me, peer in (("alpha", "bravo"), ("bravo", "alpha")):
            wait_for(p, me, peer_alive(peer), timeout=15)
        holder = owner(wait_for(p, "bravo", lambda s: owner(s) is not None, timeout=10))
        p.a, p.b = holder, lab.peer(holder).name
        wait_for(p, p.a, lambda s: owner(s) == p.a and s["guard"]["held"] == 1, timeout=10)
        yield p


def wait_for(pair: Pair, name: str, predicate, timeout: float, interval: float = 0.05) -> dict:
    """Pair.wait_for, failing with both daemons' last log lines."""
    try:
        return pair.wait_for(name, predicate, timeout=timeout, interval=interval)
    except TimeoutError as e:
        logs = "\n".join(f"--- {n} (exit {pair.procs[n].poll()}):\n{pair.logs[n].read_text()[-4000:]}"
                         for n in pair.procs)
        pytest.fail(f"{e}\n{logs}")


def owner(status: dict) -> str | None:
    (g,) = status["groups"].values()
    return g["owner"] if g["state"] == "started" else None


def flag(pair: Pair, node: str) -> Path:
    return Path(f"/proc/{pair.lab.nodes[node].anchor_pid}/root/run/labflag-web")


def exited(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def wait_until(predicate, timeout: float, interval: float = 0.001) -> float:
    """Seconds until predicate() held; fails the test after timeout."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"not within {timeout} s: {predicate.__doc__ or predicate}")
        time.sleep(interval)
    return time.monotonic() - t0


def guard_lines(pair: Pair, name: str) -> list[dict]:
    return [e for e in pair.events(name) if "guard_pid" in e]


class OverlapSampler:
    """Samples both nodes' flags every 20 ms in a thread; `both` lists the times both were up at once."""

    def __init__(self, pair: Pair):
        self.pair, self.both, self.samples = pair, [], 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self.done.is_set():
            if flag(self.pair, "alpha").exists() and flag(self.pair, "bravo").exists():
                self.both.append(round(time.monotonic() - t0, 3))
            self.samples += 1
            time.sleep(0.02)

    def __enter__(self) -> "OverlapSampler":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join(5)


def test_sigkill_of_the_daemon_the_guard_stops_its_resources_before_the_peer_takes_them(pair):
    status = pair.status(pair.a)
    guard = status["guard"]
    assert guard["timeout_ms"] == GUARD_TIMEOUT * 1000 and guard["held"] == 1 and not exited(guard["pid"])
    assert flag(pair, pair.a).exists() and not flag(pair, pair.b).exists()
    with OverlapSampler(pair) as sampler:
        t0 = time.monotonic()
        pair.signal(pair.a, signal.SIGKILL)
        fenced = wait_until(lambda: not flag(pair, pair.a).exists(), timeout=GUARD_TIMEOUT + 0.2)
        wait_until(lambda: exited(guard["pid"]), timeout=2)
        wait_for(pair, pair.b, lambda s: owner(s) == pair.b, timeout=5, interval=0.02)
        took_over = time.monotonic() - t0
        assert flag(pair, pair.b).exists() and not flag(pair, pair.a).exists()
        time.sleep(0.3)  # and go on sampling a while after the takeover (it may take only a few samples)
    assert sampler.both == [] and sampler.samples > 10
    lines = guard_lines(pair, pair.a)
    pid = pair.procs[pair.a].pid
    assert lines[0]["reason"] == f"daemon pid {pid} died (EOF on guard pipe): self-fencing: stopping {RESOURCE}"
    done = next(e for e in lines if e["event"] == "self-fencing done")
    assert done["reason"] == "all 1 held resource(s) stopped"
    # then the guard's farewell: the peer takes over at once, not after deadtime (>= deadtime - keepalive = 0.8 s)
    assert any(e["reason"].startswith("told the peer this node holds nothing any more") for e in lines), lines
    left = [e for e in pair.events(pair.b) if f"{pair.a}'s guard stopped its resources" in e.get("reason", "")]
    assert left and "peer-left" in left[0].get("noticed", []), "the peer did not take the farewell"
    assert took_over < DEADTIME - 0.3, f"{pair.b} took over {took_over:.2f} s after the kill: it waited for deadtime"
    print(f"\nguard fencing time: SIGKILL -> flag gone {fenced * 1000:.1f} ms (guard's own count from EOF to all "
          f"stopped: {done['elapsed_ms']} ms); {pair.b} held the group after {took_over * 1000:.0f} ms")


def test_sigstop_past_deadtime_the_guard_fences_and_the_woken_daemon_exits_3(pair):
    guard_pid = pair.status(pair.a)["guard"]["pid"]
    with OverlapSampler(pair) as sampler:
        pair.signal(pair.a, signal.SIGSTOP)
        try:
            fenced = wait_until(lambda: not flag(pair, pair.a).exists(), timeout=GUARD_TIMEOUT + 0.3)
            assert fenced >= GUARD_TIMEOUT - 0.35  # not before guard_timeout without pets (one every <= 300 ms)
            wait_for(pair, pair.b, lambda s: owner(s) == pair.b, timeout=5, interval=0.02)
            time.sleep(0.3)  # frozen well past deadtime
        finally:
            pair.signal(pair.a, signal.SIGCONT)
        assert pair.procs[pair.a].wait(5) == 3
        assert exited(guard_pid)
        time.sleep(0.3)
        assert owner(pair.status(pair.b)) == pair.b
        assert flag(pair, pair.b).exists() and not flag(pair, pair.a).exists()
    assert sampler.both == [] and sampler.samples > 20
    reasons = [e.get("reason", "") for e in pair.events(pair.a)]
    assert any(r.startswith(f"daemon pid {pair.procs[pair.a].pid} sent nothing for") and
               r.endswith(f"self-fencing: stopping {RESOURCE}") for r in reasons), reasons
    fenced_line = next(e for e in pair.events(pair.a) if e.get("event") == "fenced")
    assert fenced_line["reason"].startswith("the guard self-fenced this node while the daemon was not running (frozen ")
    assert fenced_line["reason"].endswith(" ms); exiting so a supervisor restarts it clean")
    frozen_ms = int(fenced_line["reason"].split("(frozen ")[1].split(" ms")[0])
    assert frozen_ms > DEADTIME * 1000


def test_sigterm_is_a_clean_stop_the_guard_says_goodbye_without_fencing(pair):
    guard_pid = pair.status(pair.a)["guard"]["pid"]
    pair.signal(pair.a, signal.SIGTERM)
    assert pair.procs[pair.a].wait(5) == 0
    assert not flag(pair, pair.a).exists()  # stopped by the daemon's own stop
    wait_until(lambda: exited(guard_pid), timeout=2)
    assert guard_lines(pair, pair.a) == []
    assert not any("self-fencing" in e.get("reason", "") for e in pair.events(pair.a))
    wait_for(pair, pair.b, lambda s: owner(s) == pair.b, timeout=5)


def test_a_guard_killed_on_its_own_is_replaced_and_told_what_is_held(pair):
    old = pair.status(pair.a)["guard"]["pid"]
    time.sleep(GUARD_TIMEOUT)  # a guard that dies young is not replaced (the daemon leaves instead)
    pair.lab.nodes[pair.a].run(["kill", "-KILL", str(old)])
    status = wait_for(pair, pair.a, lambda s: s["guard"]["pid"] != old, timeout=5)
    assert status["guard"]["held"] == 1 and flag(pair, pair.a).exists()
    assert any(f"the guard (pid {old}) exited without fencing (killed by signal 9): starting a new one" in
               e.get("reason", "") for e in pair.events(pair.a))
    assert pair.status(pair.b)["peers"][pair.a]["alive"] is True
    pair.signal(pair.a, signal.SIGKILL)  # the new guard knows what to stop
    wait_until(lambda: not flag(pair, pair.a).exists(), timeout=GUARD_TIMEOUT + 0.2)
    wait_until(lambda: exited(status["guard"]["pid"]), timeout=2)


def test_restart_in_place_adopts_the_running_resources_and_keeps_the_guard(pair):
    """`hastore restart`: the daemon re-executes itself (same pid); the new image inherits the guard, probes and
    adopts the running resource instead of restarting it, and the peer never declares it dead."""
    before = pair.status(pair.a)
    ino = flag(pair, pair.a).stat().st_ino  # a stop and a start would make a new flag file
    mark = len(pair.events(pair.a))
    with OverlapSampler(pair) as sampler:
        t0 = time.monotonic()
        r = pair.lab.nodes[pair.a].run([*hastore_argv(), "restart"], env=_env(), timeout=10)
        assert r.returncode == 0, r.stderr
        after = wait_for(pair, pair.a, lambda s: s["generation"] != before["generation"] and owner(s) == pair.a
                         and s["guard"]["held"] == 1, timeout=10, interval=0.02)
        adopted = time.monotonic() - t0
        time.sleep(2 * DEADTIME)
    assert pair.procs[pair.a].poll() is None, "the daemon's process (the same pid, re-executed) is running"
    assert after["guard"]["pid"] == before["guard"]["pid"] and after["guard"]["timeout_ms"] == GUARD_TIMEOUT * 1000
    assert flag(pair, pair.a).stat().st_ino == ino and sampler.both == []
    new = pair.events(pair.a)[mark:]
    assert any("already running here: adopting it" in e.get("reason", "") for e in new), new[-20:]
    assert not [e for e in new if e.get("event") == "agent" and e.get("op") in ("start", "stop")]
    assert not [e for e in new if "self-fenc" in e.get("reason", "")]
    peer_view = [e.get("reason", "") for e in pair.events(pair.b)]
    assert any(f"{pair.a} restarted (generation" in r for r in peer_view)
    assert any(f"{pair.a} is restarting in place: waiting up to 6000 ms" in r for r in peer_view)
    assert not any(f"{pair.a} is dead" in r for r in peer_view), "the peer declared the restarting node dead"
    assert owner(pair.status(pair.b)) == pair.a
    print(f"\nrestart in place: resources adopted {adopted * 1000:.0f} ms after `hastore restart`")
    pair.signal(pair.a, signal.SIGKILL)  # the inherited guard still fences
    wait_until(lambda: not flag(pair, pair.a).exists(), timeout=GUARD_TIMEOUT + 0.3)


def test_with_the_peer_down_a_freeze_past_guard_timeout_fences_nothing_and_the_peer_s_return_ends_the_grace(pair):
    """Nobody can start the group while the peer is down (back, it waits initdead for our beats): the guard then
    allows initdead - keepalive (1.8 s here), so a loaded machine's stall does not stop a lone node's services.
    The peer's first beat gives the guard guard_timeout again."""
    pair.signal(pair.b, signal.SIGTERM)
    assert pair.procs[pair.b].wait(5) == 0
    s = wait_for(pair, pair.a, lambda s: s["guard"]["timeout_ms"] == 1800, timeout=5)
    assert owner(s) == pair.a
    pair.signal(pair.a, signal.SIGSTOP)
    try:
        time.sleep(GUARD_TIMEOUT + 0.5)  # past guard_timeout, well within 1.8 s
    finally:
        pair.signal(pair.a, signal.SIGCONT)
    time.sleep(0.5)
    assert pair.procs[pair.a].poll() is None, "the daemon exited after the freeze"
    assert flag(pair, pair.a).exists(), "the guard stopped the lone node's resource"
    assert owner(pair.status(pair.a)) == pair.a
    reasons = [e.get("reason", "") for e in pair.events(pair.a)]
    assert not [r for r in reasons if "self-fencing" in r], reasons
    assert any(r.startswith("guard timeout 1800 ms (initdead - keepalive): ") for r in reasons), reasons
    stalls = [r for r in reasons if r.startswith("the daemon did not run for ")]
    assert stalls and "more than guard_timeout (800 ms); the guard allows 1800 ms while the peer is down" in stalls[-1]
    pair.start(pair.b)
    s = wait_for(pair, pair.a, lambda s: s["guard"]["timeout_ms"] == 800, timeout=15)
    assert s["peers"][pair.b]["alive"] and owner(s) == pair.a
