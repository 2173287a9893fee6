"""ICMP/ICMPv6 echo prober against the real kernel: loopback, a veth pair between two network
namespaces (raw sockets, and ping sockets once ping_group_range allows them), unreachable
addresses, and replies that are not ours.

As in test_transports, the test thread enters a namespace only while the pinger opens its
sockets; the sockets stay in that namespace and the one event loop drives them.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time

import pytest
from nsutil import netns, sh

from hastore.io.pinger import Pinger

pytestmark = pytest.mark.root  # raw ICMP sockets, namespaces: tests/conftest.py skips (or fails under CI)


A4, B4, A6, B6 = "10.232.0.1", "10.232.0.2", "fd00:232::1", "fd00:232::2"
B6_LL = "fe80::b"


@pytest.fixture
def nets():
    """Namespaces a and b joined by one veth pair (v4, v6 global and a fixed link-local, no DAD
    wait), plus a third namespace c with nothing but loopback."""
    pid = os.getpid()
    names = {k: f"hsp{pid}{k}" for k in "abc"}
    ifa, ifb = f"p{pid}a", f"p{pid}b"
    try:
        for ns in names.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        a, b = names["a"], names["b"]
        sh("ip", "link", "add", ifa, "netns", a, "type", "veth", "peer", "name", ifb, "netns", b)
        for ns, dev, v4, v6, ll in ((names["a"], ifa, A4, A6, "fe80::a"), (names["b"], ifb, B4, B6, B6_LL)):
            sh("ip", "-n", ns, "link", "set", dev, "addrgenmode", "none")
            sh("ip", "-n", ns, "addr", "add", f"{v4}/24", "dev", dev)
            sh("ip", "-n", ns, "addr", "add", f"{v6}/64", "nodad", "dev", dev)
            sh("ip", "-n", ns, "addr", "add", f"{ll}/64", "nodad", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        yield names | {"ifa": ifa}
    finally:
        for ns in names.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


async def open_pinger(ns: str | None, **kw) -> tuple[Pinger, list[str]]:
    replies: list[str] = []
    p = Pinger(**kw)
    with netns(ns):
        await p.open(replies.append)
    return p, replies


async def answered(p: Pinger, replies: list[str], address: str, timeout: float = 2.0) -> bool:
    """Ping every 100 ms (the first request may wait on neighbour discovery) until answered."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p.ping(address)
        await asyncio.sleep(0.1)
        if address in replies:
            return True
    return False


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_loopback_v4_and_v6():
    async def body():
        p, replies = await open_pinger(None)
        try:
            assert await answered(p, replies, "127.0.0.1")
            assert await answered(p, replies, "::1")
            assert set(replies) == {"127.0.0.1", "::1"}
        finally:
            p.close()

    run(body())


@pytest.mark.parametrize("ping_sockets", [False, True], ids=["raw", "dgram"])
def test_over_veth_in_a_namespace(nets, ping_sockets):
    """A fresh namespace has ping_group_range "1 0": the pinger falls back to raw sockets.
    Widening the range gives it unprivileged ping sockets."""

    async def body():
        if ping_sockets:
            sh("ip", "netns", "exec", nets["a"], "sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647")
        p, replies = await open_pinger(nets["a"])
        try:
            mode = "dgram" if ping_sockets else "raw"
            assert p.modes == {"ipv4": mode, "ipv6": mode}
            for address in (B4, B6, f"{B6_LL}%{nets['ifa']}", A4, "::1"):
                assert await answered(p, replies, address), (address, replies)
        finally:
            p.close()

    run(body())


def test_unreachable_addresses_get_no_reply_and_do_not_raise(nets):
    async def body():
        lonely, lonely_replies = await open_pinger(nets["c"])  # only loopback: no route at all
        p, replies = await open_pinger(nets["a"])  # on-link, but nobody has these addresses
        routes: list[tuple[str, bool]] = []
        lonely.on_route = lambda address, routable: routes.append((address, routable))
        p.on_route = lambda address, routable: routes.append(("a: " + address, routable))
        try:
            for _ in range(5):
                for addr in ("10.232.0.2", "fd00:232::2", "192.0.2.1"):
                    lonely.ping(addr)  # ENETUNREACH from sendto: swallowed
                for addr in ("10.232.0.77", "fd00:232::77", "198.51.100.1"):
                    p.ping(addr)
                for junk in ("not-an-address", "fe80::1%nosuchif", "", "10.0.0.256"):
                    p.ping(junk)
                await asyncio.sleep(0.1)
            assert lonely_replies == [] and replies == []
            # no route: said once per address (the isolation rule's input); silence on-link is not that (a has
            # no default route, so 198.51.100.1 has none either)
            assert sorted(routes) == [("10.232.0.2", False), ("192.0.2.1", False), ("a: 198.51.100.1", False),
                                      ("fd00:232::2", False)], routes
        finally:
            lonely.close()
            p.close()

    run(body())


def test_a_ping_node_behind_an_interface_that_goes_down_has_no_route_until_it_is_up(nets):
    async def body():
        p, replies = await open_pinger(nets["a"])
        routes: list[tuple[str, bool]] = []
        p.on_route = lambda address, routable: routes.append((address, routable))
        try:
            assert await answered(p, replies, B4)
            sh("ip", "-n", nets["a"], "link", "set", nets["ifa"], "down")
            p.ping(B4)
            p.ping(B4)
            assert routes == [(B4, False)] and B4 in p.unroutable
            sh("ip", "-n", nets["a"], "link", "set", nets["ifa"], "up")
            sh("ip", "-n", nets["a"], "addr", "replace", f"{A4}/24", "dev", nets["ifa"])
            assert await answered(p, replies, B4, timeout=5.0)
            assert routes == [(B4, False), (B4, True)] and not p.unroutable
        finally:
            p.close()

    run(body())


def test_replies_to_another_pinger_are_not_ours(nets):
    """Raw sockets see every echo reply in the namespace; each pinger must count only its own."""

    async def body():
        p1, r1 = await open_pinger(nets["a"])
        p2, r2 = await open_pinger(nets["a"])
        try:
            assert p1.modes["ipv4"] == "raw"
            assert await answered(p1, r1, B4)
            assert await answered(p1, r1, B6)
            await asyncio.sleep(0.2)
            assert r2 == []
        finally:
            p1.close()
            p2.close()

    run(body())


@pytest.mark.parametrize("ping_sockets", [False, True], ids=["raw", "dgram"])
def test_replies_collected_late_carry_the_kernels_receive_time(nets, ping_sockets):
    """The daemon collects echo replies on its beat timer, sometimes ticks after they came: each comes with the
    kernel's receive time (real-time clock), so that a ping node counts from its reply, not from the reading."""
    if ping_sockets:
        sh("ip", "netns", "exec", nets["a"], "sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647")

    async def body():
        p = Pinger()
        with netns(nets["a"]):
            await p.open()  # no callback: replies wait for drain()
        try:
            seen: set[str] = set()
            deadline = time.monotonic() + 5
            while seen != {B4, B6} and time.monotonic() < deadline:  # neighbour discovery first
                p.ping(B4)
                p.ping(B6)
                await asyncio.sleep(0.1)
                seen |= {a for a, _ in p.drain()}
            await asyncio.sleep(0.2)
            p.drain()  # late answers to those
            sent = time.time()
            p.ping(B4)
            p.ping(B6)
            await asyncio.sleep(0.3)  # read a beat tick later
            got, read = p.drain(), time.time()
            assert {a for a, _ in got} == {B4, B6}, got
            for address, stamp in got:
                assert stamp is not None and sent <= stamp <= read - 0.25, (address, sent, stamp, read)
            assert p.modes["ipv4"] == ("dgram" if ping_sockets else "raw")
        finally:
            p.close()

    run(body())


def test_close_is_idempotent_and_ping_after_close_is_silent():
    async def body():
        p, replies = await open_pinger(None)
        p.close()
        p.close()
        p.ping("127.0.0.1")
        await asyncio.sleep(0.1)
        assert replies == []

    run(body())


def test_the_beat_pump_sends_prepared_pings_and_matches_their_replies_and_those_awaited():
    """prepare() gives the pump an echo request and the reply it must see; awaited() the replies still due to
    requests sent before (a plan that starts while a reply is on its way must not lose it)."""
    from hastore.io import pump as P

    if not P.available():
        pytest.fail("hastore._pump is not built (setup.py; needs gcc and Python's headers)")

    async def body():
        p = Pinger()
        await p.open()  # not watched: replies stay for drain() or the pump
        pumped = P.Pump()
        try:
            for address in ("127.0.0.1", "::1"):
                p.ping(address)  # sent by the loop: its reply is awaited, not yet read
                await asyncio.sleep(0.05)
                (fd, reply, source), = p.awaited(address, 8)
                fd2, dest, request, reply2, source2 = p.prepare(address)
                assert (fd2, source2) == (fd, source) and reply2 != reply
                assert [r for _, r, _ in p.awaited(address, 8)] == [reply2, reply]  # newest first
                now = time.monotonic()
                pumped.start([(now + 0.02, 0, fd, dest, request)], [(fd, P.ICMP)],
                             [(0, 0, -1, reply, source), (0, 1, -1, reply2, source)], [(now + 5, 1), (now + 5, 1)],
                             now + 0.2, 0.2, None, 0)
                await asyncio.sleep(0.3)
                taken = pumped.stop()
                assert taken.why == "the plan ended" and taken.sent == 1
                assert sorted(e for e, _ in taken.matches) == [0, 1], taken  # the loop's request's, and its own
                assert p.drain() == []  # the pump read them both
        finally:
            pumped.close()
            p.close()

    run(body())
