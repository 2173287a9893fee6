"""What DRBD says about one resource, read from its own outputs: pure parsers and the promotion decision.

Nothing here runs a command or reads a file; agents/drbd feeds in the text and acts on the answer.

Two generations of DRBD say the same things differently:

- 8.4 (the kernel module in Debian's stock kernels, driven by drbd-utils 9 through `drbdadm-84`):
  `/proc/drbd` lists one line per minor (`0: cs:Connected ro:Primary/Secondary ds:UpToDate/UpToDate C r-----`,
  or `1: cs:Unconfigured` for a Secondary that is StandAlone and Diskless) but does not name resources: the agent
  asks `drbdadm sh-minor RES` for the resource's minors once, then reads /proc/drbd. `drbdadm
  role|cstate|dstate RES` say the same (one line per volume, local value first: `Primary/Secondary`,
  `Connected`, `UpToDate/UpToDate`); the tests hold the two readings against each other on real captures.
- 9.x: `/proc/drbd` holds only the version; `drbdsetup events2 --now RES` dumps `exists ...` lines ending with
  `exists -`, and `drbdsetup status --json RES` the same facts as JSON.

Both are reduced to one frozen `DrbdState`. A resource with several volumes reports its worst disk; a DRBD 9
resource with several peers reports the first connection (hastore runs two nodes).
"""

from __future__ import annotations

import json
import os
import re
from collections import namedtuple  # not dataclasses: an agent runs per call, and that import costs ~20 ms

UP_TO_DATE = "UpToDate"
PRIMARY, SECONDARY, UNKNOWN = "Primary", "Secondary", "Unknown"

# Worst first: the order DRBD itself ranks disk states in (drbd_disk_state in drbd.h), so the worst of
# several volumes is the smallest index.  Detaching exists in DRBD 9 only.
DISK_ORDER = ("Diskless", "Attaching", "Detaching", "Failed", "Negotiating", "Inconsistent", "Outdated",
              "DUnknown", "Consistent", "UpToDate")
# Connection states in which the peer is talking to us (8.4 cstate names and DRBD 9 connection states;
# DRBD 9 names the replication (Established, SyncSource, ...) separately, per peer device).
CONNECTED = frozenset({"Connected", "StartingSyncS", "StartingSyncT", "WFBitMapS", "WFBitMapT", "WFSyncUUID",
                       "SyncSource", "SyncTarget", "PausedSyncS", "PausedSyncT", "VerifyS", "VerifyT",
                       "Ahead", "Behind"})
_PROC_LINE = re.compile(r"^\s*(\d+):\s+cs:(\S+)\s+ro:(\S+)\s+ds:(\S+)")
_PROC_UNCONFIGURED = re.compile(r"^\s*(\d+):\s+cs:Unconfigured\s*$")  # drbd_proc.c: Secondary, StandAlone, Diskless
UNCONFIGURED = ("StandAlone", SECONDARY, UNKNOWN, "Diskless", "DUnknown")  # what that line stands for
_VERSION = re.compile(r"^version:\s*(\d+)\.(\d+)")


class ParseError(ValueError):
    """The text is not what the named DRBD command prints; the message quotes what was unexpected."""


class DrbdState(namedtuple("DrbdState", "resource role peer_role connection disk peer_disk generation")):
    """One resource as seen from this node. peer_* is "Unknown"/"DUnknown" when no peer is connected."""
    # resource: str
    # role: str
    # peer_role: str
    # connection: str
    # disk: str
    # peer_disk: str
    # generation: str  -- "8.4" or "9": which set of commands produced it
    __slots__ = ()

    @property
    def connected(self) -> bool:
        return self.connection in CONNECTED

    def describe(self) -> str:
        return (f"role {self.role}/{self.peer_role}, connection {self.connection}, "
                f"disk {self.disk}/{self.peer_disk} (DRBD {self.generation})")


class ProcDrbd(namedtuple("ProcDrbd", "version minors")):
    """/proc/drbd: the module version and, for 8.4, one entry per configured minor."""
    # version: tuple[int, int] | None
    # minors: dict[int, tuple[str, str, str, str, str]]  -- minor -> (cs, role, peer role, disk, peer disk)
    __slots__ = ()

    @property
    def generation(self) -> str | None:
        """"8.4" when the module is 8.x or lists `cs:` lines, "9" for 9.x, None when /proc/drbd says neither."""
        if self.minors or (self.version is not None and self.version[0] == 8):
            return "8.4"
        if self.version is not None and self.version[0] >= 9:
            return "9"
        return None


def parse_proc_drbd(text: str) -> ProcDrbd:
    version = None
    minors: dict[int, tuple[str, str, str, str, str]] = {}
    for line in text.splitlines():
        if version is None and (m := _VERSION.match(line)):
            version = (int(m.group(1)), int(m.group(2)))
        elif m := _PROC_LINE.match(line):
            role, peer_role = _pair(m.group(3), "ro")
            disk, peer_disk = _pair(m.group(4), "ds")
            minors[int(m.group(1))] = (m.group(2), role, peer_role, disk, peer_disk)
        elif m := _PROC_UNCONFIGURED.match(line):
            minors[int(m.group(1))] = UNCONFIGURED
    return ProcDrbd(version, minors)


def _pair(value: str, what: str) -> tuple[str, str]:
    local, sep, peer = value.partition("/")
    if not sep or not local or not peer:
        raise ParseError(f"expected LOCAL/PEER in {what}, got {value!r}")
    return local, peer


def _lines(text: str, command: str) -> list[str]:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ParseError(f"`{command}` printed nothing")
    return lines


def worst_disk(disks) -> str:
    return min(disks, key=lambda d: DISK_ORDER.index(d) if d in DISK_ORDER else -1)


def state_84(resource: str, role_text: str, cstate_text: str, dstate_text: str) -> DrbdState:
    """From what `drbdadm role|cstate|dstate RES` print (one line per volume)."""
    roles = [_pair(line, "role") for line in _lines(role_text, "drbdadm role")]
    cstates = _lines(cstate_text, "drbdadm cstate")
    disks = [_pair(line, "dstate") for line in _lines(dstate_text, "drbdadm dstate")]
    if not len(roles) == len(cstates) == len(disks):
        raise ParseError(f"drbdadm role, cstate and dstate name {len(roles)}, {len(cstates)} and {len(disks)} "
                         f"volumes")
    return _aggregate_84(resource, [(c, *r, *d) for c, r, d in zip(cstates, roles, disks)])


def _aggregate_84(resource: str, volumes: list[tuple[str, str, str, str, str]]) -> DrbdState:
    """One state for a resource from its volumes' (connection, role, peer role, disk, peer disk): Primary if any
    volume is, the first volume's connection, the worst disk on each side."""
    for _cs, *states in volumes:
        for r in states[:2]:
            if r not in (PRIMARY, SECONDARY, UNKNOWN):
                raise ParseError(f"unknown role {r!r}")
        for disk in states[2:]:
            if disk not in DISK_ORDER:
                raise ParseError(f"unknown disk state {disk!r}")
    role = PRIMARY if any(v[1] == PRIMARY for v in volumes) else volumes[0][1]
    peer_role = PRIMARY if any(v[2] == PRIMARY for v in volumes) else volumes[0][2]
    return DrbdState(resource, role, peer_role, volumes[0][0], worst_disk(v[3] for v in volumes),
                     worst_disk(v[4] for v in volumes), "8.4")


def parse_minors(text: str) -> list[int]:
    """`drbdadm sh-minor RES` (8.4): the minor of each of the resource's volumes, one per line."""
    lines = _lines(text, "drbdadm sh-minor")
    if not all(line.isdigit() for line in lines):
        raise ParseError(f"`drbdadm sh-minor` printed {text.strip()!r}, not minor numbers")
    return [int(line) for line in lines]


def minors_from_debugfs(root: str, resource: str) -> list[int]:
    """An 8.4 resource's minors as the kernel maps them: DRBD's debugfs directory has minors/N, a link to
    ../resources/RES/volumes/VNR, for every minor that exists. [] when the resource has none there (not up) or the
    directory cannot be read (debugfs not mounted, or a kernel without it): the caller asks drbdadm then."""
    try:
        entries = os.listdir(os.path.join(root, "minors"))
    except OSError:
        return []
    found = []
    for entry in entries:
        try:
            parts = os.readlink(os.path.join(root, "minors", entry)).split("/")
        except OSError:
            continue
        if entry.isdigit() and parts[-4:-2] == ["resources", resource]:
            found.append(int(entry))
    return sorted(found)


def state_from_proc(resource: str, proc: ProcDrbd, minors: list[int]) -> DrbdState | None:
    """An 8.4 resource's state from /proc/drbd, given its minors (one per volume): what state_84 makes of `drbdadm
    role|cstate|dstate`, from one file read instead of three processes. None when a minor is not in /proc/drbd:
    the resource is not up (8.4 lists only the minors that exist)."""
    if not minors or any(m not in proc.minors for m in minors):
        return None
    return _aggregate_84(resource, [proc.minors[m] for m in minors])


def _fields(words: list[str]) -> dict[str, str]:
    out = {}
    for w in words:
        k, sep, v = w.partition(":")
        if sep:
            out[k] = v
    return out


def parse_events2(text: str, resource: str) -> DrbdState | None:
    """`drbdsetup events2 --now RES` (also --full output with --statistics fields): None when the resource is
    not configured (the dump is just `exists -`)."""
    res = None
    disks, conns, peer_disks = [], [], []
    complete = False
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        if words == ["exists", "-"]:
            complete = True
            continue
        if len(words) < 2 or words[0] not in ("exists", "create", "change"):
            continue  # destroy/call/response/helper lines do not describe the present state
        kv = _fields(words[2:])
        if kv.get("name") != resource:
            continue
        if words[1] == "resource":
            res = kv
        elif words[1] == "device" and "disk" in kv:
            disks.append(kv["disk"])
        elif words[1] == "connection":
            conns.append(kv)
        elif words[1] == "peer-device" and "peer-disk" in kv:
            peer_disks.append((kv.get("peer-node-id"), kv["peer-disk"]))
    if not complete:
        raise ParseError("`drbdsetup events2 --now` output did not end with `exists -`")
    if res is None:
        return None
    conn = conns[0] if conns else {}
    peer_id = conn.get("peer-node-id")
    mine = [d for pid, d in peer_disks if pid == peer_id] if peer_id is not None else []
    return DrbdState(resource, res.get("role", UNKNOWN), conn.get("role", UNKNOWN),
                     conn.get("connection", "StandAlone"), worst_disk(disks) if disks else "Diskless",
                     worst_disk(mine) if mine else "DUnknown", "9")


def parse_status_json(text: str, resource: str) -> DrbdState | None:
    """`drbdsetup status --json RES`: a JSON list of resources (note the real key `peer_devices`)."""
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ParseError(f"`drbdsetup status --json` printed no JSON: {e}") from None
    if not isinstance(data, list):
        raise ParseError("`drbdsetup status --json` printed JSON that is not a list of resources")
    for res in data:
        if not isinstance(res, dict) or res.get("name") != resource:
            continue
        disks = [d.get("disk-state", "Diskless") for d in res.get("devices", [])]
        conns = res.get("connections", [])
        conn = conns[0] if conns else {}
        peer_disks = [p.get("peer-disk-state", "DUnknown") for p in conn.get("peer_devices", [])]
        return DrbdState(resource, res.get("role", UNKNOWN), conn.get("peer-role", UNKNOWN),
                         conn.get("connection-state", "StandAlone"), worst_disk(disks) if disks else "Diskless",
                         worst_disk(peer_disks) if peer_disks else "DUnknown", "9")
    return None


# ------------------------------------------------------------------ decisions and error texts
def promotion_refusal(state: DrbdState, force: bool) -> str | None:
    """Why this node must not become Primary now, or None when promoting is safe (or forced)."""
    if state.role == PRIMARY or state.disk == UP_TO_DATE:
        return None
    if force and state.disk not in ("Diskless", "Failed", "Attaching", "Detaching", "Negotiating"):
        return None
    hint = {
        "Outdated": "the peer has newer data: let it take over, or reconnect and resync first",
        "Inconsistent": "a resync is incomplete or has not started: wait for it to finish "
                        "(`drbdadm status` shows the progress)",
        "Consistent": "DRBD cannot tell whether the peer has newer data: connect to the peer first",
        "DUnknown": "DRBD cannot tell whether the peer has newer data: connect to the peer first",
        "Diskless": "there is no local backing disk: attach it (`drbdadm attach`) and resync",
        "Failed": "the backing disk had I/O errors: repair or replace it, attach and resync",
    }.get(state.disk, "wait until the disk is UpToDate")
    if force:
        return (f"refusing to promote {state.resource}: its disk is {state.disk} and force_promote cannot help "
                f"a node without readable data; {hint}")
    return (f"refusing to promote {state.resource}: its local disk is {state.disk}, not UpToDate; {hint}, "
            f"or set force_promote=true knowing that writes the peer made since will be lost")


def is_forced(state: DrbdState) -> bool:
    return state.disk != UP_TO_DATE


# What drbdsetup prints on stderr for the failures the agent tells apart (drbd-utils print_config_error and
# the kernel's drbd_state_sw_errors / error_to_string tables).
HELD_OPEN = "Device is held open by someone"
NOT_UP_MARKERS = ("Device minor not allocated", "Unknown resource", "No such resource", "unknown minor")
NOT_DEFINED = "not defined in your config"


_EXPLAIN = (
    ("(-1)", "the peer is Primary and the configuration allows one Primary: demote it there first"),
    ("(-2)", "DRBD has no access to UpToDate data on either side"),
    ("(-7)", ("fencing is configured and the peer could not be outdated: make sure the peer is down or "
              "outdated (`drbdadm outdate` on it) before promoting here")),
    ("(-12)", "the device is held open (mounted or in use)"),
    ("(104)", "the backing disk cannot be opened: is it present and not in use by something else?"),
)


def explain_failure(stderr: str) -> str:
    """A sentence for the operator about a failed drbdadm call: DRBD's own message plus what it means."""
    text = " / ".join(line.strip() for line in stderr.splitlines() if line.strip()) or "no message"
    for code, meaning in _EXPLAIN:
        if code in stderr:
            return f"{text} ({meaning})"
    return text


def says_held_open(stderr: str) -> bool:
    return HELD_OPEN in stderr or "(-12)" in stderr


def says_not_up(stderr: str) -> bool:
    return any(m in stderr for m in NOT_UP_MARKERS)


def says_not_defined(stderr: str) -> bool:
    return NOT_DEFINED in stderr or "no resources defined" in stderr
