"""hastore's DRBD parsers on outputs of a real DRBD 8.4.11 module driven by drbd-utils 9.22, captured by tests/vm in
two qemu guests (tests/fixtures/drbd/real/README.md says how)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hastore.agentlib import drbd as d

REAL = Path(__file__).resolve().parents[1] / "fixtures" / "drbd" / "real"

# state -> (role, peer role, connection, disk, peer disk) as every command must agree
STATES = {
    "secondary-inconsistent": ("Secondary", "Secondary", "Connected", "Inconsistent", "Inconsistent"),
    "syncsource": ("Primary", "Secondary", "SyncSource", "UpToDate", "Inconsistent"),
    "synctarget": ("Secondary", "Primary", "SyncTarget", "Inconsistent", "UpToDate"),
    "secondary-uptodate": ("Secondary", "Secondary", "Connected", "UpToDate", "UpToDate"),
    "primary-uptodate": ("Primary", "Secondary", "Connected", "UpToDate", "UpToDate"),
    "secondary-peer-primary": ("Secondary", "Primary", "Connected", "UpToDate", "UpToDate"),
    "outdated-standalone": ("Secondary", "Unknown", "StandAlone", "Outdated", "DUnknown"),
    "wfconnection": ("Secondary", "Unknown", "WFConnection", "UpToDate", "DUnknown"),
}


def fx(state: str, cmd: str) -> str:
    return (REAL / f"{state}-{cmd}.txt").read_text()


@pytest.mark.parametrize("state", sorted(STATES))
def test_drbdadm_role_cstate_dstate(state):
    role, peer_role, cs, disk, peer_disk = STATES[state]
    st = d.state_84("r0", fx(state, "role"), fx(state, "cstate"), fx(state, "dstate"))
    assert (st.role, st.peer_role, st.connection, st.disk, st.peer_disk) == (role, peer_role, cs, disk, peer_disk)
    assert st.generation == "8.4"


@pytest.mark.parametrize("state", sorted(STATES))
def test_proc_drbd(state):
    role, peer_role, cs, disk, peer_disk = STATES[state]
    p = d.parse_proc_drbd(fx(state, "proc_drbd"))
    assert p.version == (8, 4) and p.generation == "8.4"
    assert p.minors[0] == (cs, role, peer_role, disk, peer_disk)  # minor 1 is the NFS example's r1, where it is up


@pytest.mark.parametrize("state", sorted(STATES))
def test_the_state_from_proc_drbd_is_what_drbdadm_says(state):
    """What the agent reads for 8.4 (/proc/drbd and the minor from `drbdadm sh-minor`) against what the three drbdadm
    commands said in the same state."""
    minors = d.parse_minors(fx(state, "sh_minor"))
    assert minors == [0]
    from_proc = d.state_from_proc("r0", d.parse_proc_drbd(fx(state, "proc_drbd")), minors)
    assert from_proc == d.state_84("r0", fx(state, "role"), fx(state, "cstate"), fx(state, "dstate"))


@pytest.mark.parametrize("state", sorted(STATES))
def test_events2_of_drbd_utils_9_on_the_84_module(state):
    """drbd-utils 9 answers `drbdsetup events2 --now` for the 8.4 module too, in DRBD 9's vocabulary: the connection
    is Connected while the replication (SyncSource...) is on the peer-device line, and a peer that is gone has no
    connection line at all."""
    role, peer_role, cs, disk, peer_disk = STATES[state]
    st = d.parse_events2(fx(state, "events2"), "r0")
    assert st is not None
    assert (st.role, st.disk) == (role, disk)
    if cs in ("StandAlone", "WFConnection"):
        assert st.peer_disk == "DUnknown" and not st.connected
    else:
        assert (st.peer_role, st.peer_disk) == (peer_role, peer_disk)
        assert st.connection == "Connected" and st.connected


def test_promotion_decision_on_real_states():
    def state(name):
        return d.state_84("r0", fx(name, "role"), fx(name, "cstate"), fx(name, "dstate"))
    assert d.promotion_refusal(state("secondary-uptodate"), force=False) is None
    assert d.promotion_refusal(state("wfconnection"), force=False) is None
    assert "Outdated" in d.promotion_refusal(state("outdated-standalone"), force=False)
    assert "Inconsistent" in d.promotion_refusal(state("synctarget"), force=False)
    assert "Inconsistent" in d.promotion_refusal(state("secondary-inconsistent"), force=False)


# The DRBD test double (tests/fixtures/drbd/fake-drbdadm) prints the hand-written fixtures: they must be exactly what
# real DRBD 8.4 printed in the VM lab for the same state, or the agent tests would test against a fiction.
SAME = [("drbdadm-84-role-primary.txt", "primary-uptodate-role.txt"),
        ("drbdadm-84-role-secondary-alone.txt", "wfconnection-role.txt"),
        ("drbdadm-84-cstate-connected.txt", "primary-uptodate-cstate.txt"),
        ("drbdadm-84-cstate-wfconnection.txt", "wfconnection-cstate.txt"),
        ("drbdadm-84-dstate-uptodate.txt", "primary-uptodate-dstate.txt"),
        ("drbdadm-84-dstate-outdated.txt", "outdated-standalone-dstate.txt")]


@pytest.mark.parametrize("double,real", SAME)
def test_the_test_double_prints_what_real_drbd_printed(double, real):
    base = Path(__file__).resolve().parents[1] / "fixtures" / "drbd"
    assert (base / double).read_text() == (REAL / real).read_text()


def test_the_double_s_proc_drbd_has_the_real_module_s_version_line():
    base = Path(__file__).resolve().parents[1] / "fixtures" / "drbd"
    real = (REAL / "primary-uptodate-proc_drbd.txt").read_text().splitlines()[0]
    for f in ("proc_drbd-84-connected-primary.txt", "proc_drbd-84-inconsistent.txt", "proc_drbd-84-no-resources.txt"):
        assert (base / f).read_text().splitlines()[0] == real, f
