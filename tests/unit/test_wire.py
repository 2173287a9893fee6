"""The wire format and its verifier: round trips, every verdict, check order, and fuzzing."""

from __future__ import annotations

import copy
import dataclasses
import hmac
import json
import struct

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hastore.config.model import Auth, AuthAlgorithm, AuthKey
from hastore.core.wire import (
    FLAG_NEWS,
    FLAGS_OFFSET,
    MAX_DATAGRAM,
    Message,
    MsgType,
    Verdict,
    Verifier,
    _mac,
    encode,
    signing_key,
    successor,
)

ME, PEER = "node1", "node2"
KEY1 = AuthKey(1, AuthAlgorithm.SHA256, b"secret-one")
KEY2 = AuthKey(2, AuthAlgorithm.SHA1, b"secret-two")
ALL_KEYS = (KEY1, KEY2, AuthKey(3, AuthAlgorithm.MD5, b"three"), AuthKey(4, AuthAlgorithm.CRC, b""))
AUTH = Auth(keys=ALL_KEYS, active_key=1, allow_insecure=True)
BEAT_BODY = {"st": "active", "g": ["group1"], "p": 1, "e": 123456789}
ACCEPTED = {Verdict.OK, Verdict.DUPLICATE}


def beat(seq: int = 1, generation: int = 7, src: str = PEER, dst: str = "", body: dict = BEAT_BODY) -> Message:
    return Message(MsgType.BEAT, src, dst, generation, seq, body=body)


def sign(msg: Message, key: AuthKey = KEY1) -> bytes:
    return encode(msg, key, allow_insecure=True)


def verifier(auth: Auth = AUTH, floors: dict[str, int] | None = None) -> Verifier:
    return Verifier(auth, ME, (ME, PEER), floors)


def with_body(raw_body: bytes) -> bytes:
    """A datagram around an arbitrary body, correctly signed with KEY1, to reach the JSON checks."""
    prefix = sign(beat(body={}))[: 30 + 1 + len(PEER) + 1]
    signed = prefix + struct.pack(">H", len(raw_body)) + raw_body
    return signed + hmac.new(KEY1.secret, signed, "sha256").digest()


# --- round trips and encoding ----------------------------------------------------------------


@settings(max_examples=300)
@given(st.sampled_from([AuthAlgorithm.SHA256, AuthAlgorithm.SHA1, AuthAlgorithm.MD5]),
       st.binary(min_size=1, max_size=200), st.binary(max_size=600))
@example(AuthAlgorithm.SHA256, b"k" * 65, b"beat")  # longer than a block: the key is hashed first
@example(AuthAlgorithm.MD5, b"k" * 64, b"")  # exactly a block
def test_the_mac_is_standard_hmac(algorithm: AuthAlgorithm, secret: bytes, signed: bytes) -> None:
    """The MAC (the key's pads hashed once, see wire._pads) is RFC 2104 HMAC, for keys shorter and longer than
    a hash block, and stays so when the same key signs again (the cached pads are copied, never changed)."""
    name = {AuthAlgorithm.SHA256: "sha256", AuthAlgorithm.SHA1: "sha1", AuthAlgorithm.MD5: "md5"}[algorithm]
    key = AuthKey(9, algorithm, secret)
    assert _mac(key, signed) == hmac.new(secret, signed, name).digest()
    assert _mac(key, signed + b"x") == hmac.new(secret, signed + b"x", name).digest()
    data = encode(beat(), key)
    assert verifier(Auth(keys=(key,), active_key=9)).verify(data, "eth1").verdict is Verdict.OK


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2, 2) | st.sampled_from([0.0, -0.0, 1.0, 2.5])
                     | st.sampled_from(["", "a", "é"]),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from("abc"), inner, max_size=3),
                     max_leaves=8)


@settings(max_examples=300)
@given(st.lists(st.dictionaries(st.sampled_from(["e", "g", "p", "st"]), _JSON, max_size=4), min_size=2, max_size=4))
@example([{"p": 1}, {"p": True}, {"p": 1.0}, {"p": 1}])  # equal in Python, three different JSON texts
@example([{"x": 0.0}, {"x": -0.0}])
def test_each_body_is_encoded_as_itself(bodies: list[dict]) -> None:
    """Encoding remembers the last body's bytes for the routine beats that repeat it; any body that differs in
    value or in JSON type gets its own bytes, and a body changed after encoding does not change the next."""
    for body, after in zip(bodies, bodies[1:] + [{}]):
        expected = json.dumps(body, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()
        data = encode(beat(body=body), KEY1)
        assert data[-32 - len(expected) - 2:-32] == struct.pack(">H", len(expected)) + expected
        body.clear()
        body.update(copy.deepcopy(after))  # the caller's dict changed after encoding, into the next body


@pytest.mark.parametrize("key", ALL_KEYS, ids=lambda k: k.algorithm.value)
def test_round_trip_each_algorithm(key: AuthKey) -> None:
    msg = Message(MsgType.ACK, PEER, ME, 3, 9, rid=0, ack=42, body={"x": [1, 2.5, None, True, "é"]})
    result = verifier().verify(sign(msg, key), "eth1")
    assert result.verdict is Verdict.OK, result.detail
    assert result.message == msg


def test_typical_beat_is_small() -> None:
    data = encode(Message(MsgType.BEAT, "node1", "", 1, 1, body=BEAT_BODY), KEY1)
    assert len(data) < 160


@pytest.mark.parametrize(
    "change",
    [
        {"src": ""},
        {"src": "x" * 65},
        {"dst": "y" * 65},
        {"src": "\udc80"},
        {"generation": -1},
        {"seq": 2**64},
        {"rid": 2**32},
        {"ack": -1},
        {"type": 9},
        {"body": {"k": object()}},
        {"body": {1: "int key"}},
        {"body": {"nan": float("nan")}},
        {"body": {"big": "x" * MAX_DATAGRAM}},
    ],
)
def test_encode_rejects_out_of_range(change: dict) -> None:
    with pytest.raises(ValueError):
        sign(dataclasses.replace(beat(), **change))


def test_crc_needs_allow_insecure() -> None:
    crc = ALL_KEYS[3]
    with pytest.raises(ValueError):
        encode(beat(), crc)
    strict = Auth(keys=ALL_KEYS, active_key=4)
    assert verifier(strict).verify(sign(beat(), crc), "l").verdict is Verdict.UNKNOWN_KEY
    with pytest.raises(ValueError):
        signing_key(strict)
    assert signing_key(AUTH) == KEY1
    with pytest.raises(ValueError):
        signing_key(Auth(keys=(KEY1,), active_key=5))


# --- every verdict, and the order of checks --------------------------------------------------


GOOD = sign(beat())
MALFORMED_CASES = {
    "empty": b"",
    "short": GOOD[:29],
    "magic": b"XX" + GOOD[2:],
    "version": GOOD[:2] + b"\x02" + GOOD[3:],
    "type": GOOD[:3] + b"\x09" + GOOD[4:],
    "reserved flag": GOOD[:5] + b"\x02" + GOOD[6:],
    "trailing byte": GOOD + b"\0",
    "truncated MAC": GOOD[:-1],
    "src length": GOOD[:30] + b"\x40" + GOOD[31:],
    "oversized": b"x" * (MAX_DATAGRAM + 1),
    "body not object": with_body(b"[1]"),
    "body not utf-8": with_body(b"\xff"),
    "body not json": with_body(b"{"),
    "body NaN": with_body(b'{"a":NaN}'),
    "body deeply nested": with_body(b'{"a":' + b"[" * 1300),
}


@pytest.mark.parametrize("data", MALFORMED_CASES.values(), ids=MALFORMED_CASES.keys())
def test_malformed(data: bytes) -> None:
    assert verifier().verify(data, "l").verdict is Verdict.MALFORMED


def test_the_news_flag_is_signed_and_read_back() -> None:
    from dataclasses import replace
    news = sign(replace(beat(), news=True))
    assert news[FLAGS_OFFSET] == FLAG_NEWS and GOOD[FLAGS_OFFSET] == 0
    v = verifier().verify(news, "l")
    assert v.verdict is Verdict.OK and v.message.news is True
    assert verifier().verify(GOOD, "l").message.news is False
    # set or cleared by someone on the way, it no longer matches the MAC
    assert verifier().verify(GOOD[:5] + b"\x01" + GOOD[6:], "l").verdict is Verdict.BAD_MAC
    assert verifier().verify(news[:5] + b"\x00" + news[6:], "l").verdict is Verdict.BAD_MAC


@pytest.mark.parametrize("msg", [beat(src=ME), beat(src="stranger"), beat(dst="node3")])
def test_not_ours(msg: Message) -> None:
    assert verifier().verify(sign(msg), "l").verdict is Verdict.NOT_OURS


def test_unknown_key_precedes_bad_mac_and_not_ours_precedes_unknown_key() -> None:
    only2 = Auth(keys=(KEY2,), active_key=2)
    forged = sign(beat())[:-1] + b"\0"
    assert verifier(only2).verify(forged, "l").verdict is Verdict.UNKNOWN_KEY
    assert verifier(only2).verify(sign(beat(src=ME)), "l").verdict is Verdict.NOT_OURS


def test_bad_mac_with_wrong_secret_and_wrong_algorithm() -> None:
    wrong_secret = dataclasses.replace(KEY1, secret=b"guess")
    result = verifier().verify(sign(beat(), wrong_secret), "l")
    assert (result.verdict, result.message) == (Verdict.BAD_MAC, None)
    assert result.detail == "bad MAC from node2 with key 1 on l"
    wrong_algorithm = dataclasses.replace(KEY1, algorithm=AuthAlgorithm.MD5)
    assert verifier().verify(sign(beat(), wrong_algorithm), "l").verdict is Verdict.BAD_MAC


def test_forged_high_seq_does_not_move_the_mark() -> None:
    v = verifier()
    forged = sign(beat(seq=1000, generation=99), dataclasses.replace(KEY1, secret=b"forged"))
    assert v.verify(forged, "l").verdict is Verdict.BAD_MAC
    assert v.verify(sign(beat(seq=5)), "l").verdict is Verdict.OK
    assert v.generations() == {PEER: 7}


def test_replay_then_duplicate_on_second_link() -> None:
    v, data = verifier(), sign(beat(seq=5))
    assert v.verify(data, "a").verdict is Verdict.OK
    assert v.verify(data, "a").verdict is Verdict.REPLAY
    dup = v.verify(data, "b")
    assert dup.verdict is Verdict.DUPLICATE and dup.message == beat(seq=5)
    assert v.verify(data, "b").verdict is Verdict.REPLAY
    assert v.verify(sign(beat(seq=4)), "c").verdict is Verdict.DUPLICATE
    assert v.verify(sign(beat(seq=6)), "b").verdict is Verdict.OK
    assert v.counters == {Verdict.OK: 2, Verdict.REPLAY: 2, Verdict.DUPLICATE: 2}


def test_peer_restart_resets_marks_and_makes_old_generation_stale() -> None:
    v = verifier()
    old = sign(beat(seq=50, generation=7))
    assert v.verify(old, "a").verdict is Verdict.OK
    restarted = v.verify(sign(beat(seq=1, generation=8)), "b")
    assert restarted.verdict is Verdict.OK and "new generation 8" in restarted.detail
    assert v.verify(sign(beat(seq=1, generation=8)), "a").verdict is Verdict.DUPLICATE
    assert v.verify(old, "c").verdict is Verdict.STALE
    assert v.generations() == {PEER: 8}


def test_floors_reject_older_generations_and_are_kept() -> None:
    v = verifier(floors={PEER: 7, "gone": 3})
    assert v.verify(sign(beat(generation=6)), "l").verdict is Verdict.STALE
    assert v.verify(sign(beat(generation=7)), "l").verdict is Verdict.OK
    assert v.generations() == {PEER: 7, "gone": 3}


def test_stale_checked_after_mac() -> None:
    v = verifier(floors={PEER: 7})
    forged = sign(beat(generation=1), dataclasses.replace(KEY1, secret=b"x"))
    assert v.verify(forged, "l").verdict is Verdict.BAD_MAC


def test_key_rotation_and_reload_keep_marks() -> None:
    both = verifier(Auth(keys=(KEY1, KEY2), active_key=2))
    assert both.verify(sign(beat(seq=1), KEY1), "l").verdict is Verdict.OK
    assert both.verify(sign(beat(seq=2), KEY2), "l").verdict is Verdict.OK
    both.set_auth(Auth(keys=(KEY2,), active_key=2))
    assert both.verify(sign(beat(seq=3), KEY1), "l").verdict is Verdict.UNKNOWN_KEY
    assert both.verify(sign(beat(seq=2), KEY2), "l").verdict is Verdict.REPLAY


# --- properties ------------------------------------------------------------------------------

names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=16).filter(lambda s: s != ME)
finite_floats = st.floats(allow_nan=False, allow_infinity=False)
scalars = st.none() | st.booleans() | st.integers() | finite_floats | st.text(max_size=20)
bodies = st.dictionaries(st.text(max_size=8), scalars | st.lists(scalars, max_size=3), max_size=5)
messages = st.builds(Message, st.sampled_from(MsgType), names, st.sampled_from(["", ME]),
                     st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
                     st.integers(0, 2**32 - 1), bodies)
keys = st.sampled_from(ALL_KEYS)


def fresh_for(msg: Message) -> Verifier:
    return Verifier(AUTH, ME, (ME, msg.src))


@given(messages, keys)
def test_property_round_trip(msg: Message, key: AuthKey) -> None:
    result = fresh_for(msg).verify(sign(msg, key), "l")
    assert (result.verdict, result.message) == (Verdict.OK, msg)


@settings(max_examples=300)
@given(st.binary(max_size=MAX_DATAGRAM + 20) | st.binary().map(lambda b: b"HA\x01\x01\x01\x00" + b))
def test_property_random_bytes_never_raise(data: bytes) -> None:
    assert verifier().verify(data, "l").verdict not in ACCEPTED


@given(st.binary(max_size=1300))
def test_property_random_body_never_raises(raw_body: bytes) -> None:
    assert verifier().verify(with_body(raw_body), "l").verdict in {Verdict.MALFORMED, Verdict.OK}


@given(messages, keys, st.data())
def test_property_single_bit_flip_never_accepted(msg: Message, key: AuthKey, data: st.DataObject) -> None:
    datagram = bytearray(sign(msg, key))
    bit = data.draw(st.integers(0, len(datagram) * 8 - 1))
    datagram[bit // 8] ^= 1 << (bit % 8)
    assert fresh_for(msg).verify(bytes(datagram), "l").verdict not in ACCEPTED


@given(messages, keys, st.data())
def test_property_truncation_or_extension_never_accepted(msg: Message, key: AuthKey, data: st.DataObject) -> None:
    datagram = sign(msg, key)
    cut = data.draw(st.integers(0, len(datagram) - 1))
    tail = data.draw(st.binary(min_size=1, max_size=40))
    assert fresh_for(msg).verify(datagram[:cut], "l").verdict not in ACCEPTED
    assert fresh_for(msg).verify(datagram + tail, "l").verdict not in ACCEPTED


@given(messages, keys)
def test_property_replay_and_duplicate(msg: Message, key: AuthKey) -> None:
    v, datagram = fresh_for(msg), sign(msg, key)
    verdicts = [v.verify(datagram, link).verdict for link in ("a", "a", "b", "b")]
    assert verdicts == [Verdict.OK, Verdict.REPLAY, Verdict.DUPLICATE, Verdict.REPLAY]


@given(messages, st.integers(1, 2**32))
def test_property_restart_makes_earlier_generation_stale(msg: Message, bump: int) -> None:
    old = dataclasses.replace(msg, generation=msg.generation % 2**63)
    new = dataclasses.replace(old, generation=old.generation + bump, seq=0)
    v = fresh_for(msg)
    assert v.verify(sign(new), "a").verdict is Verdict.OK
    assert v.verify(sign(old), "b").verdict is Verdict.STALE
    assert Verifier(AUTH, ME, (ME, msg.src), v.generations()).verify(sign(old), "a").verdict is Verdict.STALE


# --- routine beats foreseen (Verifier.expect) --------------------------------------------------


@settings(max_examples=100)
@given(st.sampled_from((KEY1, KEY2, ALL_KEYS[2])), st.integers(0, 2**40), st.integers(1, 2**40),
       st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=8)), max_size=4))
def test_property_successor_is_the_routine_beat_the_sender_encodes(key: AuthKey, generation: int, seq: int,
                                                                    body: dict) -> None:
    news = sign(dataclasses.replace(beat(seq, generation, body=body), news=True), key)
    for later in (seq + 1, seq + 7):
        assert successor(news, key, later) == sign(beat(later, generation, body=body), key)


def test_expected_beats_verify_without_a_mac_and_a_forgery_of_one_still_fails(monkeypatch) -> None:
    v = verifier()
    assert v.verify(sign(dataclasses.replace(beat(10), news=True)), "eth") .verdict is Verdict.OK
    expected = v.expect(3)
    assert expected == {PEER: [sign(beat(s)) for s in (11, 12, 13)]}

    def no_mac(*_):
        raise AssertionError("an expected beat needs no MAC")
    monkeypatch.setattr("hastore.core.wire._mac", no_mac)
    got = v.verify(expected[PEER][1], "eth")  # seq 12: one lost on the way is no reason to doubt the next
    assert (got.verdict, got.message.seq, got.message.news) == (Verdict.OK, 12, False)
    assert v.verify(expected[PEER][1], "serial").verdict is Verdict.DUPLICATE  # its copy over the other link
    assert v.verify(expected[PEER][1], "eth").verdict is Verdict.REPLAY
    assert v.verify(expected[PEER][0], "eth").verdict is Verdict.REPLAY  # 11, older than the 12 taken
    monkeypatch.undo()
    forged = bytearray(expected[PEER][2])
    forged[-1] ^= 1
    assert v.verify(bytes(forged), "eth").verdict is Verdict.BAD_MAC


def test_expectations_follow_the_last_authentic_beat_and_end_with_a_restart_or_new_keys() -> None:
    v = verifier()
    v.verify(sign(beat(10)), "eth")
    v.verify(v.expect(2)[PEER][1], "eth")  # seq 12, taken as expected: the base of what is expected next
    assert v.expect(1) == {PEER: [sign(beat(13))]}
    other = {**BEAT_BODY, "g": []}
    v.verify(sign(dataclasses.replace(beat(14, body=other), news=True)), "eth")  # the peer's state changed
    assert v.expect(1) == {PEER: [sign(beat(15, body=other))]}
    old = v.expect(2)[PEER]
    v.verify(sign(beat(1, generation=8)), "eth")  # the peer restarted: its old generation's beats are stale
    assert v.verify(old[1], "eth").verdict is Verdict.STALE
    v.verify(sign(beat(2, generation=8)), "eth")
    following = v.expect(1)[PEER]
    v.set_auth(Auth(keys=(KEY2,), active_key=2))  # key 1 is gone: what it signed is no longer expected
    assert v.expect(1) == {} and v.verify(following[0], "eth").verdict is Verdict.UNKNOWN_KEY


def test_acknowledgements_and_requests_are_not_the_base_of_expectations() -> None:
    v = verifier()
    v.verify(sign(beat(10)), "eth")
    v.verify(sign(Message(MsgType.ACK, PEER, ME, 7, 11, ack=3)), "eth")
    assert v.expect(1) == {PEER: [sign(beat(11))]}  # the beat's successor, though the ACK took 11 (a REPLAY then)
