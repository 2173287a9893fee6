"""A disk lease for two nodes that share a block device but not a clock (sanlock / disk-paxos, much simplified).

The lease is one 4096-byte block at `offset` of a shared device (or file):

    offset  size  field
         0     8  magic  b"HSLEASE1"
         8     2  version (1)
        10     2  state  (1 held, 2 released)
        12    64  owner node name, UTF-8, NUL padded
        76     8  generation: +1 on every acquire
        84     8  counter: +1 on every renewal
        92     4  lease_ms of the owner (a contender waits at least this long)
        96     4  renew_ms of the owner (informational)
       100    16  nonce: random per acquire, tells two acquisitions by one node apart
       116     4  CRC32 of bytes 0..115
       120  3976  zero
    all integers little-endian

Liveness without a shared clock: the holder rewrites the block (counter + 1) every renew_ms.  A contender reads
the block and watches it for the holder's lease_ms by its own monotonic clock: if the block changes, the holder
is alive and the contender refuses; if it stays byte-for-byte the same for the whole lease, the holder is dead
and the lease is free.  An empty (all-zero) block or a released record is free at once.  A block whose magic is
not ours is somebody else's data and is never overwritten.  A record with a bad CRC (torn write) is treated like
a live record of an unknown holder: it is free only once it has not changed for a whole lease.

Acquiring writes our record, waits `settle` and reads it back: two contenders that decided "free" at the same
moment both write, the later write wins, and the one that reads back the other's record backs off.  That holds
only while no write lands more than `settle` after the read that decided it (Fischer's algorithm), so an
acquirer whose last read and write took longer than `gap_limit_s` gives up rather than trust its read-back.
The renewer reads before every renewal and stops (without writing) the moment the block is not exactly what it
last wrote, or when more than `lease_ms - renew_ms/2` passed since its last write (it may have stalled long enough for a
contender to take over; writing then would clobber the new holder).

Only `LeaseDevice` does I/O (O_DIRECT | O_SYNC, a page-aligned mmap buffer); everything else is pure and is
fed blocks and monotonic times.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
import zlib
from collections import namedtuple  # not dataclasses: an agent runs per call, and that import costs ~20 ms

BLOCK = 4096
MAGIC = b"HSLEASE1"
VERSION = 1
HELD, RELEASED = 1, 2
NAME_MAX = 64
NONCE_LEN = 16
_HEAD = struct.Struct("<8sHH64sQQII16s")   # everything the CRC covers
_CRC = struct.Struct("<I")


class LeaseFormatError(ValueError):
    """A value cannot be stored in a lease record (name too long, counter out of range...)."""


class Record(namedtuple("Record", "owner generation counter lease_ms renew_ms nonce released", defaults=(False,))):
    # owner: str
    # generation: int
    # counter: int
    # lease_ms: int
    # renew_ms: int
    # nonce: bytes
    # released: bool = False
    __slots__ = ()

    def encode(self) -> bytes:
        name = self.owner.encode()
        if not name or len(name) > NAME_MAX or b"\0" in name:
            raise LeaseFormatError(f"node name {self.owner!r} must be 1..{NAME_MAX} bytes without NUL")
        if len(self.nonce) != NONCE_LEN:
            raise LeaseFormatError(f"nonce must be {NONCE_LEN} bytes")
        try:
            head = _HEAD.pack(MAGIC, VERSION, RELEASED if self.released else HELD, name, self.generation,
                              self.counter, self.lease_ms, self.renew_ms, self.nonce)
        except struct.error as e:
            raise LeaseFormatError(f"record out of range: {e}") from None
        body = head + _CRC.pack(zlib.crc32(head))
        return body + bytes(BLOCK - len(body))

    def renewed(self) -> Record:
        return self._replace(counter=self.counter + 1)

    def release(self) -> Record:
        return self._replace(counter=self.counter + 1, released=True)

    def describe(self) -> str:
        what = "released by" if self.released else "held by"
        return f"{what} {self.owner} (generation {self.generation}, counter {self.counter})"


EMPTY, RECORD, CORRUPT, FOREIGN = "empty", "record", "corrupt", "foreign"


class Block(namedtuple("Block", "kind raw record detail", defaults=(None, "",))):
    """One read of the lease area: what kind of content it holds and the exact bytes (for change detection)."""
    # kind: str
    # raw: bytes
    # record: Record | None = None
    # detail: str = ""
    __slots__ = ()

    @property
    def free(self) -> bool:
        return self.kind == EMPTY or (self.record is not None and self.record.released)

    def names(self, node: str, nonce: bytes | None = None) -> bool:
        r = self.record
        return (r is not None and not r.released and r.owner == node
                and (nonce is None or r.nonce == nonce))

    def describe(self) -> str:
        if self.record is not None:
            return self.record.describe()
        return {EMPTY: "empty", CORRUPT: f"unreadable ({self.detail})",
                FOREIGN: f"not a hastore lease ({self.detail})"}[self.kind]


def decode(raw: bytes) -> Block:
    raw = bytes(raw)
    if len(raw) != BLOCK:
        raise ValueError(f"a lease block is {BLOCK} bytes, got {len(raw)}")
    if not any(raw):
        return Block(EMPTY, raw)
    if raw[:8] != MAGIC:
        return Block(FOREIGN, raw, detail=f"starts with {raw[:8]!r}")
    head = raw[:_HEAD.size]
    (crc,) = _CRC.unpack_from(raw, _HEAD.size)
    if zlib.crc32(head) != crc:
        return Block(CORRUPT, raw, detail="CRC mismatch, a torn or concurrent write")
    _, version, state, name, gen, counter, lease_ms, renew_ms, nonce = _HEAD.unpack(head)
    if version != VERSION or state not in (HELD, RELEASED):
        return Block(CORRUPT, raw, detail=f"version {version}, state {state}")
    try:
        owner = name.rstrip(b"\0").decode()
    except UnicodeDecodeError:
        return Block(CORRUPT, raw, detail="owner name is not UTF-8")
    return Block(RECORD, raw, Record(owner, gen, counter, lease_ms, renew_ms, nonce, state == RELEASED))


# ------------------------------------------------------------------------------------------- decisions
FREE, HELD_BY_OTHER, WATCH, OURS, REFUSE = "free", "held", "watch", "ours", "refuse"


class Verdict(namedtuple("Verdict", "kind reason until", defaults=(None,))):
    # kind: str  -- free | held | watch | ours | refuse
    # reason: str
    # until: float | None = None  -- for watch: the monotonic time at which a static block means "expired"
    __slots__ = ()


def first_look(block: Block, me: str, mine: bytes | None = None) -> Verdict:
    """What a would-be holder concludes from its first read.  `mine`: the nonce of the record this node's last
    renewer held, if it knows one.  Only that record is this node's to take at once: one that names this node
    with another nonce was left by an earlier boot or by an acquire that gave up (see `write_gap`), and may have
    replaced a record another node had confirmed, so it is watched like any other."""
    if block.kind == EMPTY:
        return Verdict(FREE, "the lock area is empty")
    if block.kind == FOREIGN:
        return Verdict(REFUSE, f"the lock area holds data that is not a hastore lease ({block.detail}); refusing "
                               f"to overwrite it: point offset at an unused area, or zero it if you are sure")
    if block.record is not None and block.record.released:
        return Verdict(FREE, f"the lease was {block.record.describe()}")
    if mine is not None and block.names(me, mine):
        return Verdict(OURS, f"the record is the one this node's last renewer held ({block.record.describe()})")
    if block.names(me):
        return Verdict(WATCH, f"the lease is {block.describe()}, written by an earlier run on this node that no "
                              f"renewer of ours holds now")
    return Verdict(WATCH, f"the lease is {block.describe()}")


class Watch:
    """A contender watching a lease it found taken: fed each read and its monotonic time (seconds)."""

    def __init__(self, first: Block, t0: float, lease_ms: int):
        self.first = first
        holder_ms = first.record.lease_ms if first.record is not None else 0
        self.wait_ms = max(lease_ms, holder_ms)
        self.until = t0 + self.wait_ms / 1000
        self.prev_t = t0

    def observe(self, block: Block, t: float) -> Verdict:
        seen_before, self.prev_t = self.prev_t, t
        if block.raw != self.first.raw:
            if block.free:
                return Verdict(FREE, f"the lease was {block.describe()} while we watched")
            if block.kind == FOREIGN:
                return first_look(block, "")
            ago = round((t - seen_before) * 1000)
            r = block.record
            if r is not None:
                return Verdict(HELD_BY_OTHER, f"held by {r.owner} (generation {r.generation}, renewed "
                                              f"{ago}ms ago)")
            return Verdict(HELD_BY_OTHER, f"the lock area is being written by an unknown holder "
                                          f"({block.detail}, changed {ago}ms ago)")
        if t >= self.until:
            return Verdict(FREE, f"the lease {self.first.describe()} expired: unchanged for {self.wait_ms}ms")
        return Verdict(WATCH, f"the lease is {block.describe()}", until=self.until)


def confirm(block: Block, mine: Record) -> Verdict:
    """After writing our record and settling: did our write survive (we won) or did a later one replace it?"""
    if block.raw == mine.encode():
        return Verdict(OURS, f"acquired: {mine.describe()}")
    return Verdict(HELD_BY_OTHER, f"lost the race for the lease: it is now {block.describe()}")


def renewal_check(block: Block, mine: Record, last_write: float, now: float) -> Verdict:
    """Before a renewal: write only if the block is exactly what we wrote last and we are not too late."""
    if block.raw != mine.encode():
        return Verdict(HELD_BY_OTHER, f"the lease was taken over: it is now {block.describe()}")
    late_ms = (now - last_write) * 1000
    if late_ms >= mine.lease_ms - mine.renew_ms / 2:
        return Verdict(REFUSE, f"{late_ms:.0f}ms since our last renewal, too close to the {mine.lease_ms}ms "
                               f"lease: another node may already have taken it, not writing")
    return Verdict(OURS, "renew")


def settle_s(*renew_ms: int) -> float:
    """How long an acquirer waits before reading its record back: longer than any contender's gap between its
    last read and the end of its write, which every acquirer holds below `gap_limit_s` (see `write_gap`).
    Given the renew_ms of the record it replaces too, the longer of the two: a contender that uses that record's
    parameters (the other node, configured differently during a rolling change) then is covered as well.
    Both nodes are meant to use the same parameters, as they share one haresources."""
    return max(min(max(r / 2, 20), 500) for r in renew_ms) / 1000


def gap_limit_s(*renew_ms: int) -> float:
    """The longest an acquirer may take from starting its last read to the end of its write: 4/5 of the shortest
    settle among the parameters given, so that its write has landed before a contender reads back (Fischer's
    mutual exclusion)."""
    return min(settle_s(r) for r in renew_ms) * 0.8


def stale(read_at: float, now: float, *renew_ms: int) -> bool:
    """Whether a read is too old to write on: more than the gap limit ago (the renewer and the release read again
    then; an acquirer that finds its read stale after writing gives up, see write_gap)."""
    return now - read_at > gap_limit_s(*renew_ms)


def write_gap(read_at: float, written_at: float, *renew_ms: int) -> Verdict:
    """After writing our record: a contender that decided "free" before our write may have written since, and
    read back before its write landed only if we took longer than the gap limit.  Then our record may have
    replaced one that somebody already confirmed, and holding it would make two holders: give up instead."""
    gap_ms, limit_ms = (written_at - read_at) * 1000, gap_limit_s(*renew_ms) * 1000
    if stale(read_at, written_at, *renew_ms):
        return Verdict(REFUSE, f"{gap_ms:.0f}ms passed between our last read of the lease and the end of our "
                               f"write, more than the {limit_ms:.0f}ms that keep two acquirers apart: a "
                               f"contender may have confirmed its record before ours landed; giving up")
    return Verdict(OURS, f"wrote our record {gap_ms:.0f}ms after our last read (at most {limit_ms:.0f}ms)")


def poll_s(renew_ms: int) -> float:
    return min(max(renew_ms / 5, 10), 200) / 1000


# ------------------------------------------------------------------------------------------- I/O
class DeviceMissing(OSError):
    pass


class LeaseDevice:
    """The lease block on a device or file, read and written with O_DIRECT | O_SYNC through an aligned buffer."""

    def __init__(self, path: str, offset: int, readonly: bool = False):
        """`readonly` for readers that never write (the observer): closing a device opened for writing makes
        udev re-probe it, and a whole disk's partition table may be re-read."""
        if offset < 0 or offset % BLOCK:
            raise ValueError(f"offset {offset} must be a multiple of {BLOCK}")
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise DeviceMissing(f"{path} does not exist") from None
        if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
            raise ValueError(f"{path} is neither a block device nor a regular file")
        try:
            self.fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_DIRECT | os.O_SYNC | os.O_CLOEXEC)
        except OSError as e:
            if e.errno == 22:  # EINVAL: the filesystem cannot do direct I/O
                raise ValueError(f"{path} cannot be opened with O_DIRECT (its filesystem does not support "
                                 f"direct I/O): use a block device or a file on ext4/xfs") from None
            raise
        size = os.lseek(self.fd, 0, os.SEEK_END)
        if size < offset + BLOCK:
            os.close(self.fd)
            raise ValueError(f"{path} is {size} bytes: too small for a lease block at offset {offset}")
        self.path, self.offset = path, offset
        self.buf = mmap.mmap(-1, BLOCK)   # page aligned, as O_DIRECT requires

    def read(self) -> Block:
        n = os.preadv(self.fd, [self.buf], self.offset)
        if n != BLOCK:
            raise OSError(f"short read of the lease block on {self.path}: {n} bytes")
        return decode(self.buf[:])

    def write(self, data: bytes) -> None:
        self.buf[:] = data
        n = os.pwritev(self.fd, [self.buf], self.offset)
        if n != BLOCK:
            raise OSError(f"short write of the lease block on {self.path}: {n} bytes")

    def close(self) -> None:
        os.close(self.fd)
        self.buf.close()
