"""The few rtnetlink requests the IPaddr agent makes: read a link, dump addresses, add and delete one.

Why not pyroute2 (which the lab uses on the host): importing it costs ~200 ms on this machine and ~8 s in the
TCG guests of the VM lab, in every agent call; the VIP is on a failover's critical path and its monitor runs every
few seconds. These four requests are a page of struct packing over an AF_NETLINK socket.

Errors come out as OSError(errno) exactly as the kernel reports them (EEXIST, EADDRNOTAVAIL, ENODEV, ...).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator

NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_GETLINK, RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 18, 20, 21, 22
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK, NLM_F_DUMP_INTR, NLM_F_DUMP = 0x1, 0x2, 0x4, 0x10, 0x300
DUMP_TRIES = 5
NLM_F_EXCL, NLM_F_CREATE = 0x200, 0x400
IFLA_ADDRESS, IFLA_IFNAME = 1, 3
IFA_ADDRESS, IFA_LOCAL, IFA_LABEL, IFA_BROADCAST, IFA_FLAGS = 1, 2, 3, 4, 8

_NLMSGHDR = struct.Struct("=IHHII")      # len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")    # family, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBI")     # family, prefixlen, flags, scope, index
_RTATTR = struct.Struct("=HH")           # len, type


def _align(n: int) -> int:
    return (n + 3) & ~3


def attr(kind: int, data: bytes) -> bytes:
    """One rtattr, padded to 4 bytes."""
    size = _RTATTR.size + len(data)
    return _RTATTR.pack(size, kind) + data + bytes(_align(size) - size)


def attrs(buf: bytes) -> dict[int, bytes]:
    """The rtattrs of a message body (the last of each type wins); stops at a truncated one."""
    out, off = {}, 0
    while off + _RTATTR.size <= len(buf):
        size, kind = _RTATTR.unpack_from(buf, off)
        if size < _RTATTR.size or off + size > len(buf):
            break
        out[kind & 0x3FFF] = buf[off + _RTATTR.size:off + size]  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
        off += _align(size)
    return out


def messages(buf: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, seq, body) of each netlink message in a datagram."""
    off = 0
    while off + _NLMSGHDR.size <= len(buf):
        size, kind, flags, seq, _pid = _NLMSGHDR.unpack_from(buf, off)
        if size < _NLMSGHDR.size or off + size > len(buf):
            return
        yield kind, flags, seq, buf[off + _NLMSGHDR.size:off + size]
        off += _align(size)


class Rtnl:
    """One rtnetlink socket in the current network namespace; use as a context manager."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.seq = 0

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def _request(self, kind: int, flags: int, body: bytes) -> list[tuple[int, bytes]]:
        """Send one request; the (type, body) of the answers. A dump's parts until NLMSG_DONE, again when the
        kernel says the table changed during it (NLM_F_DUMP_INTR); an error code, if not 0, raised as OSError."""
        for _ in range(DUMP_TRIES):
            out, interrupted = self._once(kind, flags, body)
            if not interrupted:
                return out
        raise OSError(errno.EAGAIN, f"the address table kept changing during {DUMP_TRIES} dumps")

    def _once(self, kind: int, flags: int, body: bytes) -> tuple[list[tuple[int, bytes]], bool]:
        self.seq += 1
        seq = self.seq
        self.sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags | NLM_F_REQUEST, seq, 0) + body)
        out: list[tuple[int, bytes]] = []
        interrupted = False
        while True:
            data, _anc, msg_flags, _addr = self.sock.recvmsg(1 << 17)
            if msg_flags & socket.MSG_TRUNC:
                raise OSError(errno.EMSGSIZE, "a netlink answer did not fit the receive buffer")
            for mtype, mflags, mseq, mbody in messages(data):
                if mseq != seq:
                    continue  # an answer to an earlier request we gave up on
                interrupted |= bool(mflags & NLM_F_DUMP_INTR)
                if mtype in (NLMSG_ERROR, NLMSG_DONE):
                    code = -struct.unpack_from("=i", mbody)[0] if len(mbody) >= 4 else 0
                    if code:
                        raise OSError(code, os.strerror(code))
                    return out, interrupted  # the ACK, or the end of a dump
                out.append((mtype, mbody))
                if not mflags & NLM_F_MULTI:
                    return out, interrupted

    def link(self, index: int) -> tuple[int, str, bytes, int]:
        """(index, name, hardware address, IFF_* flags) of a link; OSError(ENODEV) when it does not exist."""
        for _kind, body in self._request(RTM_GETLINK, 0, _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0)):
            _family, _type, got, flags, _change = _IFINFOMSG.unpack_from(body)
            a = attrs(body[_IFINFOMSG.size:])
            return got, a.get(IFLA_IFNAME, b"").rstrip(b"\0").decode(errors="replace"), a.get(IFLA_ADDRESS, b""), flags
        raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))

    def addresses(self, family: int) -> list[tuple[int, bytes, int, int, str | None]]:
        """Every address of the family: (index, packed address, prefix length, IFA_F_* flags, label or None)."""
        out = []
        for _kind, body in self._request(RTM_GETADDR, NLM_F_DUMP, _IFADDRMSG.pack(family, 0, 0, 0, 0)):
            fam, prefixlen, flags, _scope, index = _IFADDRMSG.unpack_from(body)
            if fam != family:
                continue
            a = attrs(body[_IFADDRMSG.size:])
            address = a.get(IFA_LOCAL) or a.get(IFA_ADDRESS)  # IFA_ADDRESS is the peer's on point-to-point links
            if address is None:
                continue
            if IFA_FLAGS in a:
                flags = struct.unpack("=I", a[IFA_FLAGS][:4])[0]
            label = a[IFA_LABEL].rstrip(b"\0").decode(errors="replace") if IFA_LABEL in a else None
            out.append((index, address, prefixlen, flags, label))
        return out

    def add_address(self, family: int, index: int, address: bytes, prefixlen: int, *, flags: int = 0,
                    broadcast: bytes | None = None, label: str | None = None) -> None:
        """Add an address (EEXIST if the link has it already)."""
        body = _IFADDRMSG.pack(family, prefixlen, flags & 0xFF, 0, index)
        body += attr(IFA_LOCAL, address) + attr(IFA_ADDRESS, address)
        if flags:
            body += attr(IFA_FLAGS, struct.pack("=I", flags))
        if broadcast is not None:
            body += attr(IFA_BROADCAST, broadcast)
        if label:
            body += attr(IFA_LABEL, label.encode() + b"\0")
        self._request(RTM_NEWADDR, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body)

    def delete_address(self, family: int, index: int, address: bytes, prefixlen: int) -> None:
        """Delete an address (EADDRNOTAVAIL if the link does not have it)."""
        body = _IFADDRMSG.pack(family, prefixlen, 0, 0, index) + attr(IFA_LOCAL, address) + attr(IFA_ADDRESS, address)
        self._request(RTM_DELADDR, NLM_F_ACK, body)
