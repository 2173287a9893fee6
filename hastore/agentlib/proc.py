"""Mounts and the processes that use them, read from /proc; stopping those processes with escalation.

A user is a process that keeps *this mount* busy (what makes umount fail with EBUSY): an open file,
cwd, root, executable or mapped file reached through it.  Matching is by mount id, which is exact:
a process whose cwd is the directory *under* the mount, or a copy of the mount in another mount
namespace, is not a user and is left alone.  Cheap text checks come first and never touch any
filesystem (readlink of /proc links, device numbers in /proc/PID/maps, fdinfo's mnt_id); only
candidates that pass are confirmed by opening their /proc link with O_PATH, which reaches into our
own filesystem only, so a hung NFS server elsewhere cannot hang a stop.

Signals go through pidfds, so a pid that exits and is reused between scan and kill is never hit.
"""

from __future__ import annotations

import os
import re
import select
import signal
import time
from collections.abc import Callable, Iterable
from collections import namedtuple  # not dataclasses: an agent runs per call, and that import costs ~20 ms

_OCTAL = re.compile(r"\\([0-7]{3})")


class Mount(namedtuple("Mount", "mount_id parent_id dev root mount_point fstype source")):
    # mount_id: int
    # parent_id: int
    # dev: int  -- os.makedev(major, minor): the st_dev of files on it
    # root: str  -- the part of the filesystem mounted here ("/" unless a bind of a subtree)
    # mount_point: str
    # fstype: str
    # source: str
    __slots__ = ()


def _unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """Lines of /proc/PID/mountinfo (proc(5)) in kernel order: a later mount on the same mount
    point covers the earlier ones."""
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
            major, minor = fields[2].split(":")
            mounts.append(Mount(int(fields[0]), int(fields[1]), os.makedev(int(major), int(minor)),
                                _unescape(fields[3]), _unescape(fields[4]), _unescape(fields[sep + 1]),
                                _unescape(fields[sep + 2])))
        except (ValueError, IndexError):
            continue
    return mounts


def read_mountinfo(path: str = "/proc/self/mountinfo") -> list[Mount]:
    with open(path) as f:
        return parse_mountinfo(f.read())


def loop_backing(dev: int) -> str | None:
    """The file behind a loop device (by device number), or None when it is not a bound loop."""
    try:
        with open(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/loop/backing_file") as f:
            return f.read().rstrip("\n").removesuffix(" (deleted)")
    except OSError:
        return None


def loops_backed_by(path: str) -> list[int]:
    """Device numbers of the loop devices whose backing file is `path` (already resolved)."""
    found = []
    try:
        names = os.listdir("/sys/block")
    except OSError:
        return found
    for name in names:
        if not name.startswith("loop"):
            continue
        try:
            with open(f"/sys/block/{name}/dev") as f:
                major, minor = f.read().strip().split(":")
        except (OSError, ValueError):
            continue
        dev = os.makedev(int(major), int(minor))
        if loop_backing(dev) == path:
            found.append(dev)
    return found


# ------------------------------------------------------------------ who uses a mount
def _pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def _under(target: str, prefixes: tuple[str, ...]) -> bool:
    target = target.removesuffix(" (deleted)")
    return any(target == p or target.startswith(p.rstrip("/") + "/") for p in prefixes)


DENIED = -1          # _link_mnt_id: not allowed to look (map_files needs CAP_SYS_ADMIN)
_MNT_ID = re.compile(r"^mnt_id:\s*(\d+)", re.MULTILINE)


def _fdinfo_mnt_id(path: str) -> int | None:
    try:
        with open(path) as f:
            m = _MNT_ID.search(f.read())
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _link_mnt_id(link: str) -> int | None:
    """The id of the mount a /proc magic link (cwd, exe, map_files/...) points into; None if the
    link is gone, DENIED if we may not follow it."""
    try:
        fd = os.open(link, os.O_PATH | os.O_CLOEXEC)
    except PermissionError:
        return DENIED
    except OSError:
        return None
    try:
        return _fdinfo_mnt_id(f"/proc/self/fdinfo/{fd}")
    finally:
        os.close(fd)


def _holds(pid: int, paths: tuple[str, ...], devs: frozenset[int], mount_ids: frozenset[int]) -> str | None:
    """What of process `pid` keeps one of the mounts busy ("cwd", "fd 3", ...), or None."""
    base = f"/proc/{pid}"
    for name in ("cwd", "root", "exe"):
        try:
            candidate = _under(os.readlink(f"{base}/{name}"), paths)
        except OSError:
            continue
        if candidate and ((mnt := _link_mnt_id(f"{base}/{name}")) == DENIED or mnt in mount_ids):
            return name
    try:
        fds = os.listdir(f"{base}/fd")
    except OSError:
        fds = []
    for fd in fds:
        try:
            candidate = _under(os.readlink(f"{base}/fd/{fd}"), paths)
        except OSError:
            continue
        if candidate and _fdinfo_mnt_id(f"{base}/fdinfo/{fd}") in mount_ids:
            return f"fd {fd}"
    try:
        with open(f"{base}/maps") as f:
            maps = f.read()
    except OSError:
        return None
    for line in maps.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 5 or parts[4] == "0":
            continue
        major, _, minor = parts[3].partition(":")
        try:
            if os.makedev(int(major, 16), int(minor, 16)) not in devs:
                continue
        except ValueError:
            continue
        mnt = _link_mnt_id(f"{base}/map_files/{parts[0]}")
        if mnt == DENIED or mnt in mount_ids:   # denied: trust the device number alone
            return "mapped file" + (f" {parts[5]}" if len(parts) == 6 else "")
    return None


def _ancestors() -> set[int]:
    """Our own pid and those of our parents: never signalled (we would kill our caller)."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids | {1}


class _Scope(namedtuple("_Scope", "paths devs mount_ids")):
    # paths: tuple[str, ...]
    # devs: frozenset[int]
    # mount_ids: frozenset[int]
    __slots__ = ()

    @classmethod
    def of(cls, mounts: Iterable[Mount]) -> _Scope:
        mounts = list(mounts)
        return cls(tuple(m.mount_point for m in mounts), frozenset(m.dev for m in mounts),
                   frozenset(m.mount_id for m in mounts))

    def holds(self, pid: int) -> str | None:
        return _holds(pid, self.paths, self.devs, self.mount_ids) if self.paths else None


def users(mounts: Iterable[Mount]) -> dict[int, str]:
    """pid -> what it holds on any of `mounts` (open file, cwd, root, executable, mapping)."""
    scope = _Scope.of(mounts)
    if not scope.paths:
        return {}
    skip = _ancestors()
    found = {}
    for pid in _pids():
        if pid not in skip and (what := scope.holds(pid)):
            found[pid] = what
    return found


def describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f"{pid} ({f.read().strip()})"
    except OSError:
        return str(pid)


# ------------------------------------------------------------------ stopping them
def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def stop_users(mounts: Iterable[Mount], term_wait: float, kill_wait: float = 5.0,
               report: Callable[[str], None] = lambda s: None) -> dict[int, str]:
    """SIGTERM every user of `mounts`, wait up to term_wait s for them to go, then SIGKILL the
    users still there and wait up to kill_wait s.  Processes that start using the mounts meanwhile
    are caught by rescans.  Returns the users left at the end ({} = none)."""
    mounts = list(mounts)
    scope = _Scope.of(mounts)
    for sig, wait in ((signal.SIGTERM, term_wait), (signal.SIGKILL, kill_wait)):
        deadline = time.monotonic() + wait
        signalled: dict[int, int] = {}        # pid -> pidfd
        try:
            while True:
                found = users(mounts)
                for pid in found.keys() - signalled.keys():
                    fd = _pidfd(pid)
                    if fd is None:
                        continue                  # already gone
                    signalled[pid] = fd
                    # The pidfd pins this very process: if it is still a user now, the signal
                    # cannot reach a newcomer that inherited a recycled pid.
                    what = scope.holds(pid)
                    if what is None:
                        continue
                    who = describe(pid)
                    try:
                        signal.pidfd_send_signal(fd, sig)
                        report(f"sent {sig.name} to {who}, which holds {what}")
                    except ProcessLookupError:
                        pass
                if not found:
                    return {}
                if time.monotonic() >= deadline:
                    break
                live = [fd for fd in signalled.values() if not _exited(fd)]
                left = max(0.0, deadline - time.monotonic())
                if live:
                    select.select(live, [], [], min(0.2, left))
                else:
                    time.sleep(min(0.02, left))   # exited but not yet reaped by their parent
        finally:
            for fd in signalled.values():
                os.close(fd)
    return users(mounts)


def _exited(pidfd: int) -> bool:
    return bool(select.select([pidfd], [], [], 0)[0])
