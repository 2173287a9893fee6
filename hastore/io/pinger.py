"""ICMP / ICMPv6 echo prober for ping nodes and ping groups.

Prefers unprivileged ICMP datagram sockets ("ping sockets": the kernel picks the identifier,
fills in checksums and hands each socket only the replies to its own identifier). They need
the caller's group inside ``net.ipv4.ping_group_range`` (which also governs ICMPv6), and that is
``1 0`` — disabled — by default and in every new network namespace, so as root we fall back to
raw sockets, which see all ICMP traffic: there we match our identifier and sequence ourselves.
Either way a reply counts only if its sequence is one we sent, to the address that answered.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import ipaddress
import random
import socket
import struct
from collections import OrderedDict
from collections.abc import Callable

from hastore.io.pump import raw_sockaddr
from hastore.io.transports import _TIMESPEC, LOCAL_DOWN, SO_TIMESTAMPNS, _stamp

ECHO_REQUEST = {socket.AF_INET: 8, socket.AF_INET6: 128}
ECHO_REPLY = {socket.AF_INET: 0, socket.AF_INET6: 129}
PROTO = {socket.AF_INET: socket.IPPROTO_ICMP, socket.AF_INET6: socket.IPPROTO_ICMPV6}
_HDR = struct.Struct("!BBHHH")  # type, code, checksum, identifier, sequence
PAYLOAD = b"hastore-ping"
SOL_RAW, ICMP_FILTER = 255, 1  # linux/icmp.h
ICMP6_FILTER = 1  # linux/icmpv6.h
SIOCGIFINDEX = 0x8933
OUTSTANDING = 4096  # sequences remembered for matching; older ones are forgotten


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


_STAMP_SPACE = socket.CMSG_SPACE(_TIMESPEC.size)


class _Prober:
    """One socket of one address family."""

    def __init__(self, family: socket.AddressFamily, prefer_dgram: bool) -> None:
        self.family = family
        self.sock, self.kind = self._socket(family, prefer_dgram)
        self.sock.setblocking(False)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)  # replies read late count from their arrival
        except OSError:
            pass  # then from their reading: later than the truth
        if self.kind == "raw":
            self._filter_echo_replies()
        if self.kind == "dgram":
            self.sock.bind(("0.0.0.0", 0) if family == socket.AF_INET else ("::", 0))
            self.ident = self.sock.getsockname()[1]  # the kernel uses the "port" as identifier
        else:
            self.ident = random.randrange(1, 0x10000)
        self.seq = random.randrange(0x10000)
        self.sent: OrderedDict[int, tuple[str, str]] = OrderedDict()  # seq -> (normalised, as given)

    @staticmethod
    def _socket(family: socket.AddressFamily, prefer_dgram: bool) -> tuple[socket.socket, str]:
        if prefer_dgram:
            try:
                return socket.socket(family, socket.SOCK_DGRAM, PROTO[family]), "dgram"
            except OSError:  # EACCES: our group is outside ping_group_range
                pass
        return socket.socket(family, socket.SOCK_RAW, PROTO[family]), "raw"

    def _filter_echo_replies(self) -> None:
        """Raw sockets see every ICMP message; let the kernel pass only echo replies (a bit set
        blocks that type). Best effort: matching below does not rely on it."""
        try:
            if self.family == socket.AF_INET:
                self.sock.setsockopt(SOL_RAW, ICMP_FILTER, struct.pack("=I", ~(1 << 0) & 0xFFFFFFFF))
            else:
                words = [0xFFFFFFFF] * 8
                words[129 >> 5] &= ~(1 << (129 & 31))
                self.sock.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, struct.pack("=8I", *words))
        except OSError:
            pass

    def ifindex(self, name: str) -> int:
        """The index of interface `name` as seen from this socket's network namespace (which
        socket.if_nametoindex, using a socket of its own in the caller's namespace, is not)."""
        res = fcntl.ioctl(self.sock.fileno(), SIOCGIFINDEX, struct.pack("16si", name.encode(), 0))
        return struct.unpack_from("16si", res)[1]

    def packet(self, address: str, normalised: str) -> tuple[bytes, bytes]:
        """The next echo request to `address`, remembered for matching its reply, and that reply's ICMP message
        (its checksum left 0: the beat pump compares all but that)."""
        self.seq = (self.seq + 1) & 0xFFFF
        header = _HDR.pack(ECHO_REQUEST[self.family], 0, 0, self.ident, self.seq)
        # The kernel computes it for ICMPv6 and for ping (dgram) sockets; only a raw IPv4 socket sends ours.
        csum = _checksum(header + PAYLOAD) if self.kind == "raw" and self.family == socket.AF_INET else 0
        packet = _HDR.pack(ECHO_REQUEST[self.family], 0, csum, self.ident, self.seq) + PAYLOAD
        self.sent[self.seq] = (normalised, address)
        while len(self.sent) > OUTSTANDING:
            self.sent.popitem(last=False)
        return packet, _HDR.pack(ECHO_REPLY[self.family], 0, 0, self.ident, self.seq) + PAYLOAD

    def ping(self, address: str, sockaddr: tuple, normalised: str) -> int:
        """Sends one echo request; 0, or the errno of a send that failed (no reply will come then)."""
        packet, _ = self.packet(address, normalised)
        try:
            self.sock.sendto(packet, sockaddr)
        except OSError as exc:  # unreachable, no buffer space, ...: no reply is the answer
            return exc.errno or -1
        return 0

    def replies(self) -> list[tuple[str, float | None]]:
        """(address as given, the kernel's receive time or None) of each matching reply waiting."""
        out: list[tuple[str, float | None]] = []
        for _ in range(64):
            try:
                data, ancillary, _flags, addr = self.sock.recvmsg(2048, _STAMP_SPACE)
            except OSError:  # nothing left (or a queued error): stop for now
                break
            got = self._match(data, addr[0])
            if got is not None:
                out.append((got, _stamp(ancillary)))
        return out

    def _match(self, data: bytes, source: str) -> str | None:
        if self.kind == "raw" and self.family == socket.AF_INET:
            if len(data) < 20:
                return None
            data = data[(data[0] & 0x0F) * 4 :]  # raw IPv4 sockets include the IP header
        if len(data) < _HDR.size:
            return None
        kind, _code, _csum, ident, seq = _HDR.unpack_from(data)
        if kind != ECHO_REPLY[self.family] or ident != self.ident:
            return None
        entry = self.sent.get(seq)
        if entry is None or entry[0] != _normalise(source):
            return None
        del self.sent[seq]
        return entry[1]

    def close(self) -> None:
        self.sock.close()


@functools.lru_cache(maxsize=256)
def _parse(address: str) -> tuple[str, int, str]:
    """(normalised address, IP version, scope) of a ping target; ValueError if it is not an address."""
    host, _, scope = address.partition("%")
    ip = ipaddress.ip_address(host)
    return str(ip), ip.version, scope


@functools.lru_cache(maxsize=256)
def _normalise(address: str) -> str:
    return str(ipaddress.ip_address(address.split("%")[0]))


class Pinger:
    """Sends echo requests, reports each matching reply as ``on_reply(address)``.

    `address` is handed back exactly as given to `ping` (e.g. ``fe80::1%eth1``).
    `modes` says which socket kind each family got ("dgram" or "raw"); a family that cannot be
    opened at all (no IPv6) is missing, and pinging such an address is silently a non-reply.
    """

    def __init__(self, *, prefer_dgram: bool = True) -> None:
        self._prefer_dgram = prefer_dgram
        self._probers: dict[socket.AddressFamily, _Prober] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_reply: Callable[[str], None] | None = None
        self.errors: list[str] = []  # why a family could not be opened
        self.unroutable: set[str] = set()  # addresses the last echo request could not be sent to (LOCAL_DOWN)
        self.on_route: Callable[[str, bool], None] | None = None  # hears (address, routable) when that changes

    @property
    def modes(self) -> dict[str, str]:
        return {("ipv4" if f == socket.AF_INET else "ipv6"): p.kind for f, p in self._probers.items()}

    async def open(self, on_reply: Callable[[str], None] | None = None) -> None:
        """With `on_reply`, replies are reported as they arrive. Without it the sockets are not watched and
        the caller collects replies with `drain()` (the daemon does so on its beat timer: one wake-up less
        per ping, and a reply only has to count within deadtime)."""
        self._on_reply = on_reply
        self._loop = asyncio.get_running_loop()
        for family in (socket.AF_INET, socket.AF_INET6):
            try:
                prober = _Prober(family, self._prefer_dgram)
            except OSError as exc:
                self.errors.append(f"{family.name}: cannot open an ICMP socket: {exc}")
                continue
            self._probers[family] = prober
            if on_reply is not None:
                self._loop.add_reader(prober.sock.fileno(), self._readable, prober)
        if not self._probers:
            raise OSError("cannot open any ICMP socket: " + "; ".join(self.errors))

    def drain(self) -> list[tuple[str, float | None]]:
        """Every matching reply received since the last call (non-blocking), with the kernel's receive time
        (CLOCK_REALTIME; None if the kernel gave none)."""
        out: list[tuple[str, float | None]] = []
        for prober in self._probers.values():
            out += prober.replies()
        return out

    def _target(self, address: str) -> tuple[_Prober, tuple, str] | None:
        """The prober, socket address and normalised address for a ping target; None when it cannot be pinged.
        Raises ValueError (not an address) or OSError (unknown scope interface)."""
        ip, version, scope = _parse(address)  # cached: pinged every keepalive
        family = socket.AF_INET6 if version == 6 else socket.AF_INET
        prober = self._probers.get(family)
        if prober is None:
            return None
        if family == socket.AF_INET6:
            scope_id = int(scope) if scope.isdigit() else prober.ifindex(scope) if scope else 0
            return prober, (ip, 0, 0, scope_id), ip
        return prober, (ip, 0), ip

    def prepare(self, address: str) -> tuple[int, bytes, bytes, bytes, bytes] | None:
        """For the beat pump: (socket fd, raw destination, echo request, its reply's ICMP message, the source the
        reply must come from) of the next ping to `address`, remembered like a ping sent; None if it cannot be."""
        try:
            target = self._target(address)
        except (ValueError, OSError):
            return None
        if target is None:
            return None
        prober, sockaddr, ip = target
        packet, reply = prober.packet(address, ip)
        return (prober.sock.fileno(), raw_sockaddr(prober.family, sockaddr), packet, reply,
                socket.inet_pton(prober.family, ip))

    def awaited(self, address: str, count: int) -> list[tuple[int, bytes, bytes]]:
        """For the beat pump: (socket fd, reply's ICMP message, source) of the last `count` echo requests to
        `address` not answered yet, whoever sent them: their replies may come while it reads the socket."""
        try:
            target = self._target(address)
        except (ValueError, OSError):
            return []
        if target is None:
            return []
        prober, _, ip = target
        source = socket.inet_pton(prober.family, ip)
        seqs = [seq for seq, (_, given) in reversed(prober.sent.items()) if given == address][:count]
        return [(prober.sock.fileno(), _HDR.pack(ECHO_REPLY[prober.family], 0, 0, prober.ident, seq) + PAYLOAD,
                 source) for seq in seqs]

    def ping(self, address: str) -> None:
        try:
            target = self._target(address)
            if target is None:
                return
            prober, sockaddr, ip = target
            failed = prober.ping(address, sockaddr, ip)
        except (ValueError, OSError):  # not an address, unknown scope interface
            return
        unroutable = failed in LOCAL_DOWN
        if unroutable != (address in self.unroutable):
            (self.unroutable.add if unroutable else self.unroutable.discard)(address)
            if self.on_route is not None:
                self.on_route(address, not unroutable)

    def _readable(self, prober: _Prober) -> None:
        for address, _ in prober.replies():
            if self._on_reply is not None:
                self._on_reply(address)

    def close(self) -> None:
        for prober in self._probers.values():
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(prober.sock.fileno())
            prober.close()
        self._probers.clear()
