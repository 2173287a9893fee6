"""The guard: its decisions (Watch, fed messages and times), the real guard process driven through GuardClient over
a socket pair, what the engine tells it is held, and its configuration keys."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hastore.config import load, to_toml
from hastore.config.model import Group, Resource, Timing, default_guard_timeout_ms
from hastore.core.resources import GroupOps, Policy
from hastore.io.guard import GuardClient, GuardError, Stop, Watch
from hastore.io.proc import start_ticks, with_repo_on_path

from test_config_native import MINIMAL, errors_of, write

A = {"name": "g/a", "argv": ["true"], "env": {}, "timeout_s": 5}
B = {"name": "g/b", "argv": ["true"], "env": {}, "timeout_s": 7}


# -- Watch: the decisions -------------------------------------------------------------------------------------------
def test_pets_keep_it_watching_and_silence_past_the_timeout_fences_in_reverse_order():
    w = Watch(42, 0.8, now=0.0)
    w.receive({"m": "held", "resources": [A, B]}, 0.1)
    for t in (0.5, 1.0, 1.5):
        w.receive({"m": "pet"}, t)
        assert w.decide(t, eof=False) is None
    assert w.deadline() == pytest.approx(2.3)
    assert w.decide(2.3, eof=False) is None  # not before the timeout has passed
    v = w.decide(2.31, eof=False)
    assert v.kind == "fence" and [s.name for s in v.stops] == ["g/b", "g/a"] and v.silent_ms == 810
    assert v.reason == ("daemon pid 42 sent nothing for 810 ms (guard_timeout 800 ms): it is frozen or stuck: "
                        "self-fencing: stopping g/b, g/a")
    assert v.stops[0] == Stop("g/b", ("true",), {}, 7.0)


def test_a_pet_on_the_page_counts_from_when_it_was_written_and_never_from_later_than_now():
    w = Watch(42, 0.8, now=0.0)
    w.receive({"m": "held", "resources": [A]}, 0.1)
    w.petted(0.7, now=0.9)  # the guard looked at 0.9 (its deadline): the daemon had petted at 0.7
    assert w.deadline() == pytest.approx(1.5) and w.decide(1.5, eof=False) is None
    w.petted(0.2, now=1.6)  # an older time than the last one seen changes nothing
    assert w.decide(1.51, eof=False).kind == "fence"
    w = Watch(42, 0.8, now=0.0)
    w.petted(99.0, now=1.0)  # read while being written (torn): at most a pet now, never one in the future
    assert w.deadline() == pytest.approx(1.8)


def test_eof_without_bye_fences_at_once():
    w = Watch(42, 0.8, now=0.0)
    w.receive({"m": "held", "resources": [A]}, 0.0)
    v = w.decide(0.01, eof=True)
    assert v.kind == "fence" and v.reason == "daemon pid 42 died (EOF on guard pipe): self-fencing: stopping g/a"


def test_bye_exits_quietly_even_with_eof_and_nothing_held_fences_nothing():
    w = Watch(42, 0.8, now=0.0)
    w.receive({"m": "held", "resources": []}, 0.0)
    assert w.decide(5.0, eof=True).stops == ()
    assert "nothing held here" in w.decide(5.0, eof=True).reason
    w.receive({"m": "bye"}, 0.1)
    assert w.decide(9.0, eof=True).kind == "bye"


def test_silence_with_nothing_held_is_not_a_fence_and_starts_a_new_window():
    w = Watch(42, 0.8, now=0.0)
    w.receive({"m": "held", "resources": []}, 0.0)
    assert w.decide(0.9, eof=False) is None  # a daemon slow to start that holds nothing is left alone
    assert w.deadline() == pytest.approx(1.7)
    w.receive({"m": "held", "resources": [A]}, 1.0)
    assert w.decide(1.81, eof=False).stops[0].name == "g/a"  # once it holds something, silence fences again


def test_held_is_replaced_whole_sync_is_answered_and_the_timeout_can_change():
    w = Watch(42, 0.8, now=0.0)
    w.receive({"m": "held", "resources": [A, B]}, 0.0)
    w.receive({"m": "held", "resources": [A]}, 0.0)
    w.receive({"m": "agents", "pids": [[100, 5]]}, 0.0)
    assert w.receive({"m": "sync", "n": 3}, 0.2) == {"m": "ok", "n": 3}
    w.receive({"m": "timeout", "ms": 2000}, 0.2)
    assert w.decide(2.1, eof=False) is None
    v = w.decide(2.3, eof=False)
    assert [s.name for s in v.stops] == ["g/a"] and v.agents == ((100, 5),)
    with pytest.raises(ValueError, match="unknown message 'hello'"):
        w.receive({"m": "hello"}, 0.0)


# -- what the engine says is held --------------------------------------------------------------------------------
def test_held_follows_starts_and_stops_and_uses_the_stop_timeout():
    ops = GroupOps(Group("g", "alpha", (Resource("a", stop_timeout_ms=3000), Resource("b"))), Policy())
    (run,), _ = ops.start(0.0)
    assert ops.held() == [0]  # starting
    (run,), _ = ops.on_result("start", 0, run.op_id, 0, "", 0.1)
    assert ops.held() == [0, 1]
    ops.on_result("start", 1, run.op_id, 0, "", 0.2)
    assert ops.held() == [0, 1]
    (run,), _ = ops.stop(1.0)
    assert run.index == 1 and ops.held() == [0, 1]  # stopping: still held
    (run,), _ = ops.on_result("stop", 1, run.op_id, 0, "", 1.1)
    assert ops.held() == [0]
    ops.on_result("stop", 0, run.op_id, 0, "", 1.2)
    assert ops.held() == []
    assert (ops.timeout_s("stop", 0), ops.timeout_s("stop", 1)) == (3.0, 90.0)


# -- the real guard process ------------------------------------------------------------------------------------
def stop_entry(tmp_path: Path, name: str, script: str, timeout_s: float = 5.0) -> dict:
    return {"name": name, "argv": ["sh", "-c", script], "env": {"PATH": os.environ["PATH"], "OUT": str(tmp_path)},
            "timeout_s": timeout_s}


def drive(tmp_path: Path, steps, timeout_ms: int = 500) -> tuple[GuardClient, str]:
    """Start a guard, run `steps(client)` (a coroutine), wait for the guard to exit; returns it and its log."""
    log = tmp_path / "guard.log"

    async def main():
        client = GuardClient(timeout_ms, str(log), lambda: None, asyncio.get_running_loop())
        client.start()
        try:
            await steps(client)
        finally:
            client.close(bye=False)
            client._reap(10.0)
            if client.proc.poll() is None:
                client.proc.kill()
        return client
    client = asyncio.run(main())
    return client, log.read_text() if log.exists() else ""


def test_a_dead_daemon_s_resources_are_stopped_in_reverse_order_past_failures(tmp_path):
    async def steps(g):
        g.hold([stop_entry(tmp_path, "g/a", 'echo a >> "$OUT/order"'),
                stop_entry(tmp_path, "g/b", 'echo b >> "$OUT/order"; exit 1'),
                stop_entry(tmp_path, "g/c", 'echo c >> "$OUT/order"; sleep 30', timeout_s=0.3)])
        assert g.status()["held"] == 3
    client, log = drive(tmp_path, steps)  # closing without bye is what the kernel does when the daemon dies
    assert (tmp_path / "order").read_text() == "c\nb\na\n"
    assert client.proc.returncode == 1
    assert f"daemon pid {os.getpid()} died (EOF on guard pipe): self-fencing: stopping g/c, g/b, g/a" in log
    assert "stop of g/c failed (exit -1: killed after 0.3 s); going on with the rest" in log
    assert "stop of g/b failed (exit 1); going on" in log and "stopped g/a" in log
    assert "2 of 3 stop(s) failed: g/c, g/b may still run here" in log


def test_a_frozen_daemon_is_fenced_and_learns_it_on_waking(tmp_path):
    async def steps(g):
        g.hold([stop_entry(tmp_path, "g/a", 'touch "$OUT/stopped"')])
        for _ in range(6):  # pets every 0.1 s: never fenced
            await asyncio.sleep(0.1)
            g.pet()
        assert not (tmp_path / "stopped").exists() and g.confirm(1.0) is True
        time.sleep(0.7)  # frozen: the loop does not run (a blocking sleep on purpose)
        assert g.confirm(1.0) is False and g.fencing is not None
        assert "sent nothing for" in g.fencing["reason"] and g.fencing["silent_ms"] >= 500
    client, log = drive(tmp_path, steps)
    assert (tmp_path / "stopped").exists() and client.proc.returncode == 0
    assert "all 1 held resource(s) stopped" in log


def wakeups(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise AssertionError(f"no voluntary_ctxt_switches for pid {pid}")


def test_pets_on_the_page_keep_the_guard_watching_without_waking_it(tmp_path):
    async def steps(g):
        g.hold([stop_entry(tmp_path, "g/a", 'touch "$OUT/stopped"')])
        assert g.confirm(1.0) is True
        before = wakeups(g.proc.pid)
        for _ in range(40):  # 2 s of pets every 50 ms, four times guard_timeout
            await asyncio.sleep(0.05)
            g.pet()
        woke = wakeups(g.proc.pid) - before
        assert g.confirm(1.0) is True and not (tmp_path / "stopped").exists()
        # it looks at the page only when a timeout passed since the newest pet it saw: about every 0.45 s
        assert woke <= 12, f"the guard woke {woke} times for 40 pets"
    drive(tmp_path, steps)


@pytest.mark.parametrize("with_page", [True, False], ids=["pet page", "handover without a page"])
def test_a_re_executed_daemon_adopts_the_guard_and_pets_it(tmp_path, with_page):
    """hastore restart: the new image adopts the guard from HANDOVER_ENV; from an image that had no pet page
    (FD:PID) its pets go over the socket."""
    log = tmp_path / "guard.log"

    async def main():
        loop = asyncio.get_running_loop()
        old = GuardClient(500, str(log), lambda: None, loop)
        old.start()
        old.hold([stop_entry(tmp_path, "g/a", 'touch "$OUT/stopped"')])
        handover = old.hand_over()
        assert len(handover.split(":")) == 3
        if not with_page:
            handover = ":".join(handover.split(":")[:2])
        new = GuardClient(500, str(log), lambda: None, loop)
        new.adopt(handover)
        try:
            assert (new.pets is not None) is with_page
            for _ in range(30):  # 1.5 s: three times guard_timeout
                await asyncio.sleep(0.05)
                new.pet()
            assert new.confirm(1.0) is True and not (tmp_path / "stopped").exists()
            new.hold([])
            new.close(bye=True)
            assert new.proc.poll() == 0
        finally:
            if new.proc.poll() is None:
                os.kill(new.proc.pid, signal.SIGKILL)
    asyncio.run(main())
    assert not (tmp_path / "stopped").exists()


# A guard's whole life in one process: main() on one end of a socket pair whose other end said bye; then the modules
# it had loaded, one per line.
GUARD_LIFE = """
import os, socket, sys
from hastore.io import guard
ours, theirs = socket.socketpair()
ours.sendall(b'{"m": "bye"}\\n')
ours.close()
rc = guard.main(["--fd", str(theirs.detach()), "--daemon-pid", str(os.getpid()), "--timeout-ms", "1000"])
print("\\n".join(sorted(sys.modules)))
sys.exit(rc)
"""


def test_the_guard_runs_without_the_daemon_s_imports():
    """The daemon waits for its guard to answer before it runs (STARTUP_S). Under an emulated VM on a loaded machine
    each import costs seconds: the guard, importing asyncio and the configuration through hastore.io.agents and
    structlog for its log, once took 8.4 s to start in one guest of a CI run, whose other guest's daemon was gone.
    Through its whole run (here: started, told bye, exited) it loads the standard library and four small modules of
    ours."""
    r = subprocess.run([sys.executable, "-c", GUARD_LIFE], capture_output=True, text=True,
                       env=with_repo_on_path(dict(os.environ)))
    assert r.returncode == 0, r.stderr
    loaded = set(r.stdout.split())
    assert "hastore.io.guard" in loaded
    ours = {m for m in loaded if m.startswith("hastore.")}
    assert ours <= {"hastore.io", "hastore.io.guard", "hastore.io.proc", "hastore.io.log", "hastore.core",
                    "hastore.core.actions", "hastore.agentlib", "hastore.agentlib.ocf"}, sorted(ours)
    heavy = {"asyncio", "ssl", "tomllib", "structlog", "logging"}
    assert not loaded & heavy, sorted(loaded & heavy)


def test_the_guard_s_log_lines_are_the_daemon_s(tmp_path):
    """The guard writes to the daemon's log without structlog: the same JSON keys in the same order."""
    from hastore.io import log as hlog
    r = subprocess.run([sys.executable, "-c", "from hastore.io import log as hlog\n"
                        "hlog.configure(None, json_lines=True)\n"
                        "hlog.get().bind(guard_pid=7).warning('self-fencing', reason='stopped g/a', elapsed_ms=12)"],
                       capture_output=True, text=True, check=True, env=with_repo_on_path(dict(os.environ)))
    theirs = json.loads(r.stderr)
    hlog.JsonLines(str(tmp_path / "log")).bind(guard_pid=7).warning("self-fencing", reason="stopped g/a",
                                                                     elapsed_ms=12)
    ours = json.loads((tmp_path / "log").read_text())
    assert list(ours) == list(theirs) == ["guard_pid", "reason", "elapsed_ms", "event", "level", "timestamp"]
    assert {k: v for k, v in ours.items() if k != "timestamp"} == {k: v for k, v in theirs.items() if k != "timestamp"}
    assert ours["timestamp"][:10] == theirs["timestamp"][:10] and "T" in ours["timestamp"]


def test_a_slow_guard_start_is_not_counted_as_the_daemon_s_silence(tmp_path, monkeypatch):
    """The wait for the guard to answer at start is not a stall of the daemon's: its first decision after it must
    not find guard_timeout passed (once logged as 'the daemon did not run for 8451 ms' on a slow VM)."""
    slow = tmp_path / "slow-python"
    slow.write_text(f"#!/bin/sh\nsleep 1.5\nexec {sys.executable} \"$@\"\n")
    slow.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(slow))

    async def steps(g):
        assert time.monotonic() - t0 >= 1.5  # the guard's start did take that long
        assert g.silence(time.monotonic()) < 0.5  # well short of guard_timeout (500 ms here)
        g.close(bye=True)
    t0 = time.monotonic()
    drive(tmp_path, steps)


@pytest.mark.parametrize("script, said", [
    ("sleep 3\nexec {python} \"$@\"", "no answer within 0.5 s"),  # a replacement waits no longer than it may
    ("exit 4", "exit status 4"),  # one that cannot run at all says so at once
], ids=["too slow", "exits"])
def test_a_guard_that_does_not_answer_in_time_is_an_error_that_says_why(tmp_path, monkeypatch, script, said):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\n" + script.format(python=sys.executable) + "\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))

    async def main():
        client = GuardClient(500, None, lambda: None, asyncio.get_running_loop())
        t0 = time.monotonic()
        try:
            with pytest.raises(GuardError, match=said):
                client.start(wait_s=0.5)
            assert time.monotonic() - t0 < 2.5
        finally:
            if client.proc is not None and client.proc.poll() is None:
                os.killpg(client.proc.pid, signal.SIGKILL)  # its own session (start_new_session)
                client.proc.wait()
    asyncio.run(main())


def test_bye_ends_the_guard_without_fencing(tmp_path):
    async def steps(g):
        g.hold([stop_entry(tmp_path, "g/a", 'touch "$OUT/stopped"')])
        g.hold([])
        g.close(bye=True)
        assert g.proc.returncode == 0
    _, log = drive(tmp_path, steps)
    assert not (tmp_path / "stopped").exists() and log == ""


def test_agents_left_in_flight_are_killed_before_the_stops(tmp_path):
    agent = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        async def steps(g):
            g.track_agents([agent.pid, 999999999])  # a pid that does not exist is not sent
            assert g.agents == [[agent.pid, start_ticks(agent.pid)]]
            g.hold([stop_entry(tmp_path, "g/a", "true")])
        drive(tmp_path, steps)
        assert agent.wait(5) == -signal.SIGKILL
    finally:
        agent.kill()
        agent.wait()


def test_the_guard_survives_a_signal_to_the_daemon_s_process_group(tmp_path):
    async def steps(g):
        assert os.getpgid(g.proc.pid) == g.proc.pid != os.getpgid(0)  # its own process group and session
        os.kill(g.proc.pid, signal.SIGTERM)  # ignored: it ends when its work is done
        await asyncio.sleep(0.2)
        assert g.confirm(1.0) is True
    drive(tmp_path, steps)


# -- configuration -----------------------------------------------------------------------------------------------
def test_default_guard_timeout_is_deadtime_minus_one_keepalive():
    assert default_guard_timeout_ms(Timing(200, 500, 1000, 2000)) == 800
    assert default_guard_timeout_ms(Timing()) == 29000
    assert default_guard_timeout_ms(Timing(1000, 1000, 2500, 10000)) == 2250  # halfway: > 2 x keepalive


def test_toml_guard_keys_and_their_defaults(tmp_path):
    cfg = load(write(tmp_path, MINIMAL), node="alpha")
    assert cfg.guard is True and cfg.guard_timeout_ms is None and cfg.guard_timeout == 29000
    text = MINIMAL + '[daemon]\nguard = false\nguard_timeout = "10s"\n'
    cfg = load(write(tmp_path, text), node="alpha")
    assert (cfg.guard, cfg.guard_timeout) == (False, 10000)
    again = load(write(tmp_path, to_toml(cfg), name="again.toml"), node="alpha")
    assert (again.guard, again.guard_timeout_ms) == (False, 10000)
    assert "\nguard" not in to_toml(load(write(tmp_path, MINIMAL), node="alpha"))  # defaults follow the timing


@pytest.mark.parametrize("value, message", [
    ("2s", ("hastore.toml: daemon.guard_timeout: guard_timeout 2s must be more than 2 x keepalive 1s (= 2s): the "
            "guard must not stop the resources of a daemon that only missed two beats")),
    ("30s", ("hastore.toml: daemon.guard_timeout: guard_timeout 30s must be less than deadtime 30s: the guard "
             "must stop this node's resources before the peer declares it dead and starts them")),
])
def test_guard_timeout_must_lie_between_two_keepalives_and_deadtime(tmp_path, value, message):
    assert errors_of(write(tmp_path, MINIMAL + f'[daemon]\nguard_timeout = "{value}"\n')) == [message]


def test_guard_keys_of_the_wrong_type_are_named(tmp_path):
    text = MINIMAL + '[daemon]\nguard = "yes"\nguard_timeout = "soon"\n'
    errors = errors_of(write(tmp_path, text))
    assert errors[0] == "hastore.toml: daemon.guard: must be true or false, not a string"
    assert errors[1].startswith("hastore.toml: daemon.guard_timeout: 'soon' is not a duration")


def test_legacy_configs_get_the_defaults(tmp_path):
    d = tmp_path / "ha.d"
    d.mkdir()
    (d / "ha.cf").write_text("keepalive 200ms\ndeadtime 1\ninitdead 10\nbcast eth0\nnode alpha beta\n"
                             "watchdog /dev/watchdog\nauto_failback off\n")
    (d / "authkeys").write_text("auth 1\n1 sha1 s\n")
    os.chmod(d / "authkeys", 0o600)
    cfg = load(str(d), node="alpha")
    assert (cfg.guard, cfg.guard_timeout, cfg.watchdog) == (True, 800, "/dev/watchdog")

