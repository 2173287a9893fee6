"""The beat pump's Python side: the one interface to hastore._pump (a thread in C), and what it hands back.

While the engine is calm it hands its routine beats to the shell for a stretch at once (Engine.plan). The pump
sends them at their due times, reads the quiet links and the ICMP sockets, and matches what comes against what
the plan expects (the peer's routine beats, byte for byte; echo replies of the pings it sent), moving each
watched silence's deadline on with every match. It wakes the daemon (an eventfd) only when the plan ends, a
watched silence passes, an input comes that was not expected, a send fails, or a beat is found late (the process
was stopped). The daemon then stops it and feeds the engine what it matched, newest per link, before anything
else. Without the compiled module (no C compiler at install time) `available()` is False and the daemon wakes on
every beat tick as before.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

try:
    from hastore import _pump
except ImportError:  # built optionally (setup.py)
    _pump = None

DGRAM, STREAM, ICMP = 0, 1, 2  # kinds of input, as hastore._pump numbers them


def available() -> bool:
    return _pump is not None


@dataclass(frozen=True)
class Taken:
    """What a stopped pump hands back."""

    sent: int  # planned beats sent, counted from the first
    last_pet: float | None  # monotonic seconds of the last pet it wrote on the guard's page
    matches: list[tuple[int, float]]  # (expect index, arrival in monotonic seconds): the newest per watch
    others: list[tuple[int, bytes, float]]  # (input index, bytes, when read or received) it did not expect
    why: str  # why it stopped on its own, or "stopped"
    failed: tuple[int, int] | None = None  # (output index, errno) of the first send that failed


class Pump:
    def __init__(self) -> None:
        if _pump is None:
            raise RuntimeError("hastore._pump is not built")
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._native = _pump.Pump(self.wake_fd)
        self.running = False

    def start(self, outputs: list[tuple[float, int, int, bytes | None, bytes]], inputs: list[tuple[int, int]],
              expects: list[tuple[int, int, int, bytes, bytes | None]], watches: list[tuple[float, float]],
              until: float, late: float, pet_fd: int | None, tags: int) -> None:
        """outputs: (due, beat index, fd, raw sockaddr or None to write(), bytes), in due order; inputs: (fd, kind);
        expects: (input index, watch index, tag, bytes, source address bytes for ICMP or None); watches: (deadline,
        extend). A stream's match takes the arrival of the datagram matched with the same tag, if any."""
        ns = _ns
        self._native.start([(ns(d), b, fd, a, data) for d, b, fd, a, data in outputs], inputs, expects,
                           [(ns(d), ns(e)) for d, e in watches], ns(until), ns(late),
                           -1 if pet_fd is None else pet_fd, tags)
        self.running = True

    def stop(self) -> Taken:
        sent, pet, matches, others, why, failed, errno = self._native.stop()
        self.running = False
        try:
            os.eventfd_read(self.wake_fd)
        except BlockingIOError:
            pass
        return Taken(sent, pet / 1e9 if pet else None, [(e, t / 1e9) for e, t in matches],
                     [(i, d, t / 1e9) for i, d, t in others], why, (failed, errno) if failed >= 0 else None)

    def close(self) -> None:
        self._native.close()
        os.close(self.wake_fd)


def _ns(seconds: float) -> int:
    return round(seconds * 1e9)


def raw_sockaddr(family: int, address: tuple) -> bytes:
    """A struct sockaddr_in / sockaddr_in6 for a Python socket address tuple, as the pump's sendto() takes it."""
    if family == socket.AF_INET:
        return struct.pack("=HH4s8x", socket.AF_INET, socket.htons(address[1]), socket.inet_aton(address[0]))
    flow, scope = (address[2], address[3]) if len(address) == 4 else (0, 0)
    return struct.pack("=HHI16sI", socket.AF_INET6, socket.htons(address[1]), socket.htonl(flow),
                       socket.inet_pton(socket.AF_INET6, address[0]), scope)
