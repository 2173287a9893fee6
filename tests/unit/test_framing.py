"""Serial framing: encode/decode, garbage, corruption, resync, and properties over random streams."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hastore.core.framing import MAX_FRAME, MAX_PAYLOAD, START, FrameDecoder, encode_frame


def feed_all(dec: FrameDecoder, chunks) -> list[bytes]:
    out: list[bytes] = []
    for c in chunks:
        out.extend(dec.feed(c))
    return out


def test_layout():
    f = encode_frame(b"abc")
    assert f[:2] == START
    assert struct.unpack(">H", f[2:4]) == (3,)
    assert f[4:7] == b"abc"
    assert struct.unpack(">I", f[7:]) == (zlib.crc32(f[2:7]),)


def test_roundtrip_empty_and_max():
    dec = FrameDecoder()
    big = bytes(range(256)) * (MAX_PAYLOAD // 256)
    assert dec.feed(encode_frame(b"") + encode_frame(big)) == [b"", big]
    assert dec.garbage_bytes == 0 and dec.bad_frames == 0 and dec.pending == 0


def test_oversized_payload_is_our_bug():
    with pytest.raises(ValueError, match="exceeds"):
        encode_frame(b"x" * (MAX_PAYLOAD + 1))


def test_byte_by_byte():
    stream = encode_frame(b"hello") + encode_frame(START * 3) + encode_frame(b"world")
    dec = FrameDecoder()
    out = feed_all(dec, (stream[i : i + 1] for i in range(len(stream))))
    assert out == [b"hello", START * 3, b"world"]
    assert dec.garbage_bytes == 0 and dec.pending == 0


def test_garbage_before_between_and_after():
    dec = FrameDecoder()
    out = dec.feed(b"noise\x7e" + encode_frame(b"a") + b"\xa5\x00junk" + encode_frame(b"b") + b"tail")
    assert out == [b"a", b"b"]
    assert dec.garbage_bytes == len(b"noise\x7e") + len(b"\xa5\x00junk") + len(b"tail")
    assert dec.bad_frames == 0


def test_trailing_start_byte_is_held_not_counted():
    dec = FrameDecoder()
    assert dec.feed(b"xx\x7e") == []
    assert dec.garbage_bytes == 2 and dec.pending == 1
    frame = encode_frame(b"p")
    assert dec.feed(frame[1:]) == [b"p"]  # the held 7e was the frame's first byte


def test_corrupted_frame_then_good_one():
    bad = bytearray(encode_frame(b"payload-one"))
    bad[6] ^= 0xFF
    dec = FrameDecoder()
    assert dec.feed(bytes(bad) + encode_frame(b"payload-two")) == [b"payload-two"]
    assert dec.bad_frames == 1
    assert dec.garbage_bytes == len(bad)


def test_truncated_frame_swallowing_the_next_is_recovered():
    # A frame cut short: its length field claims bytes that belong to the next frame.
    cut = encode_frame(b"x" * 40)[:20]
    dec = FrameDecoder()
    out = feed_all(dec, [cut, encode_frame(b"next"), encode_frame(b"y" * 30)])
    assert out == [b"next", b"y" * 30]
    assert dec.bad_frames == 1


def test_bogus_huge_length():
    dec = FrameDecoder()
    out = dec.feed(START + b"\xff\xff" + b"rest" + encode_frame(b"ok"))
    assert out == [b"ok"]
    assert dec.bad_frames == 1
    assert dec.pending == 0


def test_buffer_is_bounded_while_waiting():
    dec = FrameDecoder()
    dec.feed(START + struct.pack(">H", MAX_PAYLOAD) + b"z" * (MAX_PAYLOAD + 3))
    assert dec.pending == MAX_FRAME - 1
    assert dec.feed(b"\x00") == []  # CRC fails now that the frame is complete
    assert dec.bad_frames == 1 and dec.pending == 0


payloads = st.lists(st.binary(max_size=300), max_size=8)
# Noise that never contains the first START byte cannot begin a false frame.
clean_noise = st.binary(max_size=40).map(lambda b: b.replace(START[:1], b""))
any_noise = st.binary(max_size=40)


def build(frames, noise) -> bytes:
    parts = [noise[0]]
    for f, n in zip(frames, noise[1:]):
        parts += [encode_frame(f), n]
    return b"".join(parts)


def chunked(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts})
    edges = [0, *points, len(stream)]
    return [stream[a:b] for a, b in zip(edges, edges[1:])]


@settings(max_examples=300)
@given(frames=payloads, data=st.data(), cuts=st.lists(st.integers(min_value=0), max_size=30))
def test_clean_noise_any_chunking_yields_every_frame_in_order(frames, data, cuts):
    noise = data.draw(st.lists(clean_noise, min_size=len(frames) + 1, max_size=len(frames) + 1))
    stream = build(frames, noise)
    dec = FrameDecoder()
    assert feed_all(dec, chunked(stream, cuts)) == frames
    assert dec.garbage_bytes == sum(map(len, noise))
    assert dec.bad_frames == 0


@settings(max_examples=300)
@given(frames=payloads, data=st.data(), cuts=st.lists(st.integers(min_value=0), max_size=30))
def test_arbitrary_noise_yields_every_frame_once_the_line_keeps_going(frames, data, cuts):
    """Noise may hold false STARTs (even a START followed by a plausible length). Such a false
    frame delays the frames behind it until its CRC can be checked, so the line must keep going:
    we append MAX_FRAME bytes of filler without a START byte. A false frame that passes its CRC
    needs a 1-in-2**32 accident, which random noise does not produce."""
    noise = data.draw(st.lists(any_noise, min_size=len(frames) + 1, max_size=len(frames) + 1))
    stream = build(frames, noise) + b"\x00" * MAX_FRAME
    dec = FrameDecoder()
    assert feed_all(dec, chunked(stream, cuts)) == frames
    assert dec.pending == 0
    assert dec.garbage_bytes + sum(len(encode_frame(f)) for f in frames) == len(stream)


@settings(max_examples=500)
@given(chunks=st.lists(st.binary(max_size=200), max_size=20))
def test_random_bytes_never_raise_and_stay_bounded(chunks):
    dec = FrameDecoder()
    for c in chunks:
        for p in dec.feed(c):
            assert len(p) <= MAX_PAYLOAD
        assert dec.pending < MAX_FRAME


@settings(max_examples=300)
@given(chunks=st.lists(st.binary(max_size=64).map(lambda b: START + b), max_size=20))
def test_start_heavy_noise_never_raises(chunks):
    dec = FrameDecoder()
    for c in chunks:
        dec.feed(c)
    assert dec.pending < MAX_FRAME
