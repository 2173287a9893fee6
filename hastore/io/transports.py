"""Heartbeat transports: one object per configured `Link` (UDP ucast/bcast/mcast, serial).

Each transport hands every received datagram or frame to ``on_packet(link.id, data, at, late)`` and
reports trouble as a sentence through ``on_error(link.id, sentence)``. `send` never blocks and
never raises for transient trouble (no route, no buffer space, interface down, serial line gone):
the trouble is reported once per distinct sentence until a send succeeds again. Deciding whether
a packet is genuine, or our own echo on bcast/mcast, is the verifier's job, not ours.

Quiet mode (``open(..., quiet=True)``, what the daemon uses): waking up costs more than anything a beat
asks of us, so routine beats do not wake the process. A UDP link then has two sockets on its port: the
kernel steers datagrams with the wire's FLAG_NEWS set (every message that is not a routine beat) to one
the event loop watches, and routine beats to one nobody watches, which the daemon drains on its own beat
timer (`drain`). Both sockets stamp datagrams with the kernel's receive time (SO_TIMESTAMPNS), handed on
as `at`, so liveness is measured to the arrival, not to the reading. Steering is a classic BPF program on
the port's SO_REUSEPORT group (unicast) plus a filter on each socket (broadcast and multicast, where each
socket gets a copy); where the kernel refuses either, the link falls back to one watched socket. A quiet
serial line is read only by `drain` (late=True: when a frame came is not known, see Engine._arrival);
`set_quiet(False)` watches it again (the daemon does that while no UDP link carries beats).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import ipaddress
import os
import select
import socket
import struct
import time
from collections import deque
from collections.abc import Callable

import serial

from hastore.config.model import Link, LinkKind
from hastore.core.framing import FrameDecoder, encode_frame
from hastore.io import pump
from hastore.io.pump import raw_sockaddr
from hastore.core.wire import FLAG_NEWS, FLAGS_OFFSET

OnPacket = Callable[[str, bytes, "float | None", bool], None]  # link id, data, kernel receive time, read late
OnError = Callable[[str, str], None]

SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
SIOCGIFBRDADDR = 0x8919
IP_MULTICAST_ALL = getattr(socket, "IP_MULTICAST_ALL", 49)  # linux/in.h
IPV6_MULTICAST_ALL = 29  # linux/in6.h
RECV_SIZE = 65535
SERIAL_QUEUE_FRAMES = 16  # outgoing frames kept while the line is slow; the oldest goes first
SERIAL_RETRY_S = 1.0
SERIAL_POLL_S = 0.02  # read interval for ports without a file descriptor (loop://)
SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = getattr(socket, "SO_DETACH_FILTER", 27)
SO_ATTACH_REUSEPORT_CBPF = 51
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
SCM_TIMESTAMPNS = SO_TIMESTAMPNS
_TIMESPEC = struct.Struct("@qq")
UDP_HEADER = 8  # a socket filter on a UDP socket sees the UDP header first; a SO_REUSEPORT program, the payload
READ_BATCH = 1024  # datagrams read from one socket in one go
QUIET_RCVBUF = 4 << 20  # bytes of receive buffer for a quiet socket
FLOOD_PER_TICK = 16  # routine datagrams per beat tick past which a quiet socket is watched (normal: 1 or 2)


class TransportError(Exception):
    """A link that cannot work as configured (e.g. its interface does not exist)."""


class Transport:
    """Base: stats, rate-limited error reporting. Subclasses implement open/send/close."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.stats: dict[str, int] = {"sent": 0, "received": 0, "send_errors": 0}
        self._on_packet: OnPacket | None = None
        self._on_error: OnError | None = None
        self._reported: set[str] = set()
        self.down = False  # the last send failed for a reason that is certain here (LOCAL_DOWN, device not open)
        self.on_state: Callable[[str, bool], None] | None = None  # hears (link id, usable) when `down` changes

    async def open(self, on_packet: OnPacket, on_error: OnError, quiet: bool = False,
                   on_wake: Callable[[], None] | None = None) -> None:
        """quiet: see the module's docstring. on_wake: called instead of drain() when news arrives, so that the
        daemon can drain every link first (in quiet mode a decision must not see liveness as of the last tick)."""
        raise NotImplementedError

    def send(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def target(self) -> dict | None:
        """Where a datagram for this link goes, for another process to send one (the guard's farewell): None
        when that needs this transport itself."""
        return None

    def pumped(self) -> tuple[int, int, bytes | None] | None:
        """(fd the beat pump reads, its kind of input, raw destination or None to write()) while this link can
        leave its routine traffic to the pump (hastore.io.pump): quiet, nothing pending. None otherwise."""
        return None

    def pump_bytes(self, data: bytes) -> bytes:
        """What goes on the wire for one payload (a serial line frames it)."""
        return data

    def pump_failed(self, code: int) -> None:
        """A send of the beat pump's on this link failed (errno `code`): reported and judged as one of ours."""
        where = self.link.interface or self.link.device
        self._send_failed(f"send on {where} failed: {_describe(OSError(code, os.strerror(code)))}",
                          down=code in LOCAL_DOWN)

    def drain(self, ticks: int = 0) -> None:
        """Deliver whatever waits to be read (quiet mode: the daemon calls this before any decision but a beat tick's,
        and on a beat tick when the engine needs what arrived, saying how many ticks passed since such a drain)."""

    def _deliver(self, data: bytes, at: float | None = None, late: bool = False) -> None:
        self.stats["received"] += 1
        if self._on_packet is not None:
            self._on_packet(self.link.id, data, at, late)

    def _sent_ok(self) -> None:
        self.stats["sent"] += 1
        self._reported.clear()
        self._set_down(False)

    def _send_failed(self, sentence: str, down: bool = False) -> None:
        """down: the failure says this node cannot use the link at all (see LOCAL_DOWN), not that one send failed."""
        self.stats["send_errors"] += 1
        self._report(sentence)
        if down:
            self._set_down(True)

    def _set_down(self, down: bool) -> None:
        if down != self.down:
            self.down = down
            if self.on_state is not None:
                self.on_state(self.link.id, not down)

    def _report(self, sentence: str) -> None:
        """Report each distinct trouble once until a send succeeds."""
        if sentence in self._reported or self._on_error is None:
            return
        self._reported.add(sentence)
        self._on_error(self.link.id, sentence)


def _only_own_groups(sock: socket.socket, v6: bool) -> None:
    """Linux hands a wildcard-bound socket the datagrams of every multicast group any socket on
    the host joined on that interface (IP_MULTICAST_ALL defaults to 1), so a ucast link would see
    an mcast link's traffic on the same port. Turn that off (best effort: v6 needs Linux 4.20)."""
    level, opt = (socket.IPPROTO_IPV6, IPV6_MULTICAST_ALL) if v6 else (socket.IPPROTO_IP, IP_MULTICAST_ALL)
    try:
        sock.setsockopt(level, opt, 0)
    except OSError:
        pass


# Errors of a send that say this node cannot use the path at all, rather than that one datagram was lost: no
# route (the interface it needs is down, or has lost its carrier where net.ipv4.conf.*.ignore_routes_with_linkdown
# is 1), the interface or device gone. Not EADDRNOTAVAIL: an address being changed or still tentative (IPv6 DAD)
# passes. (A serial link is down while its device is not open: see SerialTransport._lost.)
LOCAL_DOWN = frozenset({errno.ENETUNREACH, errno.ENETDOWN, errno.ENODEV, errno.ENXIO})


def _describe(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "")
    return f"{exc.strerror or exc} ({name})" if name else str(exc)


# Classic BPF (linux/filter.h): (code, jt, jf, k)
_LD_LEN, _LDB_ABS, _AND_K, _JGE_K, _JSET_K, _RET_K, _RET_A = 0x80, 0x30, 0x54, 0x35, 0x45, 0x06, 0x16
_ACCEPT = 0xFFFFFFFF  # keep the whole datagram


def _news_program(base: int, news: bool | None) -> list[tuple[int, int, int, int]]:
    """A program over a datagram whose payload starts at `base`. news None: return the socket index for a
    SO_REUSEPORT group (1 for news, 0 otherwise); True/False: a socket filter that keeps news / the rest. A
    datagram too short to have the flags byte is not news (garbage still reaches the verifier, and its counters)."""
    off = base + FLAGS_OFFSET
    if news is None:
        return [(_LD_LEN, 0, 0, 0), (_JGE_K, 0, 3, off + 1),  # len >= off+1 ? next : ret 0
                (_LDB_ABS, 0, 0, off), (_AND_K, 0, 0, FLAG_NEWS), (_RET_A, 0, 0, 0), (_RET_K, 0, 0, 0)]
    keep_news, keep_rest = (_ACCEPT, 0) if news else (0, _ACCEPT)
    return [(_LD_LEN, 0, 0, 0), (_JGE_K, 1, 0, off + 1), (_RET_K, 0, 0, keep_rest),
            (_LDB_ABS, 0, 0, off), (_JSET_K, 0, 1, FLAG_NEWS), (_RET_K, 0, 0, keep_news), (_RET_K, 0, 0, keep_rest)]


def _attach(sock: socket.socket, option: int, program: list[tuple[int, int, int, int]]) -> None:
    """setsockopt(SOL_SOCKET, option, struct sock_fprog): the kernel copies the program, so the buffer may go."""
    code = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *ins) for ins in program))
    sock.setsockopt(socket.SOL_SOCKET, option, struct.pack("@HP", len(program), ctypes.addressof(code)))


def _big_receive_buffer(sock: socket.socket) -> None:
    """Room for a keepalive's worth of junk (a flood needs no key) without the kernel dropping the beat behind it:
    the default (~200 KB) holds about 250 datagrams. Beyond rmem_max with CAP_NET_ADMIN, else as far as allowed."""
    for option in (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, QUIET_RCVBUF)
            return
        except OSError:
            continue


def _stamp(ancillary: list) -> float | None:
    """The kernel's receive time (CLOCK_REALTIME seconds) from recvmsg's ancillary data, if there."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SCM_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
            sec, nsec = _TIMESPEC.unpack_from(data)
            return sec + nsec / 1e9
    return None


def arrival(stamp: float | None, now: float, since: float) -> float | None:
    """The loop-clock time of a kernel receive stamp (CLOCK_REALTIME; None: not known) of something read at `now`
    from a socket last emptied at `since`: between the two, whatever the real-time clock did meanwhile (a step
    would move every stamp)."""
    return None if stamp is None else min(now, max(since, stamp - (time.time() - now)))


class UdpTransport(Transport):
    """ucast, bcast and mcast over one UDP socket bound to the link's port and interface (two in quiet mode)."""

    def __init__(self, link: Link) -> None:
        super().__init__(link)
        self._sock: socket.socket | None = None
        self._news: socket.socket | None = None  # quiet mode: the watched socket, for news only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ifindex = 0
        self._family = socket.AF_INET
        self._unjoined: list[socket.socket] = []  # sockets whose multicast join failed: retried on each send
        self._since_tick = 0  # routine datagrams read since the beat timer's last drain
        self._flooded = False  # the quiet socket is watched too, while more than FLOOD_PER_TICK come per tick
        self._on_wake: Callable[[], None] | None = None
        self._emptied_at = 0.0  # loop time of the last drain, which empties both sockets

    @property
    def quiet(self) -> bool:
        return self._news is not None

    async def open(self, on_packet: OnPacket, on_error: OnError, quiet: bool = False,
                   on_wake: Callable[[], None] | None = None) -> None:
        link = self.link
        self._on_packet, self._on_error, self._on_wake = on_packet, on_error, on_wake
        if not link.interface:
            raise TransportError(f"{link.id}: no interface configured")
        try:
            self._ifindex = socket.if_nametoindex(link.interface)
        except OSError:
            raise TransportError(f"{link.id}: interface {link.interface} does not exist") from None
        self._family = self._pick_family()
        sock = socket.socket(self._family, socket.SOCK_DGRAM)
        try:
            if quiet:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            self._setup(sock)
        except OSError as exc:
            sock.close()
            raise TransportError(f"{link.id}: cannot open UDP socket: {_describe(exc)}") from None
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        if quiet:
            self._news = self._open_news(sock)
        self._emptied_at = self._loop.time()
        self._loop.add_reader((self._news or sock).fileno(), self._wake)

    def _wake(self) -> None:
        (self._on_wake or self.drain)()

    def _open_news(self, quiet: socket.socket) -> socket.socket | None:
        """The second socket of quiet mode and the kernel's steering; None (and `quiet` back to a plain socket
        that gets everything) where the kernel refuses any of it."""
        news = socket.socket(self._family, socket.SOCK_DGRAM)
        try:
            news.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            self._setup(news)  # bound second: index 1 of the port's SO_REUSEPORT group
            for s, keep in ((quiet, False), (news, True)):
                s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                _attach(s, SO_ATTACH_FILTER, _news_program(UDP_HEADER, keep))
            _big_receive_buffer(quiet)
            _attach(quiet, SO_ATTACH_REUSEPORT_CBPF, _news_program(0, None))
        except OSError as exc:
            news.close()
            try:
                quiet.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
            except OSError:
                pass
            self._report(f"quiet mode unavailable ({_describe(exc)}): every datagram wakes the daemon")
            return None
        return news

    def _pick_family(self) -> socket.AddressFamily:
        if self.link.kind is LinkKind.BCAST:
            return socket.AF_INET
        if not self.link.address:
            raise TransportError(f"{self.link.id}: no address configured")
        try:
            addr = ipaddress.ip_address(self.link.address.split("%")[0])
        except ValueError:
            raise TransportError(f"{self.link.id}: {self.link.address!r} is not an IP address") from None
        if self.link.kind is LinkKind.MCAST and not addr.is_multicast:
            raise TransportError(f"{self.link.id}: {addr} is not a multicast group")
        return socket.AF_INET6 if addr.version == 6 else socket.AF_INET

    def _setup(self, sock: socket.socket) -> None:
        link = self.link
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, link.interface.encode())
        v6 = self._family == socket.AF_INET6
        if v6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        _only_own_groups(sock, v6)
        if link.kind is LinkKind.BCAST:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        if link.kind is LinkKind.MCAST:
            self._setup_mcast(sock, v6)
            # Bound to the group, the socket sees only that group's datagrams, not unicast
            # meant for a ucast link sharing the port and interface.
            sock.bind(self._sockaddr(self._group()))
            self._join(sock)
        else:
            sock.bind(("::", link.port, 0, 0) if v6 else ("", link.port))

    def _group(self) -> str:
        return self.link.address.split("%")[0]

    def _setup_mcast(self, sock: socket.socket, v6: bool) -> None:
        link = self.link
        if v6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, self._ifindex)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, link.ttl)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, int(link.loop))
        else:
            mreqn = struct.pack("4s4si", bytes(4), bytes(4), self._ifindex)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, link.ttl)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, int(link.loop))

    def _join(self, sock: socket.socket) -> None:
        """Join the group on our interface. A failure (e.g. no IPv6 on the interface yet) is
        reported and retried on each send rather than stopping the daemon."""
        group = self._group()
        try:
            if self._family == socket.AF_INET6:
                mreq = socket.inet_pton(socket.AF_INET6, group) + struct.pack("@i", self._ifindex)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
            else:
                mreqn = struct.pack("4s4si", socket.inet_aton(group), bytes(4), self._ifindex)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:  # EADDRINUSE: already a member
                if sock not in self._unjoined:
                    self._unjoined.append(sock)
                self._report(f"cannot join multicast group {group} on {self.link.interface}: {_describe(exc)}")
                return
        if sock in self._unjoined:
            self._unjoined.remove(sock)

    def _sockaddr(self, host: str) -> tuple:
        if self._family == socket.AF_INET6:
            return (host, self.link.port, 0, self._ifindex)
        return (host, self.link.port)

    def _destination(self) -> tuple:
        if self.link.kind is LinkKind.BCAST:
            return (self._broadcast_address(), self.link.port)
        return self._sockaddr(self.link.address.split("%")[0])

    def _broadcast_address(self) -> str:
        """The interface's broadcast address, read afresh (it may be configured after we opened);
        255.255.255.255 when it has none, which SO_BINDTODEVICE sends out the right interface."""
        try:
            req = struct.pack("256s", self.link.interface.encode())
            res = fcntl.ioctl(self._sock.fileno(), SIOCGIFBRDADDR, req)
            return socket.inet_ntoa(res[20:24])
        except OSError:
            return "255.255.255.255"

    def target(self) -> dict | None:
        if self._sock is None:
            return None
        try:
            dest = self._destination()
        except OSError:
            return None
        return {"family": int(self._family), "interface": self.link.interface, "dest": list(dest)}

    def pumped(self) -> tuple[int, int, bytes | None] | None:
        if self._sock is None or self._news is None or self._flooded or self._unjoined or self.down:
            return None
        try:
            dest = raw_sockaddr(self._family, self._destination())
        except OSError:
            return None
        return self._sock.fileno(), pump.DGRAM, dest

    def drain(self, ticks: int = 0) -> None:
        """Deliver what both sockets hold, in the order the kernel received it (so that the verifier's replay
        marks see a news message and the routine beats around it in sequence). A flood at the port (junk needs
        no key to get here) must not leave beats unread in the quiet socket, or make the kernel drop them: past
        FLOOD_PER_TICK routine datagrams per beat tick since the last drain on one, the quiet socket is watched
        like the other."""
        if self._sock is None:
            return
        if self._news is None:
            for data, _ in self._read(self._sock, stamped=False):
                self._deliver(data)
            return
        routine = self._read(self._sock, stamped=True)
        got = routine + self._read(self._news, stamped=True)
        self._since_tick += len(routine)
        if ticks:
            self._watch_quiet(self._since_tick > FLOOD_PER_TICK * ticks)
            self._since_tick = 0
        now = self._loop.time()
        emptied, self._emptied_at = self._emptied_at, now
        if not got:
            return
        got.sort(key=lambda d: (d[1] is None, d[1] or 0.0))
        for data, stamp in got:
            self._deliver(data, arrival(stamp, now, emptied))

    def _watch_quiet(self, on: bool) -> None:
        if on == self._flooded or self._sock is None:
            return
        self._flooded = on
        if on:
            self._loop.add_reader(self._sock.fileno(), self._wake)
            self._report(f"more than {FLOOD_PER_TICK} routine datagrams in a keepalive (a flood?): reading them "
                         f"as they come")
        else:
            self._loop.remove_reader(self._sock.fileno())

    def _read(self, sock: socket.socket, stamped: bool) -> list[tuple[bytes, float | None]]:
        got = []
        for _ in range(READ_BATCH):  # until the socket is empty; bounded so one busy link cannot starve the loop
            try:
                if stamped:
                    data, ancillary, _flags, _addr = sock.recvmsg(RECV_SIZE, socket.CMSG_SPACE(_TIMESPEC.size))
                    got.append((data, _stamp(ancillary)))
                else:
                    data, _addr = sock.recvfrom(RECV_SIZE)
                    got.append((data, None))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # e.g. a queued ICMP error
                self._report(f"receive failed: {_describe(exc)}")
                break
        return got

    def send(self, data: bytes) -> None:
        sock = self._sock
        if sock is None:
            self._send_failed("transport is not open", down=True)
            return
        for unjoined in list(self._unjoined):  # each socket of the link, the watched one included
            self._join(unjoined)
        try:
            sock.sendto(data, self._destination())
        except OSError as exc:
            self._send_failed(f"send on {self.link.interface} failed: {_describe(exc)}",
                              down=exc.errno in LOCAL_DOWN)
            return
        self._sent_ok()

    def close(self) -> None:
        sock, news, self._sock, self._news = self._sock, self._news, None, None
        if sock is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader((news or sock).fileno())
            if self._flooded:
                self._loop.remove_reader(sock.fileno())
        self._flooded = False
        sock.close()
        if news is not None:
            news.close()


class SerialTransport(Transport):
    """Frames over a serial line (or anything pyserial opens by URL, e.g. ``loop://``).

    Reads are driven by the event loop (``add_reader`` on the port's file descriptor, or a short
    poll for ports without one). Writes never block: frames wait in a small queue while the line
    is slow, and the oldest unstarted frame is dropped (and counted) when the queue is full.
    When the device goes away (EIO/EOF, write error) it is reported and reopened every
    `retry_s` seconds in the background until it works again.
    """

    def __init__(self, link: Link, *, retry_s: float = SERIAL_RETRY_S) -> None:
        super().__init__(link)
        self.stats.update(dropped=0, reopens=0, bad_frames=0, garbage_bytes=0)
        self._retry_s = retry_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._port: serial.SerialBase | None = None
        self._fd: int | None = None
        self._decoder = FrameDecoder()
        self._queue: deque[bytes] = deque()
        self._head_written = 0  # bytes of _queue[0] already on the line
        self._writer_armed = False
        self._task: asyncio.Task | None = None  # poll (no fd) or reconnect
        self._closed = False
        self.quiet = False  # read only by drain(), not watched by the loop

    async def open(self, on_packet: OnPacket, on_error: OnError, quiet: bool = False,
                   on_wake: Callable[[], None] | None = None) -> None:
        link = self.link  # on_wake is not needed: a frame read as it comes is delivered at once
        self._on_packet, self._on_error = on_packet, on_error
        self._loop = asyncio.get_running_loop()
        self.quiet = quiet
        if not link.device:
            raise TransportError(f"{link.id}: no serial device configured")
        if "://" not in link.device and not os.path.exists(link.device):
            raise TransportError(f"{link.id}: serial device {link.device} does not exist")
        try:
            self._open_port()
        except (OSError, serial.SerialException) as exc:
            self._lost(f"cannot open serial device {link.device}: {exc}")

    def _open_port(self) -> None:
        # Writes to a port with a file descriptor go through os.write, non-blocking. Ports without
        # one (URL handlers such as loop://, for tests) use pyserial's own write, which may wait.
        port = serial.serial_for_url(self.link.device, baudrate=self.link.baud, timeout=0)
        try:
            fd = port.fileno()
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both of the latter
            fd = None
        self._port, self._fd = port, fd
        self._decoder = FrameDecoder()
        if fd is not None:
            os.set_blocking(fd, False)
            if not self.quiet:
                self._loop.add_reader(fd, self._readable)
        else:
            self._task = self._loop.create_task(self._poll())

    def set_quiet(self, on: bool) -> None:
        """Quiet: frames wait for drain(); not quiet: the loop reads each as it comes."""
        if on == self.quiet:
            return
        self.quiet = on
        if self._fd is not None and self._loop is not None and not self._loop.is_closed():
            if on:
                self._loop.remove_reader(self._fd)
            else:
                self._loop.add_reader(self._fd, self._readable)  # level-triggered: what waits is read at once

    def pumped(self) -> tuple[int, int, bytes | None] | None:
        if not self.quiet or self._fd is None or self._queue or self.down:
            return None
        return self._fd, pump.STREAM, None

    def pump_bytes(self, data: bytes) -> bytes:
        return encode_frame(data)

    def frames(self, data: bytes) -> list[bytes]:
        """The payloads in bytes the pump read off the line and did not expect (its framer goes on from there)."""
        dec = self._decoder
        payloads = dec.feed(data)
        self.stats["bad_frames"], self.stats["garbage_bytes"] = dec.bad_frames, dec.garbage_bytes
        self.stats["received"] += len(payloads)
        return payloads

    def drain(self, ticks: int = 0) -> None:
        if not self.quiet or self._fd is None:
            return
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        for _ in range(16):  # bounded; a line at 115200 baud brings ~2.3 KB per keepalive of 200 ms
            # A raw tty (VMIN=0) reads b"" when it has nothing, as it does on hang-up: read only what poll says is
            # there (or a hang-up), as the loop's reader would.
            if not poller.poll(0) or not self._readable(late=True):
                return

    async def _poll(self) -> None:
        while self._port is not None:
            self._readable()
            await asyncio.sleep(SERIAL_POLL_S)

    def _readable(self, late: bool = False) -> bool:
        """Read once and deliver the frames completed; True when a full buffer was read (there may be more)."""
        port = self._port
        if port is None:
            return False
        try:
            data = os.read(self._fd, 4096) if self._fd is not None else port.read(4096)
        except (BlockingIOError, InterruptedError):
            return False
        except (OSError, serial.SerialException) as exc:
            self._lost(f"serial device {self.link.device} lost: {exc}")
            return False
        if not data:
            if self._fd is not None:  # readable yet nothing: the other end is gone
                self._lost(f"serial device {self.link.device} lost: end of file")
            return False
        dec = self._decoder
        frames = dec.feed(data)
        self.stats["bad_frames"], self.stats["garbage_bytes"] = dec.bad_frames, dec.garbage_bytes
        for payload in frames:
            self._deliver(payload, None, late)
        return len(data) == 4096

    def send(self, data: bytes) -> None:
        frame = encode_frame(data)  # an oversized payload is our own bug: that raises
        if self._port is None:
            self._send_failed(f"serial device {self.link.device} is not open", down=True)
            return
        if len(self._queue) >= SERIAL_QUEUE_FRAMES:
            # Keep a partly written head frame: cutting it would garble the line.
            del self._queue[1 if self._head_written else 0]
            self.stats["dropped"] += 1
        self._queue.append(frame)
        self._flush()

    def _flush(self) -> None:
        while self._queue and self._port is not None:
            chunk = memoryview(self._queue[0])[self._head_written :]
            try:
                n = os.write(self._fd, chunk) if self._fd is not None else self._port.write(chunk)
            except (BlockingIOError, InterruptedError):
                n = 0
            except (OSError, serial.SerialException) as exc:
                self.stats["send_errors"] += 1
                self._lost(f"serial device {self.link.device} write failed: {exc}")
                return
            n = n or 0
            if n < len(chunk):
                self._head_written += n
                self._arm_writer(True)
                return
            self._queue.popleft()
            self._head_written = 0
            self._sent_ok()
        self._arm_writer(False)

    def _arm_writer(self, on: bool) -> None:
        if self._fd is None or on == self._writer_armed:
            return
        if on:
            self._loop.add_writer(self._fd, self._flush)
        else:
            self._loop.remove_writer(self._fd)
        self._writer_armed = on

    def _drop_port(self) -> None:
        port, fd = self._port, self._fd
        if fd is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(fd)
            if self._writer_armed:
                self._loop.remove_writer(fd)
        self._writer_armed = False
        self._port = self._fd = None
        self._queue.clear()
        self._head_written = 0
        if port is not None:
            try:
                port.close()
            except (OSError, serial.SerialException):
                pass

    def _lost(self, sentence: str) -> None:
        self._drop_port()
        self._report(sentence)
        if not self._closed and self._loop is not None:
            self._task = self._loop.create_task(self._reconnect())

    async def _reconnect(self) -> None:
        while not self._closed:
            await asyncio.sleep(self._retry_s)
            try:
                self._open_port()
            except (OSError, serial.SerialException) as exc:
                self._report(f"cannot reopen serial device {self.link.device}: {exc}")
                continue
            self.stats["reopens"] += 1
            return

    def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._drop_port()


_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid (SO_PEERCRED)


def claim_port(interface: str, port: int) -> socket.socket:
    """One hastore daemon per UDP port and interface in a network namespace. A second one would bind too
    (SO_REUSEPORT lets it) and join the first one's socket groups, where each would read half of the other's
    datagrams; daemons on other interfaces are in other groups (SO_BINDTODEVICE) and may share the port number.
    Held as an abstract unix socket named after both: scoped to the network namespace like the port itself, and
    gone with its process (exit, kill -9, the exec of an in-place restart), so no stale lock can outlive a daemon.
    Keep the returned socket open for the daemon's life, and turn away what connects (turn_away). TransportError
    names the daemon that holds the claim."""
    name = f"\0hastore-udp-{interface}-{port}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(name)
        sock.listen(8)
        sock.setblocking(False)
        return sock
    except OSError as exc:
        sock.close()
        if exc.errno != errno.EADDRINUSE:
            raise TransportError(f"UDP port {port} on {interface}: cannot claim it for this daemon: "
                                 f"{_describe(exc)}") from None
    holder = ""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(name)
            pid, _, _ = _UCRED.unpack(probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
            holder = f" (pid {pid})"
        except OSError:
            pass
    raise TransportError(f"UDP port {port} on {interface}: another hastore daemon{holder} in this network namespace "
                         f"uses it; one daemon per port and interface (a second cluster on this host needs another "
                         f"udpport)")


def turn_away(claim: socket.socket) -> None:
    """A second daemon connected to learn our pid (claim_port): close its connection, so that they do not pile up
    in the claim's backlog."""
    try:
        conn, _ = claim.accept()
        conn.close()
    except OSError:
        pass


def make_transport(link: Link) -> Transport:
    if link.kind is LinkKind.SERIAL:
        return SerialTransport(link)
    return UdpTransport(link)
