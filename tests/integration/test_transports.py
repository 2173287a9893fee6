"""UDP and serial transports against the real kernel: two network namespaces joined by two veth
pairs, and a socat pty pair for the serial line.

Both "nodes" live in this one process and one event loop: the test thread enters a namespace
(setns on the thread) only while a transport opens its socket. A socket belongs to the namespace
it was created in for good, so afterwards the one loop can drive both nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass

import pytest
from nsutil import netns, sh

from hastore.config.model import Link, LinkKind
from hastore.core.wire import FLAG_NEWS
from hastore.io.transports import SerialTransport, TransportError, make_transport

PORT = 694  # the namespaces are private, so the real Heartbeat port is free


@dataclass
class Veths:
    a: str  # namespace names
    b: str
    ifa: list[str]  # ifa[i] in a is joined to ifb[i] in b
    ifb: list[str]

    @staticmethod
    def v4(i: int, side: str) -> str:
        return f"10.231.{i}.{1 if side == 'a' else 2}"

    @staticmethod
    def v6(i: int, side: str) -> str:
        return f"fd00:231:{i}::{1 if side == 'a' else 2}"


@pytest.fixture
def veths():
    """Namespaces a and b joined by two veth pairs (our own: lighter than conftest's node lab)."""
    tag = f"hst{os.getpid()}"
    a, b = f"{tag}a", f"{tag}b"
    veths = Veths(a, b, [f"h{os.getpid()}a{i}" for i in range(2)], [f"h{os.getpid()}b{i}" for i in range(2)])
    try:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        for i, (x, y) in enumerate(zip(veths.ifa, veths.ifb)):
            sh("ip", "link", "add", x, "netns", a, "type", "veth", "peer", "name", y, "netns", b)
            for ns, dev, side in ((a, x, "a"), (b, y, "b")):
                sh("ip", "-n", ns, "addr", "add", f"{veths.v4(i, side)}/24", "brd", "+", "dev", dev)
                sh("ip", "-n", ns, "addr", "add", f"{veths.v6(i, side)}/64", "nodad", "dev", dev)
                sh("ip", "-n", ns, "link", "set", dev, "up")
        yield veths
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def run(coro, timeout: float = 10.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Node:
    """The transports of one side, with what they received and reported."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.got: list[tuple[str, bytes]] = []
        self.when: list[tuple[bytes, float | None, bool]] = []  # (data, at, late) of each delivery
        self.errors: list[tuple[str, str]] = []
        self.transports = []

    async def open(self, ns: str | None, *links: Link):
        ctx = netns(ns) if ns else contextlib.nullcontext()
        with ctx:
            for link in links:
                t = make_transport(link)
                await t.open(self._packet, self._error, quiet=self.quiet)
                self.transports.append(t)
        return self.transports[-len(links) :]

    def _packet(self, link_id: str, data: bytes, at: float | None, late: bool) -> None:
        self.got.append((link_id, data))
        self.when.append((data, at, late))

    def _error(self, link_id: str, sentence: str) -> None:
        self.errors.append((link_id, sentence))

    def close(self) -> None:
        for t in self.transports:
            t.close()


async def until(cond, timeout: float = 3.0, every=None, step: float = 0.05) -> None:
    """Wait for cond(); call every() each step meanwhile (e.g. resend: the first datagram may be
    lost while the neighbour entry resolves)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        if every:
            every()
        await asyncio.sleep(step)


async def exchange(veths: Veths, link_a: Link, link_b: Link) -> None:
    na, nb = Node(), Node()
    try:
        (ta,) = await na.open(veths.a, link_a)
        (tb,) = await nb.open(veths.b, link_b)
        await until(lambda: (link_b.id, b"from-a") in nb.got, every=lambda: ta.send(b"from-a"))
        await until(lambda: (link_a.id, b"from-b") in na.got, every=lambda: tb.send(b"from-b"))
        assert ta.stats["sent"] > 0 and tb.stats["received"] > 0
        assert not na.errors and not nb.errors
    finally:
        na.close()
        nb.close()


def ucast(ifname: str, peer: str) -> Link:
    return Link(id=f"ucast:{ifname}:{peer}", kind=LinkKind.UCAST, interface=ifname, address=peer, port=PORT)


def bcast(ifname: str) -> Link:
    return Link(id=f"bcast:{ifname}", kind=LinkKind.BCAST, interface=ifname, port=PORT)


def mcast(ifname: str, group: str) -> Link:
    return Link(id=f"mcast:{ifname}:{group}", kind=LinkKind.MCAST, interface=ifname, address=group, port=PORT)


# --- UDP ---------------------------------------------------------------------------------------

@pytest.mark.root
def test_ucast_v4(veths):
    run(exchange(veths, ucast(veths.ifa[0], veths.v4(0, "b")), ucast(veths.ifb[0], veths.v4(0, "a"))))


@pytest.mark.root
def test_ucast_v6(veths):
    run(exchange(veths, ucast(veths.ifa[0], veths.v6(0, "b")), ucast(veths.ifb[0], veths.v6(0, "a"))))


@pytest.mark.root
def test_bcast(veths):
    run(exchange(veths, bcast(veths.ifa[0]), bcast(veths.ifb[0])))


@pytest.mark.root
def test_mcast_v4(veths):
    run(exchange(veths, mcast(veths.ifa[0], "239.0.0.1"), mcast(veths.ifb[0], "239.0.0.1")))


@pytest.mark.root
def test_mcast_v6(veths):
    run(exchange(veths, mcast(veths.ifa[0], "ff02::1:694"), mcast(veths.ifb[0], "ff02::1:694")))


def datagram(tag: bytes, news: bool) -> bytes:
    """Shaped like the wire's header as far as the flags byte (hastore.core.wire.FLAGS_OFFSET): enough for the
    kernel's steering, which is all a transport looks at."""
    return b"HA\x01\x01\x01" + bytes([FLAG_NEWS if news else 0]) + tag


async def quiet_mode(veths: Veths, link_a: Link, link_b: Link) -> None:
    """b opens its link quiet: news wakes it at once; a routine datagram (and garbage too short to say) waits for
    drain(), then comes with the kernel's receive time, in the order received, before the news that followed it."""
    na, nb = Node(), Node(quiet=True)
    try:
        (ta,) = await na.open(veths.a, link_a)
        (tb,) = await nb.open(veths.b, link_b)
        assert tb.quiet, nb.errors
        # the first datagram may be lost while the neighbour entry resolves: resend news until it is through
        await until(lambda: datagram(b"hello", True) in [d for _, d in nb.got],
                    every=lambda: ta.send(datagram(b"hello", True)))
        nb.got.clear()
        nb.when.clear()
        loop = asyncio.get_running_loop()
        sent_at = loop.time()
        ta.send(datagram(b"routine", False))
        ta.send(b"abc")
        await asyncio.sleep(0.3)
        assert nb.got == [], "a routine datagram woke the reader"
        tb.drain()
        assert [d for d, _, _ in nb.when] == [datagram(b"routine", False), b"abc"]
        for _, at, late in nb.when:
            assert not late and at is not None and sent_at - 0.05 < at < sent_at + 0.15, (at, sent_at)
        nb.when.clear()
        ta.send(datagram(b"routine2", False))
        await asyncio.sleep(0.05)
        ta.send(datagram(b"news", True))
        await until(lambda: len(nb.when) == 2, timeout=1)
        assert [d for d, _, _ in nb.when] == [datagram(b"routine2", False), datagram(b"news", True)]
        assert nb.when[0][1] < nb.when[1][1]
        assert not na.errors and not nb.errors
    finally:
        na.close()
        nb.close()


@pytest.mark.root
@pytest.mark.parametrize("kind", ["ucast4", "ucast6", "bcast", "mcast4"])
def test_quiet_mode_wakes_for_news_only_and_stamps_the_rest(veths, kind):
    links = {
        "ucast4": (ucast(veths.ifa[0], veths.v4(0, "b")), ucast(veths.ifb[0], veths.v4(0, "a"))),
        "ucast6": (ucast(veths.ifa[0], veths.v6(0, "b")), ucast(veths.ifb[0], veths.v6(0, "a"))),
        "bcast": (bcast(veths.ifa[0]), bcast(veths.ifb[0])),
        "mcast4": (mcast(veths.ifa[0], "239.0.0.1"), mcast(veths.ifb[0], "239.0.0.1")),
    }[kind]
    run(quiet_mode(veths, *links))


@pytest.mark.root
def test_a_flood_of_routine_datagrams_is_read_to_the_end_and_then_as_it_comes(veths):
    """Junk needs no key to reach the port. Whatever a tick finds is read to the last datagram (the beat behind
    the junk included); past FLOOD_PER_TICK per keepalive the quiet socket is watched until a tick is calm."""
    from hastore.io.transports import FLOOD_PER_TICK

    async def body():
        na, nb = Node(), Node(quiet=True)
        try:
            (ta,) = await na.open(veths.a, ucast(veths.ifa[0], veths.v4(0, "b")))
            (tb,) = await nb.open(veths.b, ucast(veths.ifb[0], veths.v4(0, "a")))
            await until(lambda: nb.got, every=lambda: ta.send(datagram(b"hello", True)))
            nb.got.clear()
            for i in range(300):
                ta.send(datagram(b"junk%d" % i, False))
            ta.send(datagram(b"beat", False))
            await asyncio.sleep(0.2)
            tb.drain(ticks=1)
            assert len(nb.got) == 301 and nb.got[-1][1] == datagram(b"beat", False)
            assert any("flood" in e for _, e in nb.errors), nb.errors
            nb.got.clear()
            await until(lambda: nb.got, every=lambda: ta.send(datagram(b"routine", False)))  # watched: no drain
            await asyncio.sleep(0.1)
            tb.drain(ticks=1)  # a calm keepalive (a few datagrams): quiet again
            nb.got.clear()
            ta.send(datagram(b"later", False))
            await asyncio.sleep(0.3)
            assert nb.got == [] and FLOOD_PER_TICK > 2
            # read on the third tick only (the engine did not need them before): the count is per tick
            floods = len([e for _, e in nb.errors if "flood" in e])
            for i in range(2 * FLOOD_PER_TICK):
                ta.send(datagram(b"r%d" % i, False))
            await asyncio.sleep(0.1)
            tb.drain(ticks=3)
            assert len(nb.got) == 2 * FLOOD_PER_TICK + 1
            assert len([e for _, e in nb.errors if "flood" in e]) == floods
            nb.got.clear()
            ta.send(datagram(b"still quiet", False))
            await asyncio.sleep(0.3)
            assert nb.got == []
        finally:
            na.close()
            nb.close()

    run(body())


@pytest.mark.root
def test_where_the_kernel_refuses_steering_a_quiet_link_falls_back_to_waking_for_everything(veths, monkeypatch):
    import hastore.io.transports as tr
    real = tr._attach

    def refuse(sock, option, program):
        if option == tr.SO_ATTACH_REUSEPORT_CBPF:
            raise OSError(1, "Operation not permitted")
        real(sock, option, program)

    monkeypatch.setattr(tr, "_attach", refuse)

    async def body():
        na, nb = Node(), Node(quiet=True)
        try:
            (ta,) = await na.open(veths.a, ucast(veths.ifa[0], veths.v4(0, "b")))
            (tb,) = await nb.open(veths.b, ucast(veths.ifb[0], veths.v4(0, "a")))
            assert not tb.quiet
            assert any("quiet mode unavailable" in e for _, e in nb.errors), nb.errors
            await until(lambda: datagram(b"routine", False) in [d for _, d in nb.got],
                        every=lambda: ta.send(datagram(b"routine", False)))  # no drain(): it woke the reader
        finally:
            na.close()
            nb.close()

    run(body())


@pytest.mark.root
def test_links_sharing_a_port_on_two_interfaces(veths):
    """ucast on both cables plus mcast on the first, all on port 694: each datagram arrives on
    the link of the cable it travelled, and the group-bound mcast socket sees no unicast."""

    async def body():
        v = veths
        la = [ucast(v.ifa[0], v.v4(0, "b")), ucast(v.ifa[1], v.v4(1, "b")), mcast(v.ifa[0], "239.0.0.9")]
        lb = [ucast(v.ifb[0], v.v4(0, "a")), ucast(v.ifb[1], v.v4(1, "a")), mcast(v.ifb[0], "239.0.0.9")]
        na, nb = Node(), Node()
        try:
            ta = await na.open(veths.a, *la)
            tb = await nb.open(veths.b, *lb)
            for i in range(3):
                msg = f"a{i}".encode()
                await until(lambda: (lb[i].id, msg) in nb.got, every=lambda: ta[i].send(msg))
                msg = f"b{i}".encode()
                await until(lambda: (la[i].id, msg) in na.got, every=lambda: tb[i].send(msg))
            await asyncio.sleep(0.1)
            for node, links in ((na, la), (nb, lb)):
                by_link = {lid: {d for i, d in node.got if i == lid} for lid, _ in node.got}
                assert {len(v) for v in by_link.values()} == {1}, by_link  # nothing crossed over
                assert len(by_link) == 3
        finally:
            na.close()
            nb.close()

    run(body())


@pytest.mark.root
def test_missing_interface_is_a_clear_error(veths):
    async def body():
        link = ucast("nosuchif0", "10.231.0.2")
        expected = r"^ucast:nosuchif0:10\.231\.0\.2: interface nosuchif0 does not exist$"
        with netns(veths.a), pytest.raises(TransportError, match=expected):
            await make_transport(link).open(lambda *_: None, lambda *_: None)

    run(body())


@pytest.mark.root
def test_interface_down_at_open_then_up(veths):
    """Open on a down interface works; sends report the trouble once (not once per send) until a
    send succeeds; traffic flows once the interface is up; a later outage is reported again."""

    async def body():
        sh("ip", "-n", veths.a, "link", "set", veths.ifa[0], "down")
        la, lb = ucast(veths.ifa[0], veths.v4(0, "b")), ucast(veths.ifb[0], veths.v4(0, "a"))
        na, nb = Node(), Node()
        try:
            ta, _ = await na.open(veths.a, la, mcast(veths.ifa[0], "239.0.0.1"))
            (tb,) = await nb.open(veths.b, lb)
            states: list[tuple[str, bool]] = []
            ta.on_state = lambda link, usable: states.append((link, usable))
            for _ in range(5):
                ta.send(b"x")
            assert ta.stats["send_errors"] == 5
            assert len(na.errors) == 1 and na.errors[0][0] == la.id, na.errors
            assert "Network is unreachable" in na.errors[0][1] or "down" in na.errors[0][1], na.errors
            # the link is known unusable from here (for the isolation rule), once, until a send works
            assert ta.down and states == [(la.id, False)]
            sh("ip", "-n", veths.a, "link", "set", veths.ifa[0], "up")
            await until(lambda: (lb.id, b"up") in nb.got, every=lambda: ta.send(b"up"))
            assert not ta.down and states == [(la.id, False), (la.id, True)]
            await until(lambda: (la.id, b"back") in na.got, every=lambda: tb.send(b"back"))
            sh("ip", "-n", veths.a, "link", "set", veths.ifa[0], "down")
            ta.send(b"y")
            assert len(na.errors) == 2 and states[-1] == (la.id, False)
        finally:
            na.close()
            nb.close()

    run(body())


# --- serial ------------------------------------------------------------------------------------


def serial_link(path: str) -> Link:
    return Link(id=f"serial:{path}", kind=LinkKind.SERIAL, device=path, baud=115200)


def test_serial_loop_url():
    async def body():
        node = Node()
        try:
            (t,) = await node.open(None, serial_link("loop://"))
            t.send(b"one")
            t.send(b"two" * 500)
            await until(lambda: len(node.got) == 2)
            assert [d for _, d in node.got] == [b"one", b"two" * 500]
            assert t.stats["sent"] == 2 and t.stats["received"] == 2
        finally:
            node.close()

    run(body())


class Socat:
    """A pty pair with stable link paths, which can be killed, paused and restarted."""

    def __init__(self, directory: str) -> None:
        self.a, self.b = os.path.join(directory, "ttyA"), os.path.join(directory, "ttyB")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        assert shutil.which("socat"), "socat is not installed"
        for path in (self.a, self.b):  # left dangling by a SIGKILL; socat would replace them anyway
            if os.path.lexists(path):
                os.unlink(path)
        self.proc = subprocess.Popen(
            ["socat", "-d", "-d", f"pty,raw,echo=0,link={self.a}", f"pty,raw,echo=0,link={self.b}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 5
        while not (os.path.exists(self.a) and os.path.exists(self.b)):
            assert self.proc.poll() is None, "socat exited"
            assert time.monotonic() < deadline, "socat did not create its pty links"
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM: socat removes its links. SIGKILL: the links dangle until the next start."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(sig)
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture
def socat():
    with tempfile.TemporaryDirectory(prefix="hastore-serial-") as d:
        s = Socat(d)
        try:
            s.start()
            yield s
        finally:
            s.stop()


@pytest.mark.root
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["term", "kill"])
def test_serial_pty_both_ways_and_recovers_after_socat_restart(socat, sig):
    async def body():
        na, nb = Node(), Node()
        try:
            (ta,) = await na.open(None, serial_link(socat.a))
            (tb,) = await nb.open(None, serial_link(socat.b))
            await until(lambda: (tb.link.id, b"ping") in nb.got, every=lambda: ta.send(b"ping"))
            await until(lambda: (ta.link.id, b"pong") in na.got, every=lambda: tb.send(b"pong"))

            states: list[bool] = []
            ta.on_state = lambda link, usable: states.append(usable)
            socat.stop(sig)
            await until(lambda: na.errors and nb.errors, timeout=2)
            assert "lost" in na.errors[0][1], na.errors
            ta.send(b"while-down")  # reported, never raised
            assert ta.stats["send_errors"] >= 1
            assert ta.down and states == [False], states  # a hung-up line is known unusable from here

            socat.start()
            na.got.clear()
            nb.got.clear()
            await until(lambda: (tb.link.id, b"again") in nb.got, timeout=4, every=lambda: ta.send(b"again"))
            await until(lambda: (ta.link.id, b"back") in na.got, timeout=4, every=lambda: tb.send(b"back"))
            assert ta.stats["reopens"] >= 1 and tb.stats["reopens"] >= 1
            assert not ta.down and states == [False, True], states
        finally:
            na.close()
            nb.close()

    run(body())


@pytest.mark.root
def test_a_quiet_serial_line_waits_for_drain_and_says_its_frames_came_late(socat):
    async def body():
        na, nb = Node(), Node(quiet=True)
        try:
            (ta,) = await na.open(None, serial_link(socat.a))
            (tb,) = await nb.open(None, serial_link(socat.b))
            for tag in (b"one", b"two"):
                ta.send(tag)
            await asyncio.sleep(0.3)
            assert nb.got == [] and not nb.errors, "a quiet line was read before drain(), or saw a hang-up"
            tb.drain()
            assert nb.when == [(b"one", None, True), (b"two", None, True)]
            tb.drain()  # nothing waiting: a raw tty reads b"" then, which must not pass for a hang-up
            assert not nb.errors and tb.stats["reopens"] == 0
            tb.set_quiet(False)
            nb.when.clear()
            await until(lambda: nb.when, every=lambda: ta.send(b"three"))
            assert nb.when[0] == (b"three", None, False)
        finally:
            na.close()
            nb.close()

    run(body())


@pytest.mark.root
def test_serial_writes_never_block_when_the_line_stalls(socat):
    """Pause socat: the pty fills up, writes would block. send() must return at once, keep a
    bounded queue and count the frames it dropped; after the stall the line works again."""

    async def body():
        na, nb = Node(), Node()
        try:
            (ta,) = await na.open(None, serial_link(socat.a))
            (tb,) = await nb.open(None, serial_link(socat.b))
            socat.proc.send_signal(signal.SIGSTOP)
            t0 = time.monotonic()
            for i in range(200):
                ta.send(bytes([i % 256]) * 2000)
            assert time.monotonic() - t0 < 0.5
            assert ta.stats["dropped"] > 0
            assert len(ta._queue) <= 16
            assert not na.errors
            socat.proc.send_signal(signal.SIGCONT)
            await until(lambda: (tb.link.id, b"after") in nb.got, every=lambda: ta.send(b"after"))
            assert all(len(d) in (2000, 5) for _, d in nb.got)  # only whole frames came out
        finally:
            na.close()
            nb.close()

    run(body())


def test_serial_missing_device_is_a_clear_error(tmp_path):
    async def body():
        t = SerialTransport(serial_link(str(tmp_path / "nope")))
        with pytest.raises(TransportError, match=r"^serial:.*nope: serial device .* does not exist"):
            await t.open(lambda *_: None, lambda *_: None)

    run(body())
