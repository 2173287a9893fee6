"""agents/drbd against the DRBD test double (tests/fixtures/drbd/fake-drbdadm): promotion only of UpToDate data,
demotion, probes, DRBD 8.4 and 9 readers, and Debian's ocf-tester.  No kernel module and no root needed, except
that ocf-tester checks the agent's permissions as user nobody when run as root."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from pathlib import Path
from xml.dom import minidom

import pytest
from ocftester import ocf_tester

REPO = Path(__file__).resolve().parents[2]
AGENT = REPO / "agents" / "drbd"
FIX = REPO / "tests" / "fixtures" / "drbd"
FAKE_ADM, FAKE_SETUP, FAKE_SETUP_84 = FIX / "fake-drbdadm", FIX / "fake-drbdsetup", FIX / "fake-drbdsetup-84"


class Drbd:
    """One fake DRBD world in a temporary directory, and the agent pointed at it."""

    def __init__(self, state: Path):
        self.state = state
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("OCF_")}
        self.env.update(FAKE_DRBD_STATE=str(state), PYTHONPATH=str(REPO), OCF_RESOURCE_INSTANCE="data")
        self.params = {"resource": "r0", "drbdadm": str(FAKE_ADM), "drbdsetup": str(FAKE_SETUP),
                       "drbdsetup_84": str(FAKE_SETUP_84),
                       "proc_drbd": str(state / "proc_drbd"), "debugfs": str(state / "debugfs"),
                       "wait_connect_s": "0"}

    def fake(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(FAKE_ADM), *args], env=self.env, capture_output=True, text=True,
                              check=True)

    def set(self, res: str = "r0", **kv) -> None:
        self.fake("fake-set", res, *(f"{k}={v}" for k, v in kv.items()))

    def agent(self, action: str, **params: str) -> subprocess.CompletedProcess:
        env = {**self.env, **{f"OCF_RESKEY_{k}": v for k, v in {**self.params, **params}.items()}}
        return subprocess.run([str(AGENT), action], env=env, capture_output=True, text=True, timeout=60,
                              check=False)

    @contextlib.contextmanager
    def kernel(self):
        """The kernel changes /proc/drbd on its own (a peer connecting): the double does it when it is called, so
        call it every 0.1 s meanwhile, as an agent that reads /proc/drbd alone would not."""
        stop = threading.Event()

        def tick():
            while not stop.wait(0.1):
                self.fake("fake-set", "r0")  # no change: applies what is due and rewrites proc_drbd
        t = threading.Thread(target=tick, daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join()

    def role(self) -> str:
        """The double's own record (`drbdadm role` prints "Unconfigured" for a diskless StandAlone Secondary)."""
        return json.loads((self.state / "state.json").read_text())["resources"]["r0"]["role"]

    def calls(self) -> list[str]:
        path = self.state / "calls.log"
        return path.read_text().splitlines() if path.exists() else []

    def promotions(self) -> list[str]:
        return [c for c in self.calls() if " primary" in c]


@pytest.fixture
def drbd(tmp_path):
    world = Drbd(tmp_path)
    world.set("r0")  # up, Secondary/Secondary, Connected, UpToDate/UpToDate
    return world


def rc(result: subprocess.CompletedProcess) -> int:
    return result.returncode


# ------------------------------------------------------------------ the double speaks like real DRBD
@pytest.mark.parametrize("setup,command,fixture,code", [
    ({"role": "Primary"}, "role", "drbdadm-84-role-primary.txt", 0),
    ({"cstate": "WFConnection"}, "role", "drbdadm-84-role-secondary-alone.txt", 0),
    ({}, "cstate", "drbdadm-84-cstate-connected.txt", 0),
    ({"cstate": "WFConnection"}, "cstate", "drbdadm-84-cstate-wfconnection.txt", 0),
    ({}, "dstate", "drbdadm-84-dstate-uptodate.txt", 0),
    ({"cstate": "WFConnection", "disk": "Outdated"}, "dstate", "drbdadm-84-dstate-outdated.txt", 0),
    ({"disk": "Outdated", "cstate": "WFConnection"}, "primary", "drbdadm-84-primary-outdated.stderr", 17),
    ({"role": "Primary", "open": "true"}, "secondary", "drbdadm-84-secondary-held-open.stderr", 11),
    ({"peer_role": "Primary"}, "primary", "drbdadm-84-primary-peer-primary.stderr", 11),
    ({"up": "false"}, "role", "drbdadm-84-role-not-up.stderr", 10),
    ({}, "up", "drbdadm-84-up-already-up.stderr", 20),
])
def test_double_prints_the_literal_fixtures(drbd, setup, command, fixture, code):
    drbd.set(**setup)
    res = subprocess.run([str(FAKE_ADM), command, "r0"], env=drbd.env, capture_output=True, text=True,
                         check=False)
    assert res.returncode == code
    assert (res.stdout if fixture.endswith(".txt") else res.stderr) == (FIX / fixture).read_text()


def test_double_proc_and_unknown_resource_match_fixtures(drbd):
    drbd.set(role="Primary")
    lines = (drbd.state / "proc_drbd").read_text().splitlines()
    want = (FIX / "proc_drbd-84-connected-primary.txt").read_text().splitlines()
    assert lines[:3] == want[:3]  # version, srcversion (with its trailing blank), the minor's state line
    res = subprocess.run([str(FAKE_ADM), "role", "r9"], env=drbd.env, capture_output=True, text=True,
                         check=False)
    assert (res.returncode, res.stderr) == (1, (FIX / "drbdadm-not-defined.stderr").read_text())


def agent_calls(drbd) -> list[str]:
    return [c for c in drbd.calls() if "fake-set" not in c]


def test_drbd84_state_comes_from_proc_drbd_with_one_drbdadm_call_per_agent_call(drbd):
    """Without debugfs: the minor from `drbdadm sh-minor` once, then /proc/drbd for every read: no
    role/cstate/dstate processes."""
    nodebug = str(drbd.state / "no-debugfs")
    drbd.set(role="Primary")
    res = drbd.agent("monitor", debugfs=nodebug)
    assert rc(res) == 0, res.stderr  # 7 would mean it read Secondary: the double keeps proc_drbd in step
    drbd.set(role="Secondary", cstate="WFConnection", peer_role="Primary")
    assert rc(drbd.agent("monitor", debugfs=nodebug)) == 7
    assert agent_calls(drbd) == ["fake-drbdadm sh-minor r0"] * 2
    res = drbd.agent("start", debugfs=nodebug)  # no peer connected: promote, then read the result from /proc/drbd
    assert rc(res) == 0 and "r0 is Primary: role Primary/Unknown, connection WFConnection" in res.stderr, res.stderr
    assert agent_calls(drbd)[2:] == ["fake-drbdadm sh-minor r0", "fake-drbdsetup-84 primary 0"]


def test_drbd84_minor_from_debugfs_runs_no_drbdadm(drbd):
    """With DRBD's debugfs (minors/N -> ../resources/RES/volumes/V) monitor runs no process at all, and start
    only the promotion (drbdsetup-84); another resource's minor is not taken for ours."""
    drbd.set("r1", minor=1, role="Primary")
    assert sorted(os.listdir(drbd.state / "debugfs" / "minors")) == ["0", "1"]
    assert rc(drbd.agent("monitor")) == 7
    assert rc(drbd.agent("monitor", resource="r1")) == 0
    drbd.set(cstate="WFConnection", peer_role="Unknown")
    res = drbd.agent("start")
    assert rc(res) == 0 and "r0 is Primary" in res.stderr, res.stderr
    assert agent_calls(drbd) == ["fake-drbdsetup-84 primary 0"]
    drbd.fake("down", "r0")  # not up: debugfs has no minor of it, and drbdadm is asked (and brings it up)
    assert sorted(os.listdir(drbd.state / "debugfs" / "minors")) == ["1"]
    assert rc(drbd.agent("monitor")) == 7
    assert agent_calls(drbd)[-2:] == ["fake-drbdadm down r0", "fake-drbdadm sh-minor r0"]


# ------------------------------------------------------------------ meta-data and ocf-tester
def test_meta_data_is_valid_xml(drbd):
    res = drbd.agent("meta-data")
    assert rc(res) == 0, res.stderr
    doc = minidom.parseString(res.stdout)
    params = {p.getAttribute("name"): p for p in doc.getElementsByTagName("parameter")}
    assert set(params) == {"resource", "force_promote", "drbdadm", "drbdsetup", "drbdsetup_84", "wait_connect_s",
                           "wait_peer_gone_s", "proc_drbd", "debugfs"}
    assert params["drbdsetup_84"].getElementsByTagName("content")[0].getAttribute("default") == "auto"
    assert params["resource"].getAttribute("required") == "1"
    content = params["force_promote"].getElementsByTagName("content")[0]
    assert (content.getAttribute("type"), content.getAttribute("default")) == ("boolean", "false")
    actions = {a.getAttribute("name") for a in doc.getElementsByTagName("action")}
    assert {"start", "stop", "monitor", "meta-data", "validate-all"} <= actions


def test_ocf_tester_passes(drbd):
    out = ocf_tester(AGENT, drbd.params, env={"FAKE_DRBD_STATE": str(drbd.state)}).stdout
    assert "passed all tests" in out
    assert drbd.role() == "Secondary"


# ------------------------------------------------------------------ start / stop / monitor
def test_start_promotes_uptodate_and_is_idempotent(drbd):
    assert rc(drbd.agent("monitor")) == 7
    res = drbd.agent("start")
    assert rc(res) == 0, res.stderr
    assert drbd.role() == "Primary"
    assert drbd.promotions() == ["fake-drbdsetup-84 primary 0"]
    assert rc(drbd.agent("start")) == 0
    assert len(drbd.promotions()) == 1, "a started resource is not promoted again"
    mon = drbd.agent("monitor")
    assert rc(mon) == 0
    assert "role Primary/Secondary, connection Connected, disk UpToDate/UpToDate" in mon.stderr


def test_stop_demotes_and_is_idempotent(drbd):
    drbd.set(role="Primary")
    assert rc(drbd.agent("stop")) == 0
    assert drbd.role() == "Secondary"
    assert rc(drbd.agent("stop")) == 0
    assert rc(drbd.agent("monitor")) == 7
    assert [c for c in drbd.calls() if "secondary" in c] == ["fake-drbdadm secondary r0"]


@pytest.mark.parametrize("disk,cstate", [("Outdated", "WFConnection"), ("Inconsistent", "SyncTarget"),
                                         ("Consistent", "WFConnection"), ("Diskless", "StandAlone"),
                                         ("Failed", "Connected")])
def test_start_refuses_data_that_is_not_uptodate(drbd, disk, cstate):
    drbd.set(disk=disk, cstate=cstate, peer_disk="Outdated" if disk == "Failed" else "UpToDate")
    res = drbd.agent("start")
    assert rc(res) == 1
    assert f"disk is {disk}" in res.stderr and "force_promote" in res.stderr
    assert drbd.role() == "Secondary"
    assert drbd.promotions() == [], "the agent decides before DRBD has to refuse"


def test_force_promote_promotes_outdated_with_force(drbd):
    drbd.set(disk="Outdated", cstate="StandAlone")
    res = drbd.agent("start", force_promote="true")
    assert rc(res) == 0, res.stderr
    assert drbd.role() == "Primary"
    assert drbd.promotions() == ["fake-drbdsetup-84 primary 0 --force"]
    assert "WARNING: forcing r0 to Primary although its disk is Outdated" in res.stderr


def test_force_promote_cannot_promote_diskless(drbd):
    drbd.set(disk="Diskless", cstate="StandAlone")
    res = drbd.agent("start", force_promote="yes")
    assert rc(res) == 1 and "force_promote cannot help" in res.stderr
    assert drbd.promotions() == []


def test_start_brings_a_down_resource_up_first(drbd):
    drbd.set(up="false")
    assert rc(drbd.agent("monitor")) == 7
    res = drbd.agent("start")
    assert rc(res) == 0, res.stderr
    calls = drbd.calls()
    assert "fake-drbdadm up r0" in calls
    assert calls.index("fake-drbdadm up r0") < calls.index("fake-drbdsetup-84 primary 0")
    assert drbd.role() == "Primary"


def test_start_waits_for_the_peer_before_judging_the_disk(drbd):
    # after `up` the disk is Consistent until the peer answers, 1 s later, and it turns out UpToDate
    drbd.set(up="false", disk="Consistent", cstate="WFConnection", connect_in="1.0", connect_disk="UpToDate")
    t0 = time.monotonic()
    with drbd.kernel():
        res = drbd.agent("start", wait_connect_s="5")
    elapsed = time.monotonic() - t0
    assert rc(res) == 0, res.stderr
    assert 1.0 <= elapsed < 5, elapsed
    assert drbd.promotions() == ["fake-drbdsetup-84 primary 0"], "no --force needed once the peer answered"


def test_start_gives_up_waiting_after_wait_connect_s(drbd):
    drbd.set(disk="Consistent", cstate="WFConnection")
    t0 = time.monotonic()
    res = drbd.agent("start", wait_connect_s="1")
    assert rc(res) == 1 and "disk is Consistent" in res.stderr
    assert time.monotonic() - t0 >= 1.0


def test_start_failing_up_says_why(drbd):
    drbd.set(up="false", attach_fails="true")
    res = drbd.agent("start")
    assert rc(res) == 1
    assert "Can not open backing device" in res.stderr and "still not up" in res.stderr


def test_start_refused_while_peer_is_primary(drbd):
    """A peer still connected as Primary that answers DRBD's pings (it runs): the agent asks DRBD to promote, which
    pings the peer and refuses a second Primary; after wait_peer_gone_s the agent refuses too, still Secondary."""
    drbd.set(peer_role="Primary")
    t0 = time.monotonic()
    res = drbd.agent("start", wait_peer_gone_s="1")
    assert rc(res) == 1
    assert time.monotonic() - t0 >= 1.0
    assert "waiting up to 1 s for DRBD to notice it is gone" in res.stderr
    assert "it pinged the peer and still refuses: " in res.stderr and "Multiple primaries" in res.stderr
    assert "refusing to promote r0: the peer is connected and Primary" in res.stderr
    assert drbd.promotions() == ["fake-drbdsetup-84 primary 0"] and drbd.role() == "Secondary"


def test_start_asks_drbd_at_once_so_it_notices_a_dead_primary_peer(drbd):
    """A Primary peer that died, still connected as far as DRBD knows: asking DRBD to promote makes it ping the
    peer, notice the silence within its ping-timeout and promote in the same request. The agent does not sit out
    DRBD's own ping interval (nor wait_peer_gone_s)."""
    drbd.set(peer_role="Primary", peer_dead="true")
    t0 = time.monotonic()
    res = drbd.agent("start", wait_peer_gone_s="30")
    assert rc(res) == 0, res.stderr
    assert time.monotonic() - t0 < 10
    assert "r0 is Primary: role Primary/Unknown, connection WFConnection" in res.stderr, res.stderr
    assert drbd.promotions() == ["fake-drbdsetup-84 primary 0"] and drbd.role() == "Primary"


def test_drbd84_promotes_with_drbdsetup_84_or_else_drbdadm(drbd):
    """DRBD 8.4: each minor is promoted with drbdsetup-84 as drbdadm would (`drbdadm -d primary r0` prints
    `drbdsetup-84 primary 0`), saving drbdadm's start; without it (drbdsetup_84 empty, or none installed for auto)
    drbdadm promotes. The double refuses as the VM lab's drbdsetup-84 did, and the agent's own refusals stand."""
    drbd.set(peer_role="Primary")
    res = subprocess.run([str(FAKE_SETUP_84), "primary", "0"], env=drbd.env, capture_output=True, text=True,
                         check=False)
    assert (res.returncode, res.stderr) == (11, (FIX / "drbdsetup-84-primary-peer-primary.stderr").read_text())
    drbd.set(cstate="WFConnection", peer_role="Unknown", disk="Outdated")
    res = drbd.agent("start", force_promote="true")
    assert rc(res) == 0, res.stderr
    assert drbd.promotions()[-1] == "fake-drbdsetup-84 primary 0 --force"
    drbd.fake("secondary", "r0")
    res = drbd.agent("start", drbdsetup_84="")
    assert rc(res) == 0, res.stderr
    assert drbd.promotions()[-1] == "fake-drbdadm primary r0"
    drbd.fake("secondary", "r0")
    drbd.set(cstate="Connected", peer_role="Primary")  # alive, and no time given to notice it is gone
    res = drbd.agent("start", wait_peer_gone_s="0")
    assert rc(res) == 1 and "the peer is connected and Primary" in res.stderr, res.stderr
    drbd.set(cstate="WFConnection", peer_role="Unknown", disk="Inconsistent")
    res = drbd.agent("start", force_promote="false")
    assert rc(res) == 1 and "not UpToDate" in res.stderr, res.stderr


def test_start_does_not_ask_drbd_to_promote_a_disk_it_would_refuse(drbd):
    """While the peer is still Primary, only an UpToDate disk is offered to DRBD (force_promote is applied after
    the peer is gone, by the usual checks): a Consistent disk waits and is refused without a promotion."""
    drbd.set(peer_role="Primary", peer_dead="true", disk="Consistent")
    res = drbd.agent("start", wait_peer_gone_s="1", force_promote="true")
    assert rc(res) == 1 and "the peer is connected and Primary" in res.stderr, res.stderr
    assert drbd.promotions() == [] and drbd.role() == "Secondary"


def test_stop_of_a_mounted_device_fails_with_a_sentence(drbd):
    drbd.set(role="Primary", open="true")
    res = drbd.agent("stop")
    assert rc(res) == 1
    assert "held open (mounted or in use)" in res.stderr and "Filesystem" in res.stderr
    assert drbd.role() == "Primary"


def test_resource_unknown_to_this_host(drbd):
    res = drbd.agent("start", resource="r9")
    assert rc(res) == 6 and "not defined in your config" in res.stderr
    assert rc(drbd.agent("monitor", resource="r9")) == 7
    assert rc(drbd.agent("stop", resource="r9")) == 0


def test_without_the_kernel_module(drbd):
    missing = str(drbd.state / "no-such-proc")
    assert rc(drbd.agent("monitor", proc_drbd=missing)) == 7
    assert rc(drbd.agent("stop", proc_drbd=missing)) == 0
    res = drbd.agent("start", proc_drbd=missing)
    assert rc(res) == 5 and "modprobe drbd" in res.stderr
    assert rc(drbd.agent("validate-all", proc_drbd=missing)) == 5


def test_without_drbdadm(drbd):
    res = drbd.agent("start", drbdadm=str(drbd.state / "no-drbdadm"), drbdsetup_84="")
    assert rc(res) == 5 and "install drbd-utils" in res.stderr
    assert rc(drbd.agent("validate-all", drbdadm="/nonexistent/drbdadm")) == 5


@pytest.mark.parametrize("param,value", [("resource", "-r0"), ("resource", "r0;reboot"),
                                         ("force_promote", "maybe"), ("wait_connect_s", "-1"),
                                         ("wait_connect_s", "soon"), ("wait_connect_s", "nan"),
                                         ("wait_peer_gone_s", "-5"), ("wait_peer_gone_s", "later")])
def test_bad_parameters_are_not_configured(drbd, param, value):
    res = drbd.agent("validate-all", **{param: value})
    assert rc(res) == 6 and param in res.stderr


def test_missing_resource_parameter(drbd):
    env_params = dict(drbd.params)
    del env_params["resource"]
    drbd.params = env_params
    assert rc(drbd.agent("start")) == 6
    assert rc(drbd.agent("monitor")) == 7


# ------------------------------------------------------------------ DRBD 9
def test_drbd9_reads_events2(drbd):
    drbd.fake("fake-set-global", "generation=9")
    assert rc(drbd.agent("monitor")) == 7
    res = drbd.agent("start")
    assert rc(res) == 0, res.stderr
    assert "(DRBD 9)" in res.stderr
    assert any(c.startswith("fake-drbdsetup events2 --now r0") for c in drbd.calls())
    assert not any(c.startswith("fake-drbdadm role") for c in drbd.calls())
    assert rc(drbd.agent("monitor")) == 0
    assert rc(drbd.agent("stop")) == 0
    assert rc(drbd.agent("monitor")) == 7


def test_drbd9_falls_back_to_status_json(drbd):
    drbd.fake("fake-set-global", "generation=9", "events2_fails=true")
    drbd.set(disk="Outdated", cstate="WFConnection")
    res = drbd.agent("start")
    assert rc(res) == 1 and "disk is Outdated" in res.stderr
    assert any(c.startswith("fake-drbdsetup status --json r0") for c in drbd.calls())
    drbd.set(disk="UpToDate", cstate="Connected")
    assert rc(drbd.agent("start")) == 0
    assert rc(drbd.agent("monitor")) == 0


def test_drbd9_down_resource_is_brought_up(drbd):
    drbd.fake("fake-set-global", "generation=9")
    drbd.set(up="false")
    assert rc(drbd.agent("monitor")) == 7
    assert rc(drbd.agent("stop")) == 0
    res = drbd.agent("start")
    assert rc(res) == 0, res.stderr
    assert "fake-drbdadm up r0" in drbd.calls()


def test_drbd9_held_open(drbd):
    drbd.fake("fake-set-global", "generation=9")
    drbd.set(role="Primary", open="true")
    res = drbd.agent("stop")
    assert rc(res) == 1 and "held open" in res.stderr and "opened by mount" in res.stderr
