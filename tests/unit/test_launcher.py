"""The agent launcher (hastore.io.launcher + hastore.agentlib.zygote): our agents forked from a process that has
imported them must behave exactly as when started with `python -S AGENT OP`: argv, environment, output, exit
codes, a session of their own, timeouts; and when the launcher dies, no result is invented."""

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

from hastore.config.model import Group, Resource
from hastore.io import agents as ag
from hastore.io.launcher import Launcher, LauncherGone

REPO = Path(__file__).resolve().parents[2]

AGENT = """import os, sys, time
op = sys.argv[1]
if op == "show":
    print("argv", sys.argv[1:], "name", __name__, "file", os.path.basename(__file__))
    print("env", os.environ.get("OCF_RESKEY_word"), "leaked", os.environ.get("LAUNCHER_TEST_LEAK"))
    print("session", os.getsid(0) == os.getpid(), "stdin", sys.stdin.read() == "")
    sys.stderr.write("to stderr\\n")
    sys.exit(7)
if op == "raise":
    raise RuntimeError("boom")
if op == "message":
    sys.exit("a message")
if op == "none":
    sys.exit()
if op == "kill-self":
    os.kill(os.getpid(), 9)
if op == "sleep":
    time.sleep(30)
if op == "file":
    if os.environ.get("OCF_RESKEY_quiet"):  # its output ends long before it does
        os.close(1), os.close(2)
    open(os.environ["OCF_RESKEY_flag"], "w").write(str(os.getpid()))
    time.sleep(float(os.environ.get("OCF_RESKEY_hold", "0")))
"""


def env(**params) -> dict[str, str]:
    e = ag.with_repo_on_path({"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    e.update({f"OCF_RESKEY_{k}": v for k, v in params.items()})
    return e


def launcher() -> Launcher:
    lau = Launcher(ag.with_repo_on_path(dict(os.environ)))
    assert lau.start()
    return lau


def with_launcher(tmp_path: Path, body, text: str = AGENT):
    """Run `await body(launcher, agent_path)` with AGENT (or `text`) as the agent, closing the launcher after."""
    agent = tmp_path / "agent"
    agent.write_text(text)

    async def main():
        lau = launcher()
        try:
            return await body(lau, agent)
        finally:
            lau.close()
    return asyncio.run(main())


async def forked(lau: Launcher, path: Path, op: str, **params) -> tuple[bytes, int, int]:
    p = await lau.run(str(path), [op], env(**params))
    out, rc = await p.communicate()
    return out, rc, p.pid


async def started(path: Path, op: str, **params) -> tuple[bytes, int]:
    p = await asyncio.create_subprocess_exec(sys.executable, "-S", str(path), op, env=env(**params),
                                             stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                                             stderr=asyncio.subprocess.STDOUT, start_new_session=True)
    out, _ = await p.communicate()
    return out, p.returncode


def test_a_forked_agent_sees_what_a_started_one_sees(tmp_path, monkeypatch):
    monkeypatch.setenv("LAUNCHER_TEST_LEAK", "from the daemon")  # in the launcher's environment, not the agent's
    agent = tmp_path / "agent"
    agent.write_text(AGENT)

    async def main():
        lau = launcher()
        try:
            for op in ("show", "raise", "message", "none", "kill-self"):
                out, rc, _ = await forked(lau, agent, op, word="hello")
                want_out, want_rc = await started(agent, op, word="hello")
                assert rc == want_rc, (op, out)
                # the traceback's first frame differs (exec of a code object vs a script): compare the rest
                assert out.splitlines()[-1:] == want_out.splitlines()[-1:], op
                if op == "show":
                    assert out == want_out
            assert lau.started_agents == 5
        finally:
            lau.close()
    asyncio.run(main())
    out = asyncio.run(started(agent, "show", word="hello"))[0].decode()
    assert "argv ['show'] name __main__ file agent" in out and "env hello leaked None" in out
    assert "session True stdin True" in out and "to stderr" in out


def test_real_agents_answer_the_same_forked_or_started():
    async def main():
        lau = launcher()
        try:
            for name in ("IPaddr", "Filesystem", "disklock", "mysql", "drbd", "nfsserver"):
                path = REPO / "agents" / name
                for op in ("meta-data", "validate-all", "monitor"):
                    got, want = await forked(lau, path, op), await started(path, op)
                    assert got[:2] == want, (name, op, got, want)
        finally:
            lau.close()
    asyncio.run(main())


def test_an_agent_that_ends_before_the_caller_hears_it_started(tmp_path):
    """Both answers (started, exited) can be read in one go when the agent is quick and the loop busy: the exit
    code must still reach the caller (it once got lost, and the group waited for it forever)."""
    async def body(lau, agent):
        for _ in range(3):
            task = asyncio.create_task(lau.run(str(agent), ["x"], env()))
            await asyncio.sleep(0)   # run() has sent the request and waits to hear the pid
            time.sleep(0.3)          # the loop is busy: the agent forks and exits meanwhile
            launched = await asyncio.wait_for(task, 5)
            out, rc = await asyncio.wait_for(launched.communicate(), 5)
            assert rc == 3, (rc, out)
    with_launcher(tmp_path, body, "import sys; sys.exit(3)\n")


def test_the_runner_reports_an_operation_it_failed_to_run(tmp_path, monkeypatch):
    """A bug between the runner and its agent must not leave the operation unreported (its group would wait for
    it forever): the engine hears a generic error."""
    async def main():
        runner = runner_with_agent(tmp_path, monkeypatch, word="w")

        async def broken(*_):
            raise KeyError(16)
        monkeypatch.setattr(runner, "_spawn", broken)
        return await one_op(runner, "show", 5)
    op, rc, detail, _ = asyncio.run(main())
    assert rc == 1 and "hastore could not run the agent: KeyError(16)" in detail


def _children(pid: int) -> list[int]:
    return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]


def test_a_caller_cancelled_while_its_agent_is_forked_leaves_no_agent_behind(tmp_path):
    async def body(lau, agent):
        task = asyncio.create_task(lau.run(str(agent), ["sleep"], env()))
        await asyncio.sleep(0)  # sent; now waiting for the pid
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        deadline = time.monotonic() + 5
        while lau.abandoned and time.monotonic() < deadline:  # until its pid came (it was forked)
            await asyncio.sleep(0.05)
        assert not lau.abandoned
        while _children(lau.proc.pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert _children(lau.proc.pid) == [], "the agent forked for a cancelled caller must be killed"
        assert (await forked(lau, agent, "show", word="x"))[1] == 7  # and the launcher still works
    with_launcher(tmp_path, body)


def test_the_pid_comes_once_the_agent_leads_its_own_session(tmp_path):
    """So that killing the session by that pid (the runner's timeout, the guard) always reaches the agent."""
    async def body(lau, agent):
        for _ in range(10):
            p = await lau.run(str(agent), ["sleep"], env())
            assert os.getsid(p.pid) == p.pid
            os.killpg(p.pid, signal.SIGKILL)
            assert (await asyncio.wait_for(p.communicate(), 5))[1] == -9
    with_launcher(tmp_path, body)


def test_an_edited_agent_runs_its_new_code(tmp_path):
    agent = tmp_path / "agent"
    agent.write_text("import sys; sys.exit(3)\n")

    async def main():
        lau = launcher()
        try:
            assert (await forked(lau, agent, "x"))[1] == 3
            agent.write_text("import sys; sys.exit(4)  # a new version, longer\n")
            assert (await forked(lau, agent, "x"))[1] == 4
            agent.unlink()
            out, rc, _ = await forked(lau, agent, "x")
            assert rc == 1 and b"No such file" in out
        finally:
            lau.close()
    asyncio.run(main())


def runner_with_agent(tmp_path, monkeypatch, **params) -> ag.AgentRunner:
    """An AgentRunner whose one resource is AGENT, installed as one of ours (so the launcher runs it)."""
    monkeypatch.setattr(ag, "AGENTS_DIR", tmp_path)
    (tmp_path / "flagger").write_text(AGENT)
    runner = ag.AgentRunner([Group("g", "alpha", (Resource("flagger"),))], None, None)
    runner.invocations[("g", 0)] = ag.Invocation("ocf", str(tmp_path / "flagger"), params=tuple(params.items()))
    runner.start_launcher()
    assert runner.launcher is not None and runner.launcher.alive
    return runner


async def one_op(runner: ag.AgentRunner, op: str, timeout_s: float) -> tuple:
    """Run one operation; (op, rc, detail) and how many agents the launcher forked."""
    results = []
    runner.done = lambda *a: results.append(a)
    runner.run("g", 0, op, timeout_s, 1)
    t0 = time.monotonic()
    while not results and time.monotonic() - t0 < timeout_s + 5:
        await asyncio.sleep(0.01)
    forked_count = runner.launcher.started_agents
    runner.cancel_all()
    (_, _, op, _, rc, detail), = results
    return op, rc, detail, forked_count


def test_the_runner_forks_our_agents_and_its_timeout_kills_them(tmp_path, monkeypatch):
    async def main():
        runner = runner_with_agent(tmp_path, monkeypatch, flag=str(tmp_path / "pid"), hold="30")
        return await one_op(runner, "file", 0.5)
    op, rc, detail, forked_count = asyncio.run(main())
    assert forked_count == 1
    assert rc == -1 and "killed after 0.5 s" in detail
    pid = int((tmp_path / "pid").read_text())
    time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_when_the_launcher_dies_agents_it_ran_are_not_reported_done_before_they_end(tmp_path):
    agent = tmp_path / "agent"
    agent.write_text(AGENT)
    flag = tmp_path / "pid"

    async def main():
        lau = launcher()
        try:
            p = await lau.run(str(agent), ["file"], env(flag=str(flag), hold="0.8", quiet="1"))
            await asyncio.sleep(0.2)
            lau.proc.kill()  # the launcher dies while the agent runs
            t0 = time.monotonic()
            out, rc = await asyncio.wait_for(p.communicate(), 5)
            waited = time.monotonic() - t0
            # its exit code went with the launcher: a generic error, and only once the agent has ended
            assert rc == 1 and waited > 0.4, (rc, waited)
            assert not lau.alive
            try:
                await lau.run(str(agent), ["none"], env())
            except LauncherGone:
                pass
            else:
                raise AssertionError("a dead launcher must refuse, so the runner starts the agent itself")
        finally:
            lau.close()
    asyncio.run(main())
    assert int(flag.read_text()) > 0


def test_a_dead_launcher_makes_the_runner_start_agents_itself(tmp_path, monkeypatch):
    async def main():
        runner = runner_with_agent(tmp_path, monkeypatch, word="w")
        os.kill(runner.launcher.proc.pid, signal.SIGKILL)
        runner.launcher.proc.wait()
        for _ in range(100):  # the loop notices the closed socket
            await asyncio.sleep(0.01)
            if not runner.launcher.alive:
                break
        assert not runner.launcher.alive
        return await one_op(runner, "show", 5)
    op, rc, detail, forked_count = asyncio.run(main())
    assert forked_count == 0
    assert rc == 7 and detail == "to stderr"
