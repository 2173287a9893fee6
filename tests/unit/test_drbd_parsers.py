"""The DRBD parsers and the promotion decision, on literal command outputs (tests/fixtures/drbd/README.md says where
each one comes from)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hastore.agentlib import drbd as d

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "drbd"


def fx(name: str) -> str:
    return (FIX / name).read_text()


# ------------------------------------------------------------------ /proc/drbd
def test_proc_84_connected_primary():
    p = d.parse_proc_drbd(fx("proc_drbd-84-connected-primary.txt"))
    assert p.version == (8, 4)
    assert p.generation == "8.4"
    assert p.minors == {0: ("Connected", "Primary", "Secondary", "UpToDate", "UpToDate")}


def test_proc_84_two_minors_one_standalone_without_protocol_letter():
    p = d.parse_proc_drbd(fx("proc_drbd-84-two-minors-degraded.txt"))
    assert p.minors[0] == ("WFConnection", "Primary", "Unknown", "UpToDate", "DUnknown")
    assert p.minors[1] == ("StandAlone", "Secondary", "Unknown", "UpToDate", "DUnknown")


def test_proc_84_inconsistent_suspended():
    p = d.parse_proc_drbd(fx("proc_drbd-84-inconsistent.txt"))
    assert p.minors[0] == ("WFConnection", "Secondary", "Unknown", "Inconsistent", "Outdated")


def test_proc_84_without_resources_is_still_84():
    p = d.parse_proc_drbd(fx("proc_drbd-84-no-resources.txt"))
    assert p.minors == {} and p.generation == "8.4"


def test_proc_9_shows_only_the_version():
    p = d.parse_proc_drbd(fx("proc_drbd-9.txt"))
    assert p.version == (9, 0) and p.minors == {} and p.generation == "9"


@pytest.mark.parametrize("text", ["", "garbage\n", "version: unknown\n"])
def test_proc_unrecognised_has_no_generation(text):
    assert d.parse_proc_drbd(text).generation is None


def test_proc_cs_lines_without_version_mean_84():
    assert d.parse_proc_drbd(" 0: cs:Connected ro:Primary/Secondary ds:UpToDate/UpToDate C r-----\n").generation \
        == "8.4"


def test_proc_bad_pair_raises():
    with pytest.raises(d.ParseError, match="LOCAL/PEER"):
        d.parse_proc_drbd(" 0: cs:Connected ro:Primary ds:UpToDate/UpToDate C r-----\n")


# ------------------------------------------------------------------ drbdadm role / cstate / dstate (8.4)
def test_role_cstate_dstate_84():
    st = d.state_84("r0", fx("drbdadm-84-role-primary.txt"), fx("drbdadm-84-cstate-connected.txt"),
                    fx("drbdadm-84-dstate-uptodate.txt"))
    assert st == d.DrbdState("r0", "Primary", "Secondary", "Connected", "UpToDate", "UpToDate", "8.4")
    assert st.connected
    assert st.describe() == ("role Primary/Secondary, connection Connected, disk UpToDate/UpToDate (DRBD 8.4)")


def test_secondary_alone_outdated():
    st = d.state_84("r0", fx("drbdadm-84-role-secondary-alone.txt"), fx("drbdadm-84-cstate-wfconnection.txt"),
                    fx("drbdadm-84-dstate-outdated.txt"))
    assert (st.role, st.peer_role, st.connection, st.disk, st.peer_disk) == \
        ("Secondary", "Unknown", "WFConnection", "Outdated", "DUnknown")
    assert not st.connected


def test_two_volumes_report_the_worst_disk_and_any_primary():
    st = d.state_84("r0", "Secondary/Secondary\nSecondary/Primary\n", "Connected\nConnected\n",
                    fx("drbdadm-84-dstate-two-volumes.txt"))
    assert (st.role, st.peer_role, st.disk, st.peer_disk) == ("Secondary", "Primary", "Inconsistent", "UpToDate")


GOOD = {"role": "Primary/Secondary\n", "cstate": "Connected\n", "dstate": "UpToDate/UpToDate\n"}


@pytest.mark.parametrize("what,text", [("role", ""), ("role", "Leader/Secondary\n"), ("role", "Primary\n"),
                                       ("dstate", "UpToDate\n"), ("dstate", "Fine/UpToDate\n"), ("cstate", "\n"),
                                       ("cstate", "Connected\nConnected\n")])
def test_bad_84_outputs_raise(what, text):
    with pytest.raises(d.ParseError):
        d.state_84("r0", *({**GOOD, what: text}[k] for k in ("role", "cstate", "dstate")))


# ------------------------------------------------------------------ DRBD 9: events2 --now, status --json
def test_events2_primary_connected():
    st = d.parse_events2(fx("events2-9-primary-connected.txt"), "r0")
    assert st == d.DrbdState("r0", "Primary", "Secondary", "Connected", "UpToDate", "UpToDate", "9")


def test_events2_secondary_outdated_connecting():
    st = d.parse_events2(fx("events2-9-secondary-outdated-connecting.txt"), "r0")
    assert (st.role, st.peer_role, st.connection, st.disk, st.peer_disk) == \
        ("Secondary", "Unknown", "Connecting", "Outdated", "DUnknown")
    assert not st.connected


def test_events2_resource_not_configured():
    assert d.parse_events2(fx("events2-9-not-configured.txt"), "r0") is None


def test_events2_picks_the_named_resource_and_worst_volume():
    text = fx("events2-9-two-resources-statistics.txt")
    r0 = d.parse_events2(text, "r0")
    assert (r0.role, r0.peer_role, r0.connection, r0.disk, r0.peer_disk) == \
        ("Secondary", "Primary", "Connected", "Inconsistent", "UpToDate")
    r1 = d.parse_events2(text, "r1")
    assert (r1.role, r1.connection, r1.disk, r1.peer_disk) == ("Primary", "StandAlone", "UpToDate", "DUnknown")
    assert d.parse_events2(text, "r2") is None


def test_events2_without_end_marker_raises():
    with pytest.raises(d.ParseError, match="exists -"):
        d.parse_events2(fx("events2-9-primary-connected.txt").replace("exists -\n", ""), "r0")


def test_status_json_secondary_connected():
    st = d.parse_status_json(fx("status-json-9-secondary-connected.json"), "r0")
    assert st == d.DrbdState("r0", "Secondary", "Primary", "Connected", "UpToDate", "UpToDate", "9")


def test_status_json_inconsistent_connecting():
    st = d.parse_status_json(fx("status-json-9-inconsistent-connecting.json"), "r0")
    assert (st.connection, st.disk, st.peer_disk, st.peer_role) == \
        ("Connecting", "Inconsistent", "DUnknown", "Unknown")
    assert d.parse_status_json(fx("status-json-9-inconsistent-connecting.json"), "r1") is None


@pytest.mark.parametrize("text", ["not json", '{"name": "r0"}'])
def test_status_json_garbage_raises(text):
    with pytest.raises(d.ParseError):
        d.parse_status_json(text, "r0")


def test_status_json_and_events2_agree_on_a_fake_free_state():
    """Both DRBD 9 readers reduce the same facts to the same state."""
    ev = d.parse_events2(fx("events2-9-secondary-outdated-connecting.txt"), "r0")
    js = d.parse_status_json(
        '[{"name":"r0","role":"Secondary","devices":[{"volume":0,"disk-state":"Outdated"}],'
        '"connections":[{"name":"bravo","connection-state":"Connecting","peer-role":"Unknown",'
        '"peer_devices":[{"volume":0,"peer-disk-state":"DUnknown"}]}]}]', "r0")
    assert ev == js


# ------------------------------------------------------------------ decisions
def state(disk="UpToDate", role="Secondary", connection="Connected"):
    return d.DrbdState("r0", role, "Secondary", connection, disk, "UpToDate", "8.4")


def test_uptodate_is_promoted_and_primary_needs_nothing():
    assert d.promotion_refusal(state(), force=False) is None
    assert d.promotion_refusal(state(disk="Outdated", role="Primary"), force=False) is None


@pytest.mark.parametrize("disk,hint", [("Outdated", "peer has newer data"), ("Inconsistent", "resync"),
                                       ("Consistent", "connect to the peer"), ("Diskless", "attach"),
                                       ("Failed", "I/O errors")])
def test_other_disks_are_refused_with_a_sentence(disk, hint):
    why = d.promotion_refusal(state(disk=disk), force=False)
    assert why is not None
    assert f"disk is {disk}" in why and hint in why and "force_promote=true" in why


@pytest.mark.parametrize("disk", ["Outdated", "Inconsistent", "Consistent"])
def test_force_promotes_stale_data(disk):
    assert d.promotion_refusal(state(disk=disk), force=True) is None


@pytest.mark.parametrize("disk", ["Diskless", "Failed"])
def test_force_cannot_promote_without_data(disk):
    why = d.promotion_refusal(state(disk=disk), force=True)
    assert why is not None and "force_promote cannot help" in why


def test_error_texts_are_recognised():
    assert d.says_held_open(fx("drbdadm-84-secondary-held-open.stderr"))
    assert not d.says_held_open(fx("drbdadm-84-primary-outdated.stderr"))
    assert d.says_not_up(fx("drbdadm-84-role-not-up.stderr"))
    assert not d.says_not_up(fx("drbdadm-84-up-already-up.stderr"))
    assert d.says_not_defined(fx("drbdadm-not-defined.stderr"))
    assert "no access to UpToDate data" in d.explain_failure(fx("drbdadm-84-primary-outdated.stderr"))
    assert "peer is Primary" in d.explain_failure(fx("drbdadm-84-primary-peer-primary.stderr"))
    assert d.explain_failure("") == "no message"


def test_state_from_proc_aggregates_volumes_like_drbdadm_and_sees_a_minor_that_is_not_up():
    proc = d.parse_proc_drbd((FIX / "proc_drbd-84-two-minors-degraded.txt").read_text())
    both = d.state_from_proc("r0", proc, [0, 1])
    # any Primary volume makes the resource Primary; the first volume's connection; the worst disk
    assert (both.role, both.peer_role, both.connection, both.disk, both.peer_disk) == \
        ("Primary", "Unknown", "WFConnection", "UpToDate", "DUnknown")
    assert d.state_from_proc("r0", proc, [1]).connection == "StandAlone"
    assert d.state_from_proc("r0", proc, [0, 2]) is None  # minor 2 is not configured: the resource is not up
    assert d.state_from_proc("r0", proc, []) is None
    assert d.state_from_proc("r0", d.parse_proc_drbd((FIX / "proc_drbd-84-no-resources.txt").read_text()), [0]) is None


def test_sh_minor_output():
    assert d.parse_minors("0\n") == [0]
    assert d.parse_minors("0\n1\n") == [0, 1]
    for bad in ("", "r0\n", "0 1\n"):
        with pytest.raises(d.ParseError):
            d.parse_minors(bad)


def test_an_unconfigured_minor_is_a_diskless_standalone_secondary():
    """drbd_proc.c prints only `cs:Unconfigured` for a minor that is Secondary, StandAlone and Diskless (captured in the
    VM lab after `drbdadm detach` and `disconnect`; drbdadm role|cstate|dstate then print `Unconfigured` too)."""
    proc = d.parse_proc_drbd(fx("proc_drbd-84-unconfigured.txt"))
    st = d.state_from_proc("r1", proc, [1])
    assert (st.role, st.peer_role, st.connection, st.disk, st.peer_disk) == \
        ("Secondary", "Unknown", "StandAlone", "Diskless", "DUnknown")
    assert "no local backing disk" in d.promotion_refusal(st, force=False)
    assert d.state_from_proc("r0", proc, [0]).role == "Primary"  # the other minor, a full line, beside it
