"""The heartbeat wire format: a versioned compact envelope, its MAC, and the verifier.

Layout (big-endian): magic b"HA", version u8, type u8, key_id u8, flags u8, generation u64, seq u64,
rid u32, ack u32, src_len u8 + src, dst_len u8 + dst, body_len u16 + body (compact sorted JSON, UTF-8),
then the MAC over everything before it (flags included).

Flags: bit 0 (FLAG_NEWS) marks a datagram the receiver should act on at once: every message that is not a beat,
and a beat that says something the sender's previous beat did not. A routine beat (the same as the last) only
proves the sender alive; the receiver's kernel can hold it until the receiver's own beat timer (see
hastore.io.transports). The other bits are reserved: a datagram with one set is malformed.

The verifier checks in a fixed, cheap-first order (after keepalived) and names every result.
Replay marks move only after the MAC verified. Pure: no I/O, no clock.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import functools
import hashlib
import hmac
import json
import struct
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from hastore.config.model import Auth, AuthAlgorithm, AuthKey

MAGIC = b"HA"
VERSION = 1
MAX_DATAGRAM = 1400
MAX_NAME = 64
_U32 = 2**32 - 1
_U64 = 2**64 - 1
_HEADER = struct.Struct(">2sBBBBQQII")
FLAGS_OFFSET = 5  # of the flags byte in a datagram: what the kernel's socket filters look at
SEQ_AT = slice(14, 22)  # of the seq field in a datagram (what the shell sorts packets read in bulk by)
FLAG_NEWS = 0x01
_KNOWN_FLAGS = FLAG_NEWS
AUTHENTIC_KEPT = 8  # datagrams remembered as verified, for their copies over the other links
_BODY_LEN = struct.Struct(">H")
_DIGEST_NAMES = {AuthAlgorithm.SHA256: "sha256", AuthAlgorithm.SHA1: "sha1", AuthAlgorithm.MD5: "md5"}
MAC_SIZES = {AuthAlgorithm.SHA256: 32, AuthAlgorithm.SHA1: 20, AuthAlgorithm.MD5: 16, AuthAlgorithm.CRC: 4}
_KNOWN_MAC_SIZES = frozenset(MAC_SIZES.values())


class MsgType(enum.IntEnum):
    BEAT = 1
    LEAVE = 2
    ACK = 3
    REQUEST = 4


@dataclass(frozen=True)
class Message:
    type: MsgType
    src: str  # sender node name, 1..64 bytes UTF-8
    dst: str  # receiver node name; "" = any node
    generation: int  # sender's boot generation, u64, grows across restarts
    seq: int  # u64, strictly increasing for every datagram the sender signs (retransmits included)
    rid: int = 0  # reliable-message id, u32; 0 = not reliable; a retransmission keeps its rid
    ack: int = 0  # for MsgType.ACK: the rid acknowledged
    body: Mapping[str, Any] = field(default_factory=dict)
    news: bool = False  # FLAG_NEWS: act on it at once (see the module's docstring)


class Verdict(enum.Enum):
    """In the order the verifier checks them."""

    MALFORMED = "malformed"
    NOT_OURS = "not_ours"
    UNKNOWN_KEY = "unknown_key"
    BAD_MAC = "bad_mac"
    STALE = "stale"
    REPLAY = "replay"
    DUPLICATE = "duplicate"
    OK = "ok"


@dataclass(frozen=True)
class Verified:
    verdict: Verdict
    message: Message | None  # set for OK and DUPLICATE only
    detail: str  # a short sentence for logs


def _usable(key: AuthKey | None, allow_insecure: bool) -> bool:
    return key is not None and (key.algorithm is not AuthAlgorithm.CRC or allow_insecure)


def signing_key(auth: Auth) -> AuthKey:
    """The key senders sign with. Raises ValueError if it is missing or an unallowed CRC key."""
    key = auth.key(auth.active_key)
    if not _usable(key, auth.allow_insecure):
        raise ValueError(f"active key {auth.active_key} is not configured or is crc without allow_insecure")
    return key


def _mac(key: AuthKey, signed: bytes) -> bytes:
    if key.algorithm is AuthAlgorithm.CRC:
        return zlib.crc32(signed).to_bytes(4, "big")
    inner, outer = _pads(key.algorithm, key.secret)
    h = inner.copy()
    h.update(signed)
    o = outer.copy()
    o.update(h.digest())
    return o.digest()


@functools.lru_cache(maxsize=16)
def _pads(algorithm: AuthAlgorithm, secret: bytes):
    """HMAC (RFC 2104) with the key's two padded blocks hashed once: each MAC then copies two hash states instead
    of setting the key up again. About half the cost of hmac.digest when the caches are cold, as they are on
    every beat tick of an idle daemon. Callers only copy the returned objects."""
    name = _DIGEST_NAMES[algorithm]
    block = hashlib.new(name).block_size
    if len(secret) > block:
        secret = hashlib.new(name, secret).digest()
    secret = secret.ljust(block, b"\0")
    return (hashlib.new(name, bytes(b ^ 0x36 for b in secret)), hashlib.new(name, bytes(b ^ 0x5C for b in secret)))


def _name_bytes(name: str, what: str, minimum: int) -> bytes:
    raw = name.encode("utf-8")  # UnicodeEncodeError (a ValueError) on lone surrogates
    if not minimum <= len(raw) <= MAX_NAME:
        raise ValueError(f"{what} must be {minimum}..{MAX_NAME} bytes of UTF-8, got {len(raw)}")
    return raw


def _body_bytes(body: Mapping[str, Any]) -> bytes:
    if not all(isinstance(k, str) for k in body):
        raise ValueError("body keys must be strings")
    last = _last_encoded
    if _same(last[0], body):  # a routine beat says what the last one said: the same bytes
        return last[1]
    try:
        text = _ENCODER.encode(dict(body))
    except TypeError as exc:
        raise ValueError(f"body is not JSON-able: {exc}") from exc
    raw = text.encode("utf-8")
    last[:] = [json.loads(text), raw]  # a copy: the caller may change its dict afterwards
    return raw


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same JSON types all through (1, 1.0 and True are equal in Python, not in JSON; nor are
    0.0 and -0.0)."""
    if type(a) is not type(b):
        return False
    if type(a) is dict:
        return a.keys() == b.keys() and all(_same(v, b[k]) for k, v in a.items())
    if type(a) is list:
        return len(a) == len(b) and all(map(_same, a, b))
    return a == b and (type(a) is not float or repr(a) == repr(b))


_ENCODER = json.JSONEncoder(separators=(",", ":"), sort_keys=True, ensure_ascii=False, allow_nan=False)
_last_encoded: list = [None, b""]  # the last body encoded (as JSON reads it back) and its bytes


def _check_ranges(msg: Message, key: AuthKey) -> None:
    for name, value, top in (("generation", msg.generation, _U64), ("seq", msg.seq, _U64),
                             ("rid", msg.rid, _U32), ("ack", msg.ack, _U32), ("key id", key.id, 255)):
        if not 0 <= value <= top:
            raise ValueError(f"{name} {value} out of range 0..{top}")


def encode(msg: Message, key: AuthKey, *, allow_insecure: bool = False) -> bytes:
    """Sign `msg` with `key`. Raises ValueError on out-of-range fields or a datagram over MAX_DATAGRAM."""
    if not _usable(key, allow_insecure):
        raise ValueError(f"key {key.id} is crc, which authenticates nothing; allow_insecure is off")
    _check_ranges(msg, key)
    src = _name_bytes(msg.src, "src", 1)
    dst = _name_bytes(msg.dst, "dst", 0)
    body = _body_bytes(msg.body)
    if len(body) > MAX_DATAGRAM:
        raise ValueError(f"body of {len(body)} bytes cannot fit a datagram")
    flags = FLAG_NEWS if msg.news else 0
    head = _HEADER.pack(MAGIC, VERSION, MsgType(msg.type), key.id, flags, msg.generation, msg.seq, msg.rid, msg.ack)
    signed = b"".join((head, bytes([len(src)]), src, bytes([len(dst)]), dst, _BODY_LEN.pack(len(body)), body))
    datagram = signed + _mac(key, signed)
    if len(datagram) > MAX_DATAGRAM:
        raise ValueError(f"datagram of {len(datagram)} bytes exceeds {MAX_DATAGRAM}")
    return datagram


def successor(datagram: bytes, key: AuthKey, seq: int) -> bytes:
    """What the sender of `datagram` (a beat whose MAC verified with `key`) sends as its routine beat numbered
    `seq`, while its state stays as that beat said: the same bytes but the flags (none: not news), the seq and the
    MAC. The sender's engine repeats its last beat's body on every routine tick (Engine._routine_tick) and encodes
    equal bodies to equal bytes, so a receiver holding the key knows its peer's next routine beats before they
    come: a datagram equal to one of them is authentic without parsing it or computing its MAC when it comes."""
    signed = b"".join((datagram[:FLAGS_OFFSET], b"\0", datagram[FLAGS_OFFSET + 1 : SEQ_AT.start],
                       seq.to_bytes(8, "big"), datagram[SEQ_AT.stop : -MAC_SIZES[key.algorithm]]))
    return signed + _mac(key, signed)


class _Malformed(Exception):
    """Raised inside parsing only; verify turns it into Verdict.MALFORMED."""


class _Parsed(NamedTuple):
    message: Message
    key_id: int
    signed: bytes
    mac: bytes


def _read_field(data: bytes, offset: int, width: int, what: str) -> tuple[bytes, int]:
    if offset + width > len(data):
        raise _Malformed(f"truncated before the {what} length")
    size = int.from_bytes(data[offset : offset + width], "big")
    start = offset + width
    if start + size > len(data):
        raise _Malformed(f"{what} length {size} runs past the end")
    return data[start : start + size], start + size


def _decode_name(raw: bytes, what: str, minimum: int) -> str:
    if not minimum <= len(raw) <= MAX_NAME:
        raise _Malformed(f"{what} of {len(raw)} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Malformed(f"{what} is not UTF-8") from exc


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


@functools.lru_cache(maxsize=8)
def _decode_body(raw: bytes) -> dict[str, Any]:
    """The body of a received datagram. Cached: the peer's routine beats carry the same bytes again and again,
    so equal bodies come back as the same dict, which nobody may change (the engine only reads bodies)."""
    try:
        body = _DECODER.decode(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _Malformed(f"body is not JSON: {type(exc).__name__}") from exc
    if not isinstance(body, dict):
        raise _Malformed("body is not a JSON object")
    return body


def _parse(data: bytes) -> _Parsed:
    if not _HEADER.size <= len(data) <= MAX_DATAGRAM:
        raise _Malformed(f"length {len(data)} outside {_HEADER.size}..{MAX_DATAGRAM}")
    magic, version, type_, key_id, flags, generation, seq, rid, ack = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise _Malformed(f"bad magic {magic!r}")
    if version != VERSION:
        raise _Malformed(f"version {version}, we speak {VERSION}")
    if flags & ~_KNOWN_FLAGS:  # the other bits are reserved: a set one is damage, not a feature
        raise _Malformed(f"reserved flags {flags & ~_KNOWN_FLAGS:#04x} set")
    if type_ not in MsgType._value2member_map_:
        raise _Malformed(f"unknown type {type_}")
    src, offset = _read_field(data, _HEADER.size, 1, "src")
    dst, offset = _read_field(data, offset, 1, "dst")
    body, offset = _read_field(data, offset, 2, "body")
    mac = data[offset:]
    # The key id does not say the algorithm, so here we only require a MAC of some known size;
    # a size that does not match the key named is caught as BAD_MAC once the key is known.
    if len(mac) not in _KNOWN_MAC_SIZES:
        raise _Malformed(f"{len(mac)} bytes after the body: no MAC is that long")
    message = Message(MsgType(type_), _decode_name(src, "src", 1), _decode_name(dst, "dst", 0),
                      generation, seq, rid, ack, _decode_body(bytes(body)), bool(flags & FLAG_NEWS))
    return _Parsed(message, key_id, bytes(data[:offset]), bytes(mac))


class Verifier:
    """Checks received datagrams for one node; keeps per-peer generation and replay marks."""

    def __init__(self, auth: Auth, node: str, nodes: Iterable[str], floors: Mapping[str, int] | None = None):
        self._auth = auth
        self._node = node
        self._nodes = frozenset(nodes)
        self._floors = dict(floors or {})
        self._generation: dict[str, int] = {}  # highest verified generation per src
        self._node_marks: dict[str, int] = {}  # highest verified seq per src, any link
        self._link_marks: dict[tuple[str, str], int] = {}  # highest verified seq per (src, link)
        self._authentic: dict[bytes, Message] = {}  # the last few datagrams whose MAC verified, as received
        # Per src: its last beat known authentic, with the key that signed it (see expect)
        self._beats: dict[str, tuple[bytes, AuthKey, Message]] = {}
        self._expected: dict[bytes, tuple[Message, AuthKey]] = {}  # routine beats to come (see expect)
        self.counters: collections.Counter[Verdict] = collections.Counter()

    def set_auth(self, auth: Auth) -> None:
        """Config reload: a new key set; generations and marks are kept."""
        self._auth = auth
        self._authentic.clear()  # signed with a key that may be gone
        self._beats.clear()
        self._expected.clear()

    def expect(self, count: int) -> dict[str, list[bytes]]:
        """Per peer, the routine beats it sends next (see `successor`), the `count` that follow its last beat known
        authentic, in seq order: from now on those very bytes verify without a parse or a MAC (a shell that reads
        in bulk can match them as bytes). Replaces what an earlier call expected. A beat that says something else,
        comes with another key or from another generation, is none of them and goes through every check."""
        self._expected = {}
        out: dict[str, list[bytes]] = {}
        for src, (data, key, msg) in self._beats.items():
            routine = dataclasses.replace(msg, news=False)
            datagrams = out[src] = []
            for seq in range(msg.seq + 1, min(msg.seq + count, _U64) + 1):
                datagram = successor(data, key, seq)
                self._expected[datagram] = (dataclasses.replace(routine, seq=seq), key)
                datagrams.append(datagram)
        return out

    def generations(self) -> dict[str, int]:
        """Highest generation per src, floors included, so persisting this never lowers a floor."""
        merged = dict(self._floors)
        for src, generation in self._generation.items():
            merged[src] = max(generation, merged.get(src, 0))
        return merged

    def verify(self, data: bytes, link: str) -> Verified:
        result = self._check(data, link)
        self.counters[result.verdict] += 1
        return result

    def _check(self, data: bytes, link: str) -> Verified:
        known = self._authentic.get(data)
        if known is not None:
            # The very bytes verified before, over another link (the peer sends each datagram over all): authentic
            # without parsing or a MAC again; whether it is fresh on this link is checked as for any other.
            return self._check_freshness(known, link)
        expected = self._expected.get(data)
        if expected is not None:  # a routine beat foreseen (expect): as authentic as one whose MAC was computed now
            return self._remember(bytes(data), expected[0], expected[1], link)
        try:
            parsed = _parse(data)
        except _Malformed as exc:
            return Verified(Verdict.MALFORMED, None, f"malformed datagram on {link}: {exc}")
        msg = parsed.message
        reason = self._not_ours(msg)
        if reason:
            return Verified(Verdict.NOT_OURS, None, f"{reason} on {link}")
        key = self._auth.key(parsed.key_id)
        if key is None or not _usable(key, self._auth.allow_insecure):
            return Verified(Verdict.UNKNOWN_KEY, None, f"unknown key {parsed.key_id} from {msg.src} on {link}")
        if not hmac.compare_digest(_mac(key, parsed.signed), parsed.mac):
            return Verified(Verdict.BAD_MAC, None, f"bad MAC from {msg.src} with key {key.id} on {link}")
        return self._remember(bytes(data), msg, key, link)

    def _remember(self, data: bytes, msg: Message, key: AuthKey, link: str) -> Verified:
        """An authentic datagram: kept for its copies over the other links, and a fresh beat as the base of the
        routine beats expected next (expect)."""
        if len(self._authentic) >= AUTHENTIC_KEPT:
            del self._authentic[next(iter(self._authentic))]  # the oldest
        self._authentic[data] = msg
        result = self._check_freshness(msg, link)
        if result.verdict is Verdict.OK and msg.type is MsgType.BEAT:
            self._beats[msg.src] = (data, key, msg)
        return result

    def _not_ours(self, msg: Message) -> str:
        if msg.src == self._node:
            return "our own datagram looped back"
        if msg.src not in self._nodes:
            return f"datagram from {msg.src!r}, not a cluster node"
        if msg.dst not in ("", self._node):
            return f"datagram from {msg.src} addressed to {msg.dst!r}"
        return ""

    def _check_freshness(self, msg: Message, link: str) -> Verified:
        src, generation, seq = msg.src, msg.generation, msg.seq
        known = self._generation.get(src, -1)
        floor = max(known, self._floors.get(src, 0))
        if generation < floor:
            return Verified(Verdict.STALE, None, f"stale generation {generation} from {src} (at {floor}) on {link}")
        if generation > known:
            self._restart(src, generation)
        if seq <= self._link_marks.get((src, link), -1):
            return Verified(Verdict.REPLAY, None, f"replayed seq {seq} from {src} on {link}")
        self._link_marks[(src, link)] = seq
        if seq <= self._node_marks.get(src, -1):
            return Verified(Verdict.DUPLICATE, msg, f"seq {seq} from {src} on {link}, already seen on another link")
        self._node_marks[src] = seq
        restarted = f", new generation {generation}" if generation > known else ""
        return Verified(Verdict.OK, msg, f"{msg.type.name.lower()} seq {seq} from {src} on {link}{restarted}")

    def _restart(self, src: str, generation: int) -> None:
        """A higher generation is a peer restart: its seq numbering starts over on every link."""
        self._generation[src] = generation
        self._node_marks.pop(src, None)
        for mark in [m for m in self._link_marks if m[0] == src]:
            del self._link_marks[mark]
