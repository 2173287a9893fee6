"""The beat pump (hastore._pump through hastore.io.pump) on real sockets, a pty and a memfd: it sends on time,
matches what it expects without waking anyone, and wakes the daemon for the rest."""

from __future__ import annotations

import os
import pty
import select
import socket
import struct
import time
import tty

import pytest

from hastore.io import pump as P

if not P.available():
    if os.environ.get("CI"):
        pytest.fail("hastore._pump is not built (setup.py; needs gcc and Python's headers)", pytrace=False)
    pytest.skip("hastore._pump is not built", allow_module_level=True)


def sockaddr(addr: tuple[str, int]) -> bytes:
    return P.raw_sockaddr(socket.AF_INET, addr)


@pytest.fixture
def rig():
    p = P.Pump()
    a, b = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
    for s in (a, b):
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
    a.setsockopt(socket.SOL_SOCKET, 35, 1)  # SO_TIMESTAMPNS: the pump takes the kernel's time
    master, line = pty.openpty()
    tty.setraw(master)
    tty.setraw(line)
    os.set_blocking(line, False)
    yield p, a, b, master, line
    p.close()
    for s in (a, b):
        s.close()
    os.close(master)
    os.close(line)


def woken(p: P.Pump, timeout: float) -> float | None:
    """When the pump woke us (monotonic), or None within timeout."""
    r, _, _ = select.select([p.wake_fd], [], [], timeout)
    return time.monotonic() if r else None


def test_it_sends_each_beat_on_time_pets_and_wakes_when_the_plan_ends(rig):
    p, a, b, master, line = rig
    pet = os.memfd_create("pet")
    os.ftruncate(pet, 8)
    t0 = time.monotonic() + 0.05
    outputs = [(t0 + 0.05 * k, k, fd, addr, b"beat%d" % k) for k in range(3)
               for fd, addr in ((b.fileno(), sockaddr(a.getsockname())), (line, None))]
    p.start(outputs, [], [], [], t0 + 0.2, 0.05, pet, 0)
    got = []
    while len(got) < 3:
        select.select([a], [], [], 1.0)
        got.append((a.recv(100), time.monotonic()))
    assert [d for d, _ in got] == [b"beat0", b"beat1", b"beat2"]
    for k, (_, t) in enumerate(got):
        assert 0 <= t - (t0 + 0.05 * k) < 0.02
    line_bytes = b""  # the pty may hand over the last write a moment after its UDP copy arrived
    while len(line_bytes) < 15 and select.select([master], [], [], 1.0)[0]:
        line_bytes += os.read(master, 100)
    assert line_bytes == b"beat0beat1beat2"
    at = woken(p, 1.0)
    assert at is not None and at - (t0 + 0.2) < 0.02
    taken = p.stop()
    assert (taken.sent, taken.why, taken.matches, taken.others) == (3, "the plan ended", [], [])
    assert struct.unpack("=d", os.pread(pet, 8, 0))[0] == pytest.approx(taken.last_pet) and taken.last_pet >= t0 + 0.1
    os.close(pet)


def test_expected_inputs_move_their_watch_and_an_unexpected_one_wakes_at_the_next_beat(rig):
    p, a, b, master, line = rig
    now = time.monotonic()
    expects = [(0, 0, k, b"expected%d" % k, None) for k in range(4)] + \
              [(1, 1, k, b"<frame%d>" % k, None) for k in range(4)]
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    beats = [(now + 0.05 * k, k, b.fileno(), sockaddr(sink.getsockname()), b"x") for k in range(1, 100)]
    p.start(beats, [(a.fileno(), P.DGRAM), (line, P.STREAM)], expects, [(now + 0.3, 0.6), (now + 0.3, 0.6)],
            now + 10, 1.0, None, 4)
    for k in range(3):
        b.sendto(b"expected%d" % k, a.getsockname())
        os.write(master, b"<frame%d>" % k)
        time.sleep(0.1)
    sent_last = time.monotonic() - 0.1
    os.write(master, b"<fra")  # a frame still coming: kept, not handed over
    assert woken(p, 0.2) is None  # all expected, and each match moved the silence's deadline on
    b.sendto(b"a forgery", a.getsockname())
    forged = time.monotonic()
    at = woken(p, 1.0)
    assert at is not None and at - forged < 0.06  # read with the next beat (every 50 ms here)
    taken = p.stop()
    sink.close()
    assert taken.why == "an input the plan did not expect" and taken.sent >= 8
    assert [(i, d) for i, d, _ in taken.others] == [(0, b"a forgery")]
    matches = dict(taken.matches)
    assert set(matches) == {2, 6}  # the newest on each watch: expected2 and <frame2>
    assert matches[2] == pytest.approx(sent_last, abs=0.01)  # the kernel's time of arrival
    assert matches[6] == matches[2]  # a frame takes its datagram's arrival (same tag)


def test_a_silence_wakes_at_its_deadline_and_garbage_on_the_line_is_handed_over(rig):
    p, a, b, master, line = rig
    now = time.monotonic()
    p.start([], [(a.fileno(), P.DGRAM), (line, P.STREAM)], [(1, 1, 0, b"<frame0>", None)],
            [(now + 10, 1.0), (now + 0.15, 1.0)], now + 10, 1.0, None, 1)
    at = woken(p, 1.0)
    assert at is not None and 0 <= at - (now + 0.15) < 0.02
    assert p.stop().why == "silence on watch 1"
    p.start([], [(line, P.STREAM)], [(0, 0, 0, b"<frame0>", None)], [(now + 10, 1.0)], now + 10, 1.0, None, 1)
    os.write(master, b"<frame0>noise")
    p.start([(time.monotonic() + 0.01, 0, b.fileno(), sockaddr(a.getsockname()), b"x")], [(line, P.STREAM)],
            [(0, 0, 0, b"<frame0>", None)], [(now + 10, 1.0)], now + 10, 1.0, None, 1)
    assert woken(p, 1.0) is not None
    taken = p.stop()
    assert [d for _, d, _ in taken.others] == [b"noise"] and [e for e, _ in taken.matches] == [0]


def test_a_beat_found_late_is_not_sent(rig):
    p, a, b, master, line = rig
    now = time.monotonic()
    p.start([(now - 0.5, 0, b.fileno(), sockaddr(a.getsockname()), b"stale")], [], [], [], now + 10, 0.2, None, 0)
    assert woken(p, 1.0) is not None
    taken = p.stop()
    assert (taken.sent, taken.why) == (0, "a beat found late: the process was stopped")
    with pytest.raises(BlockingIOError):
        a.recv(100)
