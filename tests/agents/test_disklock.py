"""The disk lease: the record format and the pure decisions (no root), then agents/disklock on one loop device
shared by the two lab nodes (root): one holder, refusal naming the holder, release, takeover of a dead or stalled
holder only after the lease, simultaneous starts, foreign data, and Debian's ocf-tester."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import signal
import struct
import subprocess
import tempfile
import time
import zlib
from pathlib import Path

import pytest
from ocftester import ocf_tester

from hastore.agentlib import lease as L
from hastore.io.proc import start_ticks

REPO = Path(__file__).resolve().parents[2]
AGENT = REPO / "agents" / "disklock"
LEASE_MS = 1500           # renew_ms defaults to 500
NONCE = bytes(range(16))


def rec(owner="alpha", gen=1, counter=0, lease_ms=LEASE_MS, renew_ms=500, released=False) -> L.Record:
    return L.Record(owner, gen, counter, lease_ms, renew_ms, NONCE, released)


# ================================================================== the record (pure)
def test_record_round_trip_and_layout():
    raw = rec(counter=7).encode()
    assert len(raw) == L.BLOCK and not any(raw[120:])
    assert raw[:8] == b"HSLEASE1"
    assert struct.unpack_from("<HH", raw, 8) == (1, 1)
    assert raw[12:17] == b"alpha" and not any(raw[17:76])
    assert struct.unpack_from("<QQII", raw, 76) == (1, 7, LEASE_MS, 500)
    assert raw[100:116] == NONCE
    assert struct.unpack_from("<I", raw, 116)[0] == zlib.crc32(raw[:116])
    block = L.decode(raw)
    assert block.kind == L.RECORD and block.record == rec(counter=7)
    assert block.names("alpha") and block.names("alpha", NONCE) and not block.names("alpha", bytes(16))
    assert not block.names("bravo") and not block.free


def test_released_record():
    block = L.decode(rec(counter=3).release().encode())
    assert block.record.released and block.record.counter == 4 and block.free and not block.names("alpha")
    assert block.describe() == "released by alpha (generation 1, counter 4)"


def test_crc_catches_any_changed_header_byte():
    raw = rec().encode()
    for i in range(116):
        bad = bytearray(raw)
        bad[i] ^= 0x40
        block = L.decode(bytes(bad))
        assert block.kind in (L.CORRUPT, L.FOREIGN), i
        assert block.record is None


def test_empty_foreign_and_unknown_version():
    assert L.decode(bytes(L.BLOCK)).kind == L.EMPTY and L.decode(bytes(L.BLOCK)).free
    ext = bytearray(L.BLOCK)
    ext[0:4] = b"XFSB"
    assert L.decode(bytes(ext)).kind == L.FOREIGN
    head = struct.pack("<8sHH64sQQII16s", b"HSLEASE1", 9, 1, b"alpha", 1, 0, 1500, 500, NONCE)
    raw = head + struct.pack("<I", zlib.crc32(head))
    block = L.decode(raw + bytes(L.BLOCK - len(raw)))
    assert block.kind == L.CORRUPT and "version 9" in block.detail


@pytest.mark.parametrize("owner", ["", "x" * 65, "a\0b"])
def test_unstorable_owner(owner):
    with pytest.raises(L.LeaseFormatError):
        rec(owner=owner).encode()


def test_wrong_block_size():
    with pytest.raises(ValueError):
        L.decode(bytes(512))


# ================================================================== the decisions (pure, fake clock)
def test_first_look():
    assert L.first_look(L.decode(bytes(L.BLOCK)), "bravo").kind == L.FREE
    assert L.first_look(L.decode(rec(released=True).encode()), "bravo").kind == L.FREE
    assert L.first_look(L.decode(rec().encode()), "alpha", NONCE).kind == L.OURS
    # naming this node is not enough: an earlier boot or an acquire that gave up wrote it; watched like any other
    for nonce in (None, bytes(16)):
        v = L.first_look(L.decode(rec().encode()), "alpha", nonce)
        assert v.kind == L.WATCH and "earlier run on this node" in v.reason
    assert L.first_look(L.decode(rec().encode()), "bravo").kind == L.WATCH
    foreign = bytearray(L.BLOCK)
    foreign[:4] = b"\x53\xef\x01\x00"
    v = L.first_look(L.decode(bytes(foreign)), "bravo")
    assert v.kind == L.REFUSE and "refusing to overwrite" in v.reason


def test_static_lease_expires_after_the_lease_and_not_before():
    first = L.decode(rec().encode())
    w = L.Watch(first, 100.0, LEASE_MS)
    for t in (100.2, 100.8, 101.49):
        assert w.observe(first, t).kind == L.WATCH
    v = w.observe(first, 101.5)
    assert v.kind == L.FREE and "unchanged for 1500ms" in v.reason


def test_holder_with_longer_lease_is_waited_for_longer():
    first = L.decode(rec(lease_ms=5000).encode())
    w = L.Watch(first, 0.0, LEASE_MS)
    assert w.observe(first, 4.9).kind == L.WATCH
    assert w.observe(first, 5.0).kind == L.FREE


def test_moving_counter_means_held():
    first = L.decode(rec(counter=4).encode())
    w = L.Watch(first, 10.0, LEASE_MS)
    assert w.observe(first, 10.2).kind == L.WATCH
    v = w.observe(L.decode(rec(counter=5).encode()), 10.3)
    assert v.kind == L.HELD_BY_OTHER and v.reason == "held by alpha (generation 1, renewed 100ms ago)"


def test_release_while_watching_frees_at_once():
    first = L.decode(rec().encode())
    w = L.Watch(first, 0.0, LEASE_MS)
    v = w.observe(L.decode(rec().release().encode()), 0.1)
    assert v.kind == L.FREE and "released by alpha" in v.reason


def test_torn_block_is_free_only_when_static_for_a_lease():
    torn = bytearray(rec().encode())
    torn[20] ^= 1
    first = L.decode(bytes(torn))
    assert L.first_look(first, "bravo").kind == L.WATCH
    w = L.Watch(first, 0.0, LEASE_MS)
    assert w.observe(first, 1.4).kind == L.WATCH
    assert w.observe(first, 1.5).kind == L.FREE
    w = L.Watch(first, 0.0, LEASE_MS)
    assert w.observe(L.decode(rec(owner="carol").encode()), 0.5).kind == L.HELD_BY_OTHER


def test_confirm_after_settle():
    mine = rec(owner="bravo", gen=2)
    assert L.confirm(L.decode(mine.encode()), mine).kind == L.OURS
    v = L.confirm(L.decode(rec(owner="alpha", gen=2).encode()), mine)
    assert v.kind == L.HELD_BY_OTHER and "lost the race" in v.reason and "alpha" in v.reason


def test_write_gap_limit_keeps_two_acquirers_apart():
    limit = L.gap_limit_s(500)
    assert (limit, L.settle_s(500)) == (0.2, 0.25)
    # Two nodes configured differently, both replacing a record one of them wrote: each one's gap limit stays
    # below the other's settle, so a write always lands before the other reads back.
    for mine, theirs in ((500, 3333), (100, 1000), (3333, 500), (10, 50_000)):
        for record in (mine, theirs):
            assert L.gap_limit_s(mine, record) < L.settle_s(theirs, record), (mine, theirs, record)
    assert (L.settle_s(500, 3333), L.gap_limit_s(500, 3333)) == (0.5, 0.2)
    assert L.write_gap(10.0, 10.0 + limit * 0.9, 500).kind == L.OURS
    slow = L.write_gap(10.0, 10.0 + limit + 0.001, 500)
    assert slow.kind == L.REFUSE and "giving up" in slow.reason and f"{limit * 1000:.0f}ms" in slow.reason


def test_renewal_check():
    mine = rec(counter=9)
    block = L.decode(mine.encode())
    assert L.renewal_check(block, mine, last_write=50.0, now=50.5).kind == L.OURS
    late = L.renewal_check(block, mine, last_write=50.0, now=51.25)  # 1500 - 500/2
    assert late.kind == L.REFUSE and "not writing" in late.reason
    taken = L.renewal_check(L.decode(rec(owner="bravo", gen=2).encode()), mine, 50.0, 50.5)
    assert taken.kind == L.HELD_BY_OTHER and "bravo" in taken.reason


# ================================================================== LeaseDevice on a file (ext4 /var/tmp)
@pytest.fixture
def image():
    fd, path = tempfile.mkstemp(prefix="hastore-disklock-", suffix=".img", dir="/var/tmp")
    os.close(fd)
    os.truncate(path, 64 * 1024)
    try:
        yield path
    finally:
        os.unlink(path)


def test_device_reads_and_writes_aligned_blocks(image):
    dev = L.LeaseDevice(image, 8192)
    try:
        assert dev.read().kind == L.EMPTY
        dev.write(rec(counter=1).encode())
        assert dev.read().record == rec(counter=1)
    finally:
        dev.close()
    data = Path(image).read_bytes()
    assert not any(data[:8192]) and data[8192:8200] == b"HSLEASE1"


def test_device_refusals(image, tmp_path):
    with pytest.raises(ValueError, match="multiple of 4096"):
        L.LeaseDevice(image, 100)
    with pytest.raises(ValueError, match="too small"):
        L.LeaseDevice(image, 64 * 1024)
    with pytest.raises(L.DeviceMissing):
        L.LeaseDevice(image + ".missing", 0)
    with pytest.raises(ValueError, match="neither a block device nor a regular file"):
        L.LeaseDevice(str(tmp_path), 0)


def _load_agent(run_dir: Path):
    before = os.environ.get("HASTORE_RUN_DIR")
    os.environ["HASTORE_RUN_DIR"] = str(run_dir)
    try:
        loader = importlib.machinery.SourceFileLoader("hastore_agent_disklock", str(AGENT))
        spec = importlib.util.spec_from_loader(loader.name, loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        return module
    finally:
        if before is None:
            del os.environ["HASTORE_RUN_DIR"]
        else:
            os.environ["HASTORE_RUN_DIR"] = before


def test_a_write_that_lands_late_is_not_trusted_even_when_it_reads_back(image, tmp_path):
    """Fischer's race: bravo and we both read "free"; our write stalls; bravo writes, settles, reads its own
    record back and holds the lease; then our write lands on top of it and reads back as ours.  Without the gap
    limit we would hold it too.  The agent gives up instead (bravo's renewer then sees the change and stops)."""
    agent = _load_agent(tmp_path)
    c = agent.config({"device": image, "lease_ms": "1500", "offset": "0", "node": "alpha"})
    settle = L.settle_s(c["renew_ms"])
    bravo = rec(owner="bravo", gen=1)

    class Stalls(L.LeaseDevice):
        def write(self, data: bytes) -> None:
            other = L.LeaseDevice(image, 0)
            try:
                other.write(bravo.encode())                     # bravo, which read "free" too, writes,
                time.sleep(settle)                               # settles
                assert L.confirm(other.read(), bravo).kind == L.OURS  # and holds the lease
            finally:
                other.close()
            super().write(data)                                  # our stalled write lands afterwards

    dev = Stalls(image, 0)
    try:
        with pytest.raises(agent.AgentError, match="giving up") as e:
            agent.acquire(c, dev)
        assert dev.read().names("alpha"), "our record did land: only the gap check stopped us"
    finally:
        dev.close()
    assert e.value.code == 1


def test_the_renewer_does_not_write_after_a_read_it_stalled_behind(image, tmp_path):
    """A renewer held up between its read and its write reads again rather than write on what may be stale."""
    agent = _load_agent(tmp_path)
    c = agent.config({"device": image, "lease_ms": "1500", "offset": "0", "node": "alpha"})
    mine = rec(owner="alpha")
    reads, writes = [], []

    class Device(L.LeaseDevice):
        def read(self):
            reads.append(time.monotonic())
            if len(reads) == 1:
                time.sleep(L.gap_limit_s(c["renew_ms"]) + 0.05)  # held up right after reading
            if len(reads) == 3:
                raise OSError("the test is over")
            return super().read()

        def write(self, data: bytes) -> None:
            writes.append((len(reads), L.decode(data).record.counter))
            super().write(data)

    dev = Device(image, 0)
    try:
        dev.write(mine.encode())
        writes.clear()
        assert agent.renew_forever(c, dev, mine, time.monotonic(), {}) == 3
    finally:
        dev.close()
    assert writes == [(2, 1)], "no write after the stalled first read; the second read renews"


def test_a_prompt_write_acquires(image, tmp_path):
    agent = _load_agent(tmp_path)
    c = agent.config({"device": image, "lease_ms": "1500", "offset": "0", "node": "alpha"})
    dev = L.LeaseDevice(image, 0)
    try:
        mine, _ = agent.acquire(c, dev)
        assert dev.read().names("alpha", mine.nonce)
    finally:
        dev.close()


# ================================================================== the agent, two lab nodes, one loop device
class Shared:
    def __init__(self, lab, device: str):
        self.lab, self.device = lab, device
        self.alpha, self.bravo = lab.nodes["alpha"], lab.nodes["bravo"]

    def env(self, **params: str) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OCF_", "HASTORE_RUN_DIR"))}
        env.update(PYTHONPATH=str(REPO), OCF_RESOURCE_INSTANCE="lock", OCF_RESKEY_device=self.device,
                   OCF_RESKEY_lease_ms=str(LEASE_MS))
        env.update({f"OCF_RESKEY_{k}": v for k, v in params.items()})
        return env

    def run(self, node, action: str, /, **params: str) -> subprocess.CompletedProcess:
        return node.run([str(AGENT), action], env=self.env(**params), timeout=60)

    def timed(self, node, action: str, /, **params: str) -> tuple[subprocess.CompletedProcess, float]:
        t0 = time.monotonic()
        res = self.run(node, action, **params)
        return res, time.monotonic() - t0

    def block(self, offset: int = 0) -> L.Block:
        dev = L.LeaseDevice(self.device, offset)
        try:
            return dev.read()
        finally:
            dev.close()

    def pidfiles(self, node, kind: str = "pid") -> list[dict]:
        script = f'for f in /run/hastore/disklock-*.{kind}; do [ -e "$f" ] && cat "$f" && echo; done; true'
        out = node.run(["sh", "-c", script]).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def renewer(self, node) -> int:
        (info,) = self.pidfiles(node)
        return info["pid"]

    def kill_renewers(self) -> None:
        """Renewers and observers."""
        for node in (self.alpha, self.bravo):
            for info in self.pidfiles(node) + self.pidfiles(node, "seen"):
                try:
                    os.kill(info["pid"], signal.SIGCONT)
                    os.kill(info["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.fixture
def shared(lab):
    fd, image = tempfile.mkstemp(prefix="hastore-disklock-", suffix=".img", dir="/var/tmp")
    os.close(fd)
    os.truncate(image, 1 << 20)
    device = None
    world = None
    try:
        device = subprocess.run(["losetup", "-f", "--show", image], check=True, capture_output=True,
                                text=True).stdout.strip()
        world = Shared(lab, device)
        yield world
    finally:
        try:
            if world is not None:
                world.kill_renewers()
        finally:
            if device:
                subprocess.run(["losetup", "-d", device], capture_output=True, check=False)
            os.unlink(image)


@pytest.mark.root
def test_only_one_node_holds_it(shared):
    a, b = shared.alpha, shared.bravo
    res = shared.run(a, "start")
    assert res.returncode == 0, res.stderr
    assert shared.run(a, "monitor").returncode == 0
    res, took = shared.timed(b, "start")
    assert res.returncode == 1
    assert "held by alpha (generation 1, renewed" in res.stderr and "ms ago)" in res.stderr
    assert took < LEASE_MS / 1000, "a live holder is recognised at its next renewal, not after a lease"
    assert shared.run(b, "monitor").returncode == 7
    assert shared.run(a, "monitor").returncode == 0
    first = shared.block().record
    time.sleep(1.1)
    later = shared.block().record
    assert (first.owner, later.owner, later.generation) == ("alpha", "alpha", 1)
    assert later.counter >= first.counter + 2, "the holder renews every renew_ms"


@pytest.mark.root
def test_release_lets_the_other_node_acquire_at_once(shared):
    a, b = shared.alpha, shared.bravo
    assert shared.run(a, "start").returncode == 0
    assert shared.run(a, "stop").returncode == 0
    assert shared.block().record.released
    assert shared.run(a, "monitor").returncode == 7
    res, took = shared.timed(b, "start")
    assert res.returncode == 0, res.stderr
    assert took < LEASE_MS / 1000 * 0.7, took
    assert shared.block().record.owner == "bravo" and shared.block().record.generation == 2
    assert shared.run(a, "stop").returncode == 0, "stopping a lease this node does not hold succeeds"
    assert shared.run(b, "monitor").returncode == 0, "and leaves the other node's lease alone"
    assert shared.run(b, "start").returncode == 0, "start of a started lease succeeds"
    assert shared.block().record.generation == 2


@pytest.mark.root
def test_dead_holder_is_taken_over_only_after_the_lease(shared):
    a, b = shared.alpha, shared.bravo
    assert shared.run(a, "start").returncode == 0
    os.kill(shared.renewer(a), signal.SIGKILL)
    killed = time.monotonic()
    res = shared.run(b, "start")
    took = time.monotonic() - killed
    assert res.returncode == 0, res.stderr
    assert took >= LEASE_MS / 1000, f"took over {took:.2f} s after the holder died, before the lease ran out"
    assert took < LEASE_MS / 1000 + 1.5, took
    assert "expired: unchanged for 1500ms" in res.stderr
    mon = shared.run(a, "monitor")
    assert mon.returncode == 1 and "taken away" in mon.stderr and "bravo" in mon.stderr
    assert shared.run(a, "stop").returncode == 0
    assert shared.run(b, "monitor").returncode == 0
    assert shared.block().record.owner == "bravo" and not shared.block().record.released


@pytest.mark.root
def test_the_observer_counts_the_watch_from_the_last_change_it_saw(shared):
    a, b = shared.alpha, shared.bravo
    assert shared.run(a, "start").returncode == 0
    assert shared.run(b, "monitor").returncode == 7  # not held here: the observer starts watching
    (seen,) = shared.pidfiles(b, "seen")
    time.sleep(1.0)
    res, took = shared.timed(b, "start")
    assert res.returncode == 1 and "held by alpha" in res.stderr, "a renewing holder still wins over the observer"
    assert took < LEASE_MS / 1000, took
    assert shared.run(b, "monitor").returncode == 7
    os.kill(shared.renewer(a), signal.SIGKILL)
    killed = time.monotonic()
    time.sleep(1.0)
    res, took = shared.timed(b, "start")
    since_kill = time.monotonic() - killed
    assert res.returncode == 0, res.stderr
    assert "by the observer" in res.stderr, res.stderr
    # the last renewal was at most renew_ms (500) before the kill: never taken before a lease after it
    assert since_kill >= LEASE_MS / 1000 - 0.5, since_kill
    assert took < LEASE_MS / 1000, f"start took {took:.2f} s, a whole lease or more: the observer did not count"
    assert shared.block().record.owner == "bravo"
    assert shared.pidfiles(b, "seen") == [], "holding the lease, bravo's observer is stopped"
    assert start_ticks(seen["pid"]) is None, "the observer process is gone (or a zombie for init to reap)"
    assert shared.run(a, "stop").returncode == 0
    assert shared.run(b, "stop").returncode == 0
    assert len(shared.pidfiles(b, "seen")) == 1, "after a stop the observer watches again"


@pytest.mark.root
def test_renewer_gone_but_record_ours_fails_monitor(shared):
    a = shared.alpha
    assert shared.run(a, "start").returncode == 0
    os.kill(shared.renewer(a), signal.SIGKILL)
    mon = shared.run(a, "monitor")
    assert mon.returncode == 1 and "renewer" in mon.stderr and "gone" in mon.stderr
    res, took = shared.timed(a, "start")  # a restart takes its own lease back without waiting
    assert res.returncode == 0, res.stderr
    assert took < LEASE_MS / 1000 * 0.7, took
    assert shared.block().record.generation == 2
    assert shared.run(a, "monitor").returncode == 0


@pytest.mark.root
def test_a_record_naming_this_node_that_no_renewer_of_ours_held_is_neither_released_nor_taken_at_once(shared):
    """After a reboot (/run is empty) or an acquire that gave up, the record names this node but may have replaced
    a record the other node had confirmed: stop leaves it to expire, and start watches it for a lease."""
    a = shared.alpha
    assert shared.run(a, "start").returncode == 0
    os.kill(shared.renewer(a), signal.SIGKILL)
    a.run(["sh", "-c", "rm -f /run/hastore/disklock-*.pid"], check=True)
    res = shared.run(a, "stop")
    assert res.returncode == 0 and "no renewer of ours held it: not releasing it" in res.stderr, res.stderr
    assert shared.block().names("alpha"), "not released"
    res, took = shared.timed(a, "start")
    assert res.returncode == 0, res.stderr
    assert "earlier run on this node" in res.stderr and took >= LEASE_MS / 1000 * 0.9, (took, res.stderr)
    assert shared.block().record.generation == 2


@pytest.mark.root
def test_stalled_holder_does_not_clobber_the_new_holder(shared):
    a, b = shared.alpha, shared.bravo
    assert shared.run(a, "start").returncode == 0
    pid = shared.renewer(a)
    os.kill(pid, signal.SIGSTOP)
    try:
        assert shared.run(b, "start").returncode == 0
    finally:
        os.kill(pid, signal.SIGCONT)
    time.sleep(1.0)  # two of alpha's renewal periods: it must notice and stop without writing
    block = shared.block()
    assert block.names("bravo") and block.record.generation == 2
    assert shared.run(b, "monitor").returncode == 0
    mon = shared.run(a, "monitor")
    assert mon.returncode == 1 and "taken away" in mon.stderr


@pytest.mark.root
def test_simultaneous_starts_have_exactly_one_winner(shared):
    env_for = {}
    for node in (shared.alpha, shared.bravo):
        env = {k: v for k, v in os.environ.items() if not k.startswith("OCF_")}
        env.update(PYTHONPATH=str(REPO), OCF_RESOURCE_INSTANCE="lock", OCF_RESKEY_device=shared.device,
                   OCF_RESKEY_lease_ms=str(LEASE_MS))
        env_for[node.name] = env
    for _ in range(4):
        procs = {n.name: n.popen([str(AGENT), "start"], env=env_for[n.name], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for n in (shared.alpha, shared.bravo)}
        codes = {name: p.wait(30) for name, p in procs.items()}
        errors = {name: p.stderr.read() for name, p in procs.items()}
        for p in procs.values():
            p.stdout.close()
            p.stderr.close()
        winners = [name for name, code in codes.items() if code == 0]
        assert len(winners) == 1, (codes, errors)
        (loser,) = set(codes) - set(winners)
        assert codes[loser] == 1, errors[loser]
        assert shared.block().names(winners[0])
        assert shared.run(shared.lab.nodes[winners[0]], "monitor").returncode == 0
        assert shared.run(shared.lab.nodes[loser], "monitor").returncode == 7
        assert shared.run(shared.lab.nodes[winners[0]], "stop").returncode == 0


@pytest.mark.root
def test_foreign_data_is_never_overwritten_and_offset_moves_the_lease(shared):
    a = shared.alpha
    foreign = b"XFSB" + bytes(range(256)) * 15
    with open(shared.device, "r+b") as f:
        f.write(foreign)
    res = shared.run(a, "start")
    assert res.returncode == 6 and "refusing to overwrite" in res.stderr
    res = shared.run(a, "start", offset="8192")
    assert res.returncode == 0, res.stderr
    assert shared.block(8192).names("alpha")
    assert shared.run(a, "stop", offset="8192").returncode == 0
    with open(shared.device, "rb") as f:
        assert f.read(len(foreign)) == foreign


@pytest.mark.root
@pytest.mark.parametrize("params,word", [({"offset": "100"}, "offset"), ({"renew_ms": "1000"}, "renew_ms"),
                                         ({"lease_ms": "soon"}, "lease_ms"), ({"node": "a b"}, "node")])
def test_bad_parameters(shared, params, word):
    res = shared.run(shared.alpha, "validate-all", **params)
    assert res.returncode == 6 and word in res.stderr


@pytest.mark.root
def test_missing_device(shared):
    a = shared.alpha
    assert shared.run(a, "start", device="/dev/hastore-no-such-disk").returncode == 5
    assert shared.run(a, "monitor", device="/dev/hastore-no-such-disk").returncode == 7
    assert shared.run(a, "stop", device="/dev/hastore-no-such-disk").returncode == 0


@pytest.mark.root
def test_ocf_tester_passes_inside_a_lab_node(shared):
    out = ocf_tester(AGENT, {"device": shared.device, "lease_ms": str(LEASE_MS)},
                     prefix=shared.alpha.command([])).stdout
    assert "passed all tests" in out
    assert shared.block().record.released
    assert shared.pidfiles(shared.alpha) == []


@pytest.mark.root
def test_wait_ms_takes_the_lease_once_the_holder_releases_it(shared):
    a, b = shared.alpha, shared.bravo
    assert shared.run(a, "start").returncode == 0
    waiter = b.popen([str(AGENT), "start"], env=shared.env(wait_ms="5000"), stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.8)
        assert waiter.poll() is None, "a renewed lease is waited for, not refused, within wait_ms"
        released = time.monotonic()
        assert shared.run(a, "stop").returncode == 0
        _, err = waiter.communicate(timeout=10)
    finally:
        if waiter.poll() is None:
            waiter.kill()
    assert waiter.returncode == 0, err
    assert time.monotonic() - released < LEASE_MS / 1000, "taken at the release, not after a whole lease"
    assert "waiting up to 5000ms" in err
    assert shared.block().record.owner == "bravo"
    res, took = shared.timed(a, "start", wait_ms="600")
    assert res.returncode == 1 and took >= 0.6, (res.stderr, took)
