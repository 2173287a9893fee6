"""hastore drives Debian's real resource agents (package resource-agents): ocf:heartbeat:Dummy and IPaddr2,
in a group on two daemons in the namespace lab; a planned stop moves the group, the VIP answers on the peer."""

import json
import signal
import time
from pathlib import Path

import pytest

from hastore.lab.pair import Pair, PairTiming, peer_alive

pytestmark = pytest.mark.root

OCF = Path("/usr/lib/ocf/resource.d/heartbeat")
VIP = "10.90.0.100"
GROUPS = f"""
[[groups]]
name = "web"
preferred_node = "alpha"
[[groups.resources]]
agent = "ocf:heartbeat:Dummy"
monitor_interval = "1s"
[[groups.resources]]
agent = "ocf:heartbeat:IPaddr2"
params = {{ ip = "{VIP}", cidr_netmask = "24" }}
monitor_interval = "1s"
"""


@pytest.fixture
def pair(lab):
    for agent in ("Dummy", "IPaddr2"):
        assert (OCF / agent).exists(), f"Debian's resource-agents is not installed ({OCF / agent} missing)"
    with Pair(lab, PairTiming(), groups_toml=GROUPS) as p:
        p.start_all()
        for me, peer in (("alpha", "bravo"), ("bravo", "alpha")):
            p.wait_for(me, peer_alive(peer), timeout=15)
        yield p


def has_vip(pair, node) -> bool:
    out = pair.lab.nodes[node].run(["ip", "-o", "addr", "show"]).stdout
    return f" {VIP}/24 " in out


def group(status):
    return status["groups"]["web"]


def test_debian_dummy_and_ipaddr2_run_on_the_preferred_node_and_move_on_planned_stop(pair):
    s = pair.wait_for("alpha", lambda s: group(s)["state"] == "started", timeout=20)
    assert [r["state"] for r in group(s)["resources"]] == ["started", "started"], json.dumps(s)
    assert has_vip(pair, "alpha") and not has_vip(pair, "bravo")
    r = pair.lab.lan_run(["ping", "-c", "1", "-W", "1", VIP])
    assert r.returncode == 0, r.stdout + r.stderr
    pair.signal("alpha", signal.SIGTERM)
    s = pair.wait_for("bravo", lambda s: group(s)["owner"] == "bravo" and group(s)["state"] == "started", timeout=20)
    assert pair.procs["alpha"].wait(10) == 0
    assert has_vip(pair, "bravo") and not has_vip(pair, "alpha")
    deadline = time.monotonic() + 5
    while pair.lab.lan_run(["ping", "-c", "1", "-W", "1", VIP]).returncode != 0:
        assert time.monotonic() < deadline, "the VIP does not answer on bravo"


def test_a_resource_removed_behind_hastores_back_is_restarted_in_place(pair):
    pair.wait_for("alpha", lambda s: group(s)["state"] == "started", timeout=20)
    r = pair.lab.nodes["alpha"].run(["ip", "addr", "del", f"{VIP}/24", "dev", pair.lab.nodes["alpha"].lan_if])
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 10
    while not has_vip(pair, "alpha"):
        assert time.monotonic() < deadline, "IPaddr2 was not restarted"
        time.sleep(0.1)
    reasons = [e.get("reason", "") for e in pair.events("alpha")]
    assert any("restart 1 of 3" in r for r in reasons), reasons[-5:]
    assert group(pair.status("alpha"))["owner"] == "alpha"
