"""Every agent in agents/ prints OCF 1.1 meta-data that is valid against resource-agents' ra-api-1.dtd and
declares the parameters it reads."""

import os
import subprocess
from pathlib import Path
from xml.dom import minidom

import pytest

REPO = Path(__file__).resolve().parents[2]
AGENTS = REPO / "agents"
DTD_DIR = "/usr/share/resource-agents"
PARAMS = {
    "IPaddr": {"ip", "cidr_netmask", "nic", "label", "broadcast", "arp_count", "arp_interval_ms"},
    "Filesystem": {"device", "directory", "fstype", "options", "fsck", "force_unmount"},
    "mysql": {"datadir", "binary", "socket", "pid", "port", "bind_address", "config", "additional_parameters",
              "test_query", "initialize"},
    "nfsserver": {"exports", "shared_dir", "state_dir", "threads"},
    "drbd": {"resource"},
    "disklock": {"device", "lease_ms"},
}


@pytest.mark.parametrize("agent", sorted(p.name for p in AGENTS.iterdir() if os.access(p, os.X_OK)))
def test_meta_data_is_valid_ocf(agent):
    r = subprocess.run([str(AGENTS / agent), "meta-data"], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    lint = subprocess.run(["xmllint", "--noout", "--valid", "-"], input=r.stdout, capture_output=True, text=True,
                          cwd=DTD_DIR)
    assert lint.returncode == 0, lint.stderr
    doc = minidom.parseString(r.stdout)
    names = {p.getAttribute("name") for p in doc.getElementsByTagName("parameter")}
    assert PARAMS[agent] <= names, f"{agent} does not declare {sorted(PARAMS[agent] - names)}"
    actions = {a.getAttribute("name") for a in doc.getElementsByTagName("action")}
    assert {"start", "stop", "monitor", "meta-data", "validate-all"} <= actions


def test_every_agent_is_checked():
    assert {p.name for p in AGENTS.iterdir()} == set(PARAMS)
