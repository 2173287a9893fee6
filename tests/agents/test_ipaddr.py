"""agents/IPaddr in the namespace lab: add/remove, idempotence, announcements seen by the LAN, errors."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from ocftester import ocf_tester

from hastore.agentlib import net
from hastore.agentlib.ocf import AgentError

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
AGENT = REPO / "agents" / "IPaddr"
VIPS = {4: ("10.90.0.100", 24), 6: ("fd90::100", 64)}


def ipaddr(node, action: str, **params: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OCF_")}
    env["PYTHONPATH"] = str(REPO)
    env["OCF_RESOURCE_INSTANCE"] = "vip"
    env.update({f"OCF_RESKEY_{k}": v for k, v in params.items()})
    return node.run([str(AGENT), action], env=env, timeout=30)


def addrs(node, dev: str) -> list[dict]:
    out = node.run(["ip", "-j", "addr", "show", "dev", dev], check=True).stdout
    return json.loads(out)[0]["addr_info"]


def holding(node, dev: str, vip: str) -> list[dict]:
    return [a for a in addrs(node, dev) if a["local"] == vip]


def mac(node) -> str:
    out = node.run(["ip", "-j", "link", "show", "dev", node.lan_if], check=True).stdout
    return json.loads(out)[0]["address"]


def lan_neighbour(lab, vip: str) -> dict | None:
    out = lab.lan_run(["ip", "-j", "neigh", "show", vip, "dev", lab.bridge], check=True).stdout
    entries = json.loads(out or "[]")
    return entries[0] if entries else None


# ------------------------------------------------------------------ pure parsing
def test_ipaddr_shorthand_parsing():
    spec = net.parse_vip("10.0.0.100/24/eth0/10.0.0.255")
    assert (str(spec.address), spec.prefixlen, spec.nic, str(spec.broadcast)) == \
        ("10.0.0.100", 24, "eth0", "10.0.0.255")
    assert net.parse_vip("10.0.0.100/255.255.255.0").prefixlen == 24
    assert net.parse_vip("fd00::5/64/eth1").prefixlen == 64
    eth01 = net.parse_vip("10.0.0.100", nic="eth0:1")
    assert (eth01.nic, eth01.label_for("eth0")) == ("eth0", "eth0:1")
    assert net.parse_vip("10.0.0.100", nic="eth0", label="vip").label_for("eth0") == "eth0:vip"
    assert net.parse_vip("10.0.0.100/24", cidr_netmask="24").prefixlen == 24
    for bad, kw in [("10.0.0.300", {}), ("10.0.0.1/33", {}), ("10.0.0.1/24", {"cidr_netmask": "16"}),
                    ("fd00::1//eth0/10.0.0.255", {}), ("224.0.0.5", {}), ("a/b/c/d/e", {}),
                    ("10.0.0.1", {"nic": "eth0", "label": "eth1:0"})]:
        with pytest.raises(AgentError) as err:
            net.parse_vip(bad, **kw)
        assert err.value.code == 6, bad


def test_ipaddr_packets():
    m = bytes.fromhex("020000000001")
    frame = net.arp_frame(m, ipaddress.IPv4Address("10.0.0.9"), reply=False)
    assert frame[:6] == b"\xff" * 6 and frame[12:14] == b"\x08\x06" and len(frame) == 42
    assert frame[28:32] == frame[38:42] == bytes([10, 0, 0, 9])          # sender = target
    na = net.neighbour_advert(m, ipaddress.IPv6Address("fd00::9"))
    assert na[0] == 136 and na[4] & 0x20 and not na[4] & 0x40 and na[-6:] == m   # O set, S clear


# ------------------------------------------------------------------ in the lab
@pytest.mark.parametrize("version", [4, 6])
def test_ipaddr_start_stop_idempotent(lab, version):
    alpha = lab.nodes["alpha"]
    vip, plen = VIPS[version]
    params = {"ip": vip, "cidr_netmask": str(plen), "nic": alpha.lan_if}
    assert ipaddr(alpha, "monitor", **params).returncode == 7
    res = ipaddr(alpha, "start", **params)
    assert res.returncode == 0, res.stderr
    [held] = holding(alpha, alpha.lan_if, vip)
    assert held["prefixlen"] == plen
    if version == 4:
        assert held["broadcast"] == "10.90.0.255"
    assert ipaddr(alpha, "monitor", **params).returncode == 0
    again = ipaddr(alpha, "start", **params)
    assert again.returncode == 0, again.stderr
    assert "already on" in again.stderr
    assert len(holding(alpha, alpha.lan_if, vip)) == 1
    res = ipaddr(alpha, "stop", **params)
    assert res.returncode == 0, res.stderr
    assert holding(alpha, alpha.lan_if, vip) == []
    assert ipaddr(alpha, "monitor", **params).returncode == 7
    res = ipaddr(alpha, "stop", **params)
    assert res.returncode == 0 and "nothing to stop" in res.stderr


@pytest.mark.parametrize("version", [4, 6])
def test_ipaddr_announcement_moves_lan_neighbour(lab, version):
    alpha, bravo = lab.nodes["alpha"], lab.nodes["bravo"]
    vip, _ = VIPS[version]
    res = ipaddr(alpha, "start", ip=vip)
    assert res.returncode == 0, res.stderr
    # The LAN learns alpha's MAC for the VIP the ordinary way.
    assert lab.lan_run(["ping", "-n", "-c", "1", "-W", "2", vip]).returncode == 0
    before = lan_neighbour(lab, vip)
    assert before and before["lladdr"] == mac(alpha), before
    assert ipaddr(alpha, "stop", ip=vip).returncode == 0
    # Control: moved without announcements, the LAN keeps pointing at alpha.
    assert ipaddr(bravo, "start", ip=vip, arp_count="0").returncode == 0
    assert lan_neighbour(lab, vip)["lladdr"] == mac(alpha)
    assert ipaddr(bravo, "stop", ip=vip).returncode == 0
    res = ipaddr(bravo, "start", ip=vip)
    assert res.returncode == 0, res.stderr
    kind = "gratuitous ARP" if version == 4 else "neighbour advertisements"
    assert "sent the first round of" in res.stderr and "4 more follow every 200 ms" in res.stderr
    assert kind in res.stderr
    # No traffic from the LAN side since the move: only the announcements can have updated it.
    after = lan_neighbour(lab, vip)
    assert after and after["lladdr"] == mac(bravo), (after, mac(alpha), mac(bravo))
    assert ipaddr(bravo, "stop", ip=vip).returncode == 0


def test_ipaddr_shorthand_label_and_autodetected_nic(lab):
    alpha = lab.nodes["alpha"]
    short = f"10.90.0.101/24/{alpha.lan_if}/10.90.0.255"
    res = ipaddr(alpha, "start", ip=short, label="vip")
    assert res.returncode == 0, res.stderr
    [held] = holding(alpha, alpha.lan_if, "10.90.0.101")
    assert (held["prefixlen"], held["broadcast"], held["label"]) == \
        (24, "10.90.0.255", f"{alpha.lan_if}:vip")
    assert ipaddr(alpha, "monitor", ip=short).returncode == 0
    assert ipaddr(alpha, "stop", ip=short).returncode == 0
    # No nic, no netmask: the interface and prefix of the subnet that contains the address.
    for vip, dev, plen in (("10.90.0.102", alpha.lan_if, 24), ("10.91.0.102", alpha.hb_if, 24),
                           ("fd91::102", alpha.hb_if, 64)):
        res = ipaddr(alpha, "start", ip=vip, arp_count="1")
        assert res.returncode == 0, res.stderr
        assert [a["prefixlen"] for a in holding(alpha, dev, vip)] == [plen]
        assert ipaddr(alpha, "monitor", ip=vip).returncode == 0
        assert ipaddr(alpha, "stop", ip=vip).returncode == 0
        assert holding(alpha, dev, vip) == []


def test_ipaddr_start_is_quick_with_default_burst(lab):
    alpha = lab.nodes["alpha"]
    t0 = time.monotonic()
    res = ipaddr(alpha, "start", ip="10.90.0.103")
    took = time.monotonic() - t0
    try:
        assert res.returncode == 0, res.stderr
        assert took < 3.0, f"start took {took:.1f} s"       # burst: 4 intervals of 200 ms
    finally:
        ipaddr(alpha, "stop", ip="10.90.0.103")


def test_ipaddr_configuration_errors(lab):
    alpha = lab.nodes["alpha"]
    for action in ("validate-all", "start"):
        res = ipaddr(alpha, action, ip="10.90.0.300")
        assert res.returncode in (2, 6) and "not an IPv4 or IPv6 address" in res.stderr
        res = ipaddr(alpha, action, ip="10.90.0.104", nic="nosuch0")
        assert res.returncode in (5, 6) and "interface nosuch0 does not exist" in res.stderr
        res = ipaddr(alpha, action, ip="192.0.2.104")      # no subnet of the node contains it
        assert res.returncode == 6 and "set nic" in res.stderr
        res = ipaddr(alpha, action, ip="10.90.0.104", arp_count="many")
        assert res.returncode == 6 and "arp_count" in res.stderr
        res = ipaddr(alpha, action, ip="10.90.0.104", label="eth9:1")    # nic found: alpha's LAN
        assert res.returncode == 6 and f"does not name interface {alpha.lan_if}" in res.stderr
    res = ipaddr(alpha, "start")
    assert res.returncode == 6 and "ip" in res.stderr
    # Probes and stops of what cannot be here answer "not running" / "stopped", not an error.
    assert ipaddr(alpha, "monitor", ip="10.90.0.104", nic="nosuch0").returncode == 7
    assert ipaddr(alpha, "stop", ip="10.90.0.104", nic="nosuch0").returncode == 0
    assert ipaddr(alpha, "validate-all", ip="10.90.0.104").returncode == 0


@pytest.mark.parametrize("version", [4, 6])
def test_ipaddr_passes_ocf_tester(lab, version):
    alpha = lab.nodes["alpha"]
    vip = {4: "10.90.0.110", 6: "fd90::110"}[version]
    try:
        ocf_tester(AGENT, {"ip": vip, "nic": alpha.lan_if, "arp_count": "2"},
                   prefix=alpha.command([]))
    finally:
        ipaddr(alpha, "stop", ip=vip)
    assert holding(alpha, alpha.lan_if, vip) == []


ARP_LISTENER = """
import socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
s.settimeout(0.1)
vip, end, n = socket.inet_aton(sys.argv[1]), time.monotonic() + float(sys.argv[2]), 0
print("ready", flush=True)
while time.monotonic() < end:
    try:
        f = s.recv(100)
    except TimeoutError:
        continue
    n += f[28:32] == vip and f[38:42] == vip  # gratuitous: sender and target are the VIP
print(n, flush=True)
"""


def count_announcements(lab, vip: str, seconds: float, action) -> int:
    """Gratuitous ARP frames for vip seen on the LAN while `action()` runs and for `seconds` in all."""
    proc = lab.lan_popen(["python3", "-c", ARP_LISTENER, vip, str(seconds)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        action()
        return int(proc.communicate(timeout=seconds + 10)[0].strip())
    finally:
        proc.kill()


def test_ipaddr_burst_goes_on_in_the_background_and_ends_with_a_stop(lab):
    bravo = lab.nodes["bravo"]
    vip, _ = VIPS[4]
    started = []
    n = count_announcements(lab, vip, 2.0, lambda: started.append(ipaddr(bravo, "start", ip=vip, arp_interval_ms="100")))
    assert started[0].returncode == 0, started[0].stderr
    assert n == 10, f"5 rounds of request + reply expected, saw {n} frames"  # 1 in start, 4 in the background
    assert ipaddr(bravo, "stop", ip=vip).returncode == 0

    def start_then_stop():
        assert ipaddr(bravo, "start", ip=vip, arp_interval_ms="500").returncode == 0
        assert ipaddr(bravo, "stop", ip=vip).returncode == 0
    n = count_announcements(lab, vip, 2.5, start_then_stop)
    assert 2 <= n <= 4, f"after the stop the burst ends (the first round, at most one more): saw {n} frames"

    res = ipaddr(bravo, "start", ip=vip, arp_interval_ms="10", arp_bg="false")
    assert res.returncode == 0 and "sent 5 rounds of gratuitous ARP" in res.stderr, res.stderr
    assert ipaddr(bravo, "stop", ip=vip).returncode == 0
    assert ipaddr(bravo, "validate-all", ip=vip, arp_bg="maybe").returncode == 6
