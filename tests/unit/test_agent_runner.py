"""The agent runner against real child processes: each kind of agent, exit-code mapping, timeouts."""

import asyncio
import os
import shlex
import time
from pathlib import Path

from hastore.config.model import Group, Resource
from hastore.io import agents as ag

OCF_SCRIPT = """#!/bin/sh
# a tiny OCF agent: a flag file named by OCF_RESKEY_state
case "$1" in
  start) touch "$OCF_RESKEY_state"; exit 0 ;;
  stop) rm -f "$OCF_RESKEY_state"; exit 0 ;;
  monitor) [ -e "$OCF_RESKEY_state" ] && exit 0; exit 7 ;;
  sleep) sleep 30 ;;
esac
exit 3
"""
HB_SCRIPT = """#!/bin/sh
flag="$FLAGDIR/hb-$1"
case "$2" in start) touch "$flag" ;; stop) rm -f "$flag" ;;
status) if [ -e "$flag" ]; then echo running; else echo stopped; fi ;; esac
"""
LSB_SCRIPT = """#!/bin/sh
case "$1" in start) touch "$FLAGDIR/lsb" ;; stop) rm -f "$FLAGDIR/lsb" ;;
status) [ -e "$FLAGDIR/lsb" ] && exit 0; exit 3 ;; esac
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def run_ops(runner: ag.AgentRunner, steps):
    results = []

    async def main():
        done = asyncio.Event()
        pending = []

        def on_done(*args):
            results.append(args)
            if len(results) == len(pending):
                done.set()
        runner.done = on_done
        for group, index, op, timeout in steps:
            pending.append(op)
            runner.run(group, index, op, timeout, len(pending))
            while len(results) < len(pending):
                await asyncio.sleep(0.01)
    asyncio.run(main())
    return [(r[2], r[4], r[5]) for r in results]


def test_every_kind_of_agent_and_its_exit_codes(tmp_path, monkeypatch):
    monkeypatch.setenv("FLAGDIR", str(tmp_path))
    ocf = write(tmp_path / "myocf", OCF_SCRIPT)
    rd = tmp_path / "resource.d"
    rd.mkdir()
    write(rd / "hbflag", HB_SCRIPT)
    initd = tmp_path / "init.d"
    initd.mkdir()
    write(initd / "lsbflag", LSB_SCRIPT)
    state = tmp_path / "ocf.state"
    resources = (Resource("hbflag", ("one",)), Resource("lsbflag"),
                 Resource("ocf:x:y", params=(("state", str(state)),)))
    group = Group("g", "alpha", resources)
    runner = ag.AgentRunner([group], rd, None)
    runner.invocations[("g", 1)] = ag.resolve(resources[1], rd, init_d=initd)
    runner.invocations[("g", 2)] = ag.Invocation("ocf", str(ocf), params=(("state", str(state)),))
    assert runner.invocations[("g", 0)].kind == "heartbeat"
    assert runner.invocations[("g", 1)].kind == "lsb"
    got = run_ops(runner, [("g", i, op, 5) for op in ("monitor", "start", "monitor", "stop", "monitor") for i in range(3)])
    rcs = [rc for _, rc, _ in got]
    assert rcs == [7, 7, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7, 7, 7]
    assert not state.exists() and not (tmp_path / "hb-one").exists()


def test_timeout_kills_the_agent_and_its_children(tmp_path):
    ocf = write(tmp_path / "slow", OCF_SCRIPT.replace('start) touch "$OCF_RESKEY_state"; exit 0 ;;',
                                                      'start) sleep 30 & sleep 30 ;;'))
    group = Group("g", "alpha", (Resource("slow"),))
    runner = ag.AgentRunner([group], None, None)
    runner.invocations[("g", 0)] = ag.Invocation("ocf", str(ocf), params=(("state", str(tmp_path / "s")),))
    t0 = time.monotonic()
    (op, rc, detail), = run_ops(runner, [("g", 0, "start", 0.5)])
    assert rc == -1 and "killed after 0.5 s" in detail
    assert time.monotonic() - t0 < 3
    time.sleep(0.2)
    leftovers = [p for p in os.listdir("/proc") if p.isdigit() and str(ocf) in _cmdline(p)]
    assert leftovers == []


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_resolution_order_and_haresources_arguments(tmp_path):
    agents = tmp_path / "agents"
    agents.mkdir()
    write(agents / "IPaddr", "#!/bin/sh\n")
    write(agents / "Filesystem", "#!/bin/sh\n")
    write(agents / "drbd", "#!/bin/sh\n")
    inv = ag.resolve(Resource("IPaddr", ("10.0.0.100/24/eth0",)), None, agents_dir=agents)
    assert inv.kind == "ocf" and inv.params == (("ip", "10.0.0.100/24/eth0"),)
    inv = ag.resolve(Resource("Filesystem", ("/dev/drbd0", "/data", "ext4")), None, agents_dir=agents)
    assert inv.params == (("device", "/dev/drbd0"), ("directory", "/data"), ("fstype", "ext4"))
    inv = ag.resolve(Resource("drbddisk", ("r0",)), None, agents_dir=agents)
    assert inv.path.endswith("/drbd") and inv.params == (("resource", "r0"),)
    inv = ag.resolve(Resource("ocf:heartbeat:Dummy", params=(("state", "/x"),)), None, agents_dir=agents)
    assert inv.path == "/usr/lib/ocf/resource.d/heartbeat/Dummy"
    write(agents / "mysql", "#!/bin/sh\n")
    initd = tmp_path / "init.d"
    initd.mkdir()
    write(initd / "mysql", "#!/bin/sh\n")
    # a bare `mysql` in haresources is the init script (as with Heartbeat); with a datadir it is our agent
    assert ag.resolve(Resource("mysql"), None, agents_dir=agents, init_d=initd, ocf_root=tmp_path).kind == "lsb"
    inv = ag.resolve(Resource("mysql", ("/data/mysql",)), None, agents_dir=agents, init_d=initd)
    assert inv.kind == "ocf" and inv.params == (("datadir", "/data/mysql"),)
    # each further argument is one server option; the agent splits them as a shell would
    inv = ag.resolve(Resource("mysql", ("/data/mysql", "--innodb-buffer-pool-size=32M", "--key-buffer-size=1M",
                                        "--init-connect=SET @a=1;")), None, agents_dir=agents, init_d=initd)
    opts = dict(inv.params)["additional_parameters"]
    assert shlex.split(opts) == ["--innodb-buffer-pool-size=32M", "--key-buffer-size=1M", "--init-connect=SET @a=1;"]
    inv = ag.resolve(Resource("nosuchthing"), None, agents_dir=agents, init_d=tmp_path)
    assert inv.kind in ("missing", "systemd")


def test_a_missing_agent_fails_start_but_not_stop_or_probe(tmp_path):
    group = Group("g", "alpha", (Resource("nosuch"),))
    runner = ag.AgentRunner([group], None, None)
    runner.invocations[("g", 0)] = ag.Invocation("missing", "nosuch")
    got = run_ops(runner, [("g", 0, op, 1) for op in ("monitor", "start", "stop")])
    assert [rc for _, rc, _ in got] == [7, 5, 0]
    assert "no agent" in got[1][2]


def test_nfsserver_haresources_arguments_pair_paths_and_clients(tmp_path):
    agents = tmp_path / "agents"
    agents.mkdir()
    write(agents / "nfsserver", "#!/bin/sh\n")
    inv = ag.resolve(Resource("nfsserver", ("/srv/nfs/state", "/srv/nfs/export", "10.0.0.0/24(rw,sync)",
                                            "/srv/nfs/export", "10.1.0.5(ro)")), None, agents_dir=agents)
    assert inv.kind == "ocf" and dict(inv.params) == {
        "shared_dir": "/srv/nfs/state", "exports": "/srv/nfs/export 10.0.0.0/24(rw,sync); /srv/nfs/export 10.1.0.5(ro)"}
    # a path without its client goes to the agent as such: its validation names the missing client
    inv = ag.resolve(Resource("nfsserver", ("/s", "/e")), None, agents_dir=agents)
    assert dict(inv.params) == {"shared_dir": "/s", "exports": "/e"}
    # no export at all is not our agent's form (exports is required): resolution falls through
    inv = ag.resolve(Resource("nfsserver", ("/s",)), None, agents_dir=agents, init_d=tmp_path, ocf_root=tmp_path)
    assert inv.kind != "ocf"
