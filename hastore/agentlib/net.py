"""Virtual addresses for agents: parse the VIP spec, add/remove it with netlink, announce it.

Pure parts (``parse_vip``, ``arp_frame``, ``neighbour_advert``) are plain functions over values; the
netlink parts take an open `Rtnl` (hastore.agentlib.rtnl: rtnetlink over a plain socket, standard
library only, so ``meta-data`` and every other call start fast; see that module for why not pyroute2).

Announcements after a move are what makes a failover visible to the LAN: routers and clients keep
the old MAC for the VIP in their neighbour caches until told otherwise.  IPv4 gets gratuitous ARP
(a request and a reply, sender = target = VIP) on an AF_PACKET socket; IPv6 gets unsolicited
neighbour advertisements with the override flag to ff02::1.  Linux updates an *existing* entry on
either (``is_garp`` / the O flag) without waiting for its lock time.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import time
from collections.abc import Callable
from collections import namedtuple  # not dataclasses: an agent runs per call, and that import costs ~20 ms

from hastore.agentlib.ocf import ERR_CONFIGURED, AgentError
from hastore.agentlib.rtnl import Rtnl

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ETH_P_ARP = 0x0806
IFA_F_NODAD = 0x02
IFA_F_DADFAILED = 0x08
IFA_F_TENTATIVE = 0x40
IFF_NOARP = 0x80
IFNAMSIZ = 16
NA_FLAG_OVERRIDE = 0x20000000
ALL_NODES = "ff02::1"


class VipSpec(namedtuple("VipSpec", "address prefixlen nic label broadcast")):
    # address: IPAddress
    # prefixlen: int | None  -- None: take it from the subnet the address falls in (or a host prefix)
    # nic: str  -- "" : the interface whose subnet contains the address
    # label: str  -- IPv4 only; "" for none, else a suffix or "nic:suffix"
    # broadcast: IPAddress | None
    __slots__ = ()

    @property
    def version(self) -> int:
        return self.address.version

    def label_for(self, nic: str) -> str | None:
        """The IFA_LABEL to set on `nic` (None for IPv6 or no label)."""
        if self.version == 6 or not self.label:
            return None
        if ":" in self.label and not self.label.startswith(nic + ":"):
            raise AgentError(ERR_CONFIGURED, f"label {self.label!r} does not name interface {nic}, "
                                             f"where {self.address} belongs")
        return check_label(self.label if ":" in self.label else f"{nic}:{self.label}")


def check_label(label: str) -> str:
    if len(label) >= IFNAMSIZ:
        raise AgentError(ERR_CONFIGURED, f"label {label!r} is too long: interface labels hold "
                                         f"at most {IFNAMSIZ - 1} characters")
    return label


def parse_vip(ip: str, cidr_netmask: str = "", nic: str = "", label: str = "",
              broadcast: str = "") -> VipSpec:
    """Parameters -> VipSpec, accepting Heartbeat's shorthand ``ip/mask/nic/broadcast`` in `ip`.

    Explicit parameters win only if they agree with the shorthand; a conflict is a configuration
    error rather than a silent choice.  Raises AgentError(ERR_CONFIGURED) with the reason.
    """
    parts = ip.strip().split("/")
    if len(parts) > 4:
        raise AgentError(ERR_CONFIGURED, f"ip {ip!r} has more than the four fields of "
                                         f"address/netmask/nic/broadcast")
    fields = {"cidr_netmask": cidr_netmask, "nic": nic, "broadcast": broadcast}
    for name, short in zip(("cidr_netmask", "nic", "broadcast"), parts[1:]):
        if short and fields[name] and fields[name] != short:
            raise AgentError(ERR_CONFIGURED, f"ip {ip!r} says {name} {short!r} but the {name} "
                                             f"parameter says {fields[name]!r}")
        fields[name] = fields[name] or short
    try:
        address = ipaddress.ip_address(parts[0])
    except ValueError:
        raise AgentError(ERR_CONFIGURED, f"ip {parts[0]!r} is not an IPv4 or IPv6 address") from None
    if address.is_multicast or address.is_unspecified:
        raise AgentError(ERR_CONFIGURED, f"ip {address} is not a unicast address")
    prefixlen = _prefixlen(address, fields["cidr_netmask"])
    nic, label = fields["nic"], label.strip()
    if ":" in nic:                       # Heartbeat style eth0:1 = interface eth0, alias label eth0:1
        if label and label != nic:
            raise AgentError(ERR_CONFIGURED, f"nic {nic!r} carries an alias label and the label "
                                             f"parameter says {label!r}")
        nic, label = nic.split(":", 1)[0], nic
    if nic and (len(nic) >= IFNAMSIZ or "/" in nic or nic in (".", "..")):
        raise AgentError(ERR_CONFIGURED, f"nic {nic!r} is not a valid interface name")
    if label and ":" in label and nic and not label.startswith(nic + ":"):
        raise AgentError(ERR_CONFIGURED, f"label {label!r} must start with the interface name "
                                         f"{nic}: (or be given without it)")
    if label and (nic or ":" in label):
        check_label(label if ":" in label else f"{nic}:{label}")
    brd = None
    if fields["broadcast"]:
        if address.version == 6:
            raise AgentError(ERR_CONFIGURED, "broadcast applies to IPv4 only; IPv6 has none")
        try:
            brd = ipaddress.IPv4Address(fields["broadcast"])
        except ValueError:
            raise AgentError(ERR_CONFIGURED, f"broadcast {fields['broadcast']!r} is not an IPv4 "
                                             f"address") from None
    return VipSpec(address, prefixlen, nic, label, brd)


def _prefixlen(address: IPAddress, mask: str) -> int | None:
    mask = mask.strip()
    if not mask:
        return None
    bits = address.max_prefixlen
    if mask.isdigit() and 0 < int(mask) <= bits:
        return int(mask)
    if address.version == 4 and "." in mask:
        try:
            return ipaddress.IPv4Network(f"0.0.0.0/{mask}").prefixlen
        except ValueError:
            pass
    raise AgentError(ERR_CONFIGURED, f"cidr_netmask {mask!r} is neither a prefix length 1..{bits}"
                                     + (" nor a dotted netmask" if address.version == 4 else ""))


def default_broadcast(address: IPAddress, prefixlen: int) -> IPAddress | None:
    """What ``ip addr add ... brd +`` would set: the subnet's broadcast (none for /31, /32, IPv6)."""
    if address.version == 6 or prefixlen >= 31:
        return None
    return ipaddress.ip_network(f"{address}/{prefixlen}", strict=False).broadcast_address


# ------------------------------------------------------------------ netlink
def iproute() -> Rtnl:
    """An open rtnetlink socket for the current network namespace (use as a context manager)."""
    return Rtnl()


class Link(namedtuple("Link", "index name mac noarp")):
    # index: int
    # name: str
    # mac: bytes  -- b"" when the link has no hardware address
    # noarp: bool
    __slots__ = ()


class Assigned(namedtuple("Assigned", "index address prefixlen flags label")):
    # index: int
    # address: IPAddress
    # prefixlen: int
    # flags: int
    # label: str | None
    __slots__ = ()


def link_by_name(ipr: Rtnl, name: str) -> Link | None:
    try:
        index = socket.if_nametoindex(name)
    except OSError:
        return None
    try:
        return link_by_index(ipr, index)
    except OSError:
        return None  # gone in between


def link_by_index(ipr: Rtnl, index: int) -> Link:
    index, name, mac, flags = ipr.link(index)
    return Link(index, name, mac if len(mac) == 6 and any(mac) else b"", bool(flags & IFF_NOARP))


def _family(version: int) -> int:
    return socket.AF_INET if version == 4 else socket.AF_INET6


def assigned(ipr: Rtnl, version: int, index: int | None = None) -> list[Assigned]:
    """Addresses of that family, on one interface or on all of them."""
    return [Assigned(i, ipaddress.ip_address(raw), prefixlen, flags, label)
            for i, raw, prefixlen, flags, label in ipr.addresses(_family(version))
            if index is None or i == index]


def find(ipr: Rtnl, address: IPAddress, index: int | None = None) -> Assigned | None:
    """The assignment of `address` (on `index`, or anywhere when None)."""
    return next((a for a in assigned(ipr, address.version, index) if a.address == address), None)


def containing_subnet(ipr: Rtnl, address: IPAddress, index: int | None = None) -> Assigned | None:
    """An address whose subnet contains `address`, preferring the most specific prefix."""
    hits = [a for a in assigned(ipr, address.version, index)
            if a.address != address and not a.address.is_link_local and not a.address.is_loopback
            and address in ipaddress.ip_network(f"{a.address}/{a.prefixlen}", strict=False)]
    return max(hits, key=lambda a: a.prefixlen, default=None)


def add(ipr: Rtnl, index: int, address: IPAddress, prefixlen: int, broadcast: IPAddress | None,
        label: str | None) -> None:
    """Add the address; IPv6 without duplicate address detection (usable at once, as IPaddr2's
    default: the address is expected to be moving here from a peer that just released it)."""
    if address.version == 4:
        ipr.add_address(socket.AF_INET, index, address.packed, prefixlen,
                        broadcast=broadcast.packed if broadcast is not None else None, label=label)
    else:
        ipr.add_address(socket.AF_INET6, index, address.packed, prefixlen, flags=IFA_F_NODAD)


def remove(ipr: Rtnl, a: Assigned) -> None:
    ipr.delete_address(_family(a.address.version), a.index, a.address.packed, a.prefixlen)


# ------------------------------------------------------------------ announcements
def arp_frame(mac: bytes, address: ipaddress.IPv4Address, reply: bool) -> bytes:
    """A broadcast Ethernet frame carrying a gratuitous ARP request or reply for `address`."""
    ip = address.packed
    target_mac = mac if reply else b"\x00" * 6
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2 if reply else 1, mac, ip, target_mac, ip)
    return b"\xff" * 6 + mac + struct.pack("!H", ETH_P_ARP) + arp


def neighbour_advert(mac: bytes, address: ipaddress.IPv6Address) -> bytes:
    """ICMPv6 unsolicited neighbour advertisement (type 136, override flag, target link-layer
    address option); the kernel fills in the checksum on a raw ICMPv6 socket."""
    return (struct.pack("!BBHI16s", 136, 0, 0, NA_FLAG_OVERRIDE, address.packed)
            + struct.pack("!BB6s", 2, 1, mac))


def announce(link: Link, address: IPAddress, count: int, interval: float,
             sleep: Callable[[float], None] = time.sleep) -> int:
    """Send `count` rounds of announcements, the first at once, then one every `interval` s.

    Returns the number of rounds sent.  A send error stops the burst and is raised as OSError:
    the address is up either way, so the caller decides how loud to be.
    """
    if count <= 0:
        return 0
    if address.version == 4:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
        frames = [arp_frame(link.mac, address, reply=False), arp_frame(link.mac, address, reply=True)]
        sock.bind((link.name, ETH_P_ARP))
        dest = None
    else:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        frames = [neighbour_advert(link.mac, address)]
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)  # RFC 4861 7.1.2
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, link.index)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
        sock.bind((str(address), 0, 0, link.index))
        dest = (ALL_NODES, 0, 0, link.index)
    with sock:
        for n in range(count):
            if n:
                sleep(interval)
            for frame in frames:
                if dest is None:
                    sock.send(frame)
                else:
                    sock.sendto(frame, dest)
    return count
