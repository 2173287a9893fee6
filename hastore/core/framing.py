"""Frames for byte streams (the serial heartbeat line). Pure: no I/O.

A frame is::

    START (2 bytes, 7e a5) | length (u16 big-endian) | payload | CRC32 (u32 big-endian) of length+payload

The decoder is fed whatever the line delivered and returns the payloads of the frames that
checked out. It never raises on input: garbage is skipped and counted, and after a bad frame
(bogus length or CRC mismatch) it resynchronises by scanning for the next START from the byte
after the bad START, so a good frame that was swallowed by a bogus length still comes out.

Limit, inherent to length-prefixed framing: a false START inside line noise whose length field
is plausible (<= MAX_PAYLOAD) holds back the frames behind it until enough bytes have arrived to
check that false frame's CRC (at most ``MAX_FRAME - 1`` bytes). On a heartbeat line, which
keeps sending, that is a delay of a few frames, not a loss. The buffer never holds more than
``MAX_FRAME - 1`` bytes between calls.
"""

from __future__ import annotations

import struct
import zlib

START = b"\x7e\xa5"
MAX_PAYLOAD = 2048
_LEN = struct.Struct(">H")
_CRC = struct.Struct(">I")
HEADER_SIZE = len(START) + _LEN.size
TRAILER_SIZE = _CRC.size
MAX_FRAME = HEADER_SIZE + MAX_PAYLOAD + TRAILER_SIZE


def encode_frame(payload: bytes) -> bytes:
    """Wrap one payload in a frame. A payload over MAX_PAYLOAD is our own bug: raise."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"frame payload of {len(payload)} bytes exceeds the maximum of {MAX_PAYLOAD}")
    body = _LEN.pack(len(payload)) + bytes(payload)
    return START + body + _CRC.pack(zlib.crc32(body))


class FrameDecoder:
    """Turns a byte stream into payloads.

    Every byte fed ends up either in a returned payload's frame or counted in `garbage_bytes`
    (the bytes of a bad frame are counted as garbage as they are rescanned); `bad_frames`
    counts STARTs whose length or CRC did not check out.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.garbage_bytes = 0
        self.bad_frames = 0

    @property
    def pending(self) -> int:
        """Bytes held back waiting for the rest of a frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        out: list[bytes] = []
        pos = 0
        while True:
            start = buf.find(START, pos)
            if start < 0:
                # Everything left is garbage, except a last byte that may begin a START.
                end = len(buf) - 1 if len(buf) > pos and buf[-1] == START[0] else len(buf)
                self.garbage_bytes += end - pos
                pos = end
                break
            self.garbage_bytes += start - pos
            pos = start
            if len(buf) - pos < HEADER_SIZE:
                break
            (length,) = _LEN.unpack_from(buf, pos + len(START))
            if length > MAX_PAYLOAD:
                pos = self._reject(pos)
                continue
            end = pos + HEADER_SIZE + length
            if len(buf) < end + TRAILER_SIZE:
                break
            (crc,) = _CRC.unpack_from(buf, end)
            if zlib.crc32(buf[pos + len(START) : end]) != crc:
                pos = self._reject(pos)
                continue
            out.append(bytes(buf[pos + HEADER_SIZE : end]))
            pos = end + TRAILER_SIZE
        del buf[:pos]
        return out

    def _reject(self, pos: int) -> int:
        """A bad frame at `pos`: count it, drop its first byte, rescan from the next one."""
        self.bad_frames += 1
        self.garbage_bytes += 1
        return pos + 1
