"""The fault suite: a running `hastore lab` (the same lab users get), one healthy start per scenario, audits.

Each scenario gets `run`: the lab healed and healthy (group on one node, both daemons up and seeing each
other), a sampler of the kernel's view (who holds VIP, mount, server) every 100 ms and a writer INSERTing
through the VIP every 100 ms.  After the scenario's own checks, `run.audit()` checks what holds for every
scenario: one holder, the VIP answers from its MAC, every acknowledged write is there, no daemon crashed,
and each move of the group has a reason in the new holder's log.
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
from pathlib import Path

import pytest

_seq = itertools.count()


def _lab(**opts):
    if shutil.which("mariadbd") is None:
        pytest.fail("MariaDB is not installed (scripts/install-deps installs it)")
    from hastore.lab import cli
    from hastore.lab.scenario import LabHandle
    d = Path(f"/var/tmp/hastore-scenarios-{os.getpid()}-{next(_seq)}")
    try:
        cli.up(d, owner_pid=os.getpid(), **opts)
        yield LabHandle(d)
    finally:
        cli.down(d)


@pytest.fixture(scope="module")
def lab(as_root):
    yield from _lab()


@pytest.fixture(scope="module")
def lab_failback(as_root):
    yield from _lab(auto_failback="on")


class Run:
    def __init__(self, lab, name: str):
        from hastore.lab.probe import Writer, start_probe
        from hastore.lab.scenario import Sampler
        self.lab = lab
        self.holder = lab.heal_all()
        self.table = f"w_{name}"[:60]
        lab.sql(f"DROP TABLE IF EXISTS {self.table}")
        self.sampler = Sampler(lab)
        self.sampler.start()
        db = lab.db
        writer = Writer(user=db["user"], password=db["password"], database=db["database"], table=self.table)
        self.probe = start_probe(lab, lab.vip, db["port"], lab.d / f"probe-{self.table}.jsonl", macs=lab.macs,
                                 writer=writer)
        self.wait_writes(3)
        self.t_start = time.monotonic()
        self.log_marks = {n: len(lab.logs(n)) for n in lab.nodes}
        self.expected_exits: set[str] = set()
        self.events: list[dict] | None = None

    def wait_writes(self, n: int, timeout: float = 30) -> None:
        self.lab.wait(f"{n} acknowledged writes", lambda: sum(
            1 for e in self.probe.events() if e.get("kind") == "write" and e.get("ok")) >= 1 and self.count() >= n,
            timeout)

    def count(self) -> int:
        r = self.lab.sql(f"SELECT COUNT(*) FROM {self.table}")
        return int(r.stdout.strip() or 0) if r.returncode == 0 else 0

    def new_logs(self, node: str) -> list[dict]:
        return self.lab.logs(node)[self.log_marks[node]:]

    def finish(self) -> list[dict]:
        if self.events is None:
            self.sampler.stop()
            self.events = self.probe.stop()
        return self.events

    def audit(self, holder: str, settled_at: float, kinds=("vip", "mount", "mysqld"),
              mount_never_twice: bool = True) -> None:
        """The checks every scenario ends with; holder must hold the group now."""
        lab = self.lab
        lab.wait_group_on(holder, timeout=60)
        # Writes keep being acknowledged through the VIP after the scenario.
        before = self.count()
        lab.wait("writes after the scenario", lambda: self.count() > before, timeout=30)
        # A quick scenario (a takeover now takes well under a second) may be over before the sampler looked often:
        # keep looking, so that the checks below rest on enough samples, after the settle as well.
        lab.wait("at least 11 samples of both nodes (or a sampling error)", lambda: self.sampler.errors or (
            len(self.sampler.samples) > 10 and sum(t >= settled_at for t, _ in self.sampler.samples) >= 3),
            timeout=20)
        events = self.finish()
        assert not self.sampler.errors, self.sampler.errors[:3]
        two = self.sampler.overlaps(kinds, after=settled_at)
        assert not two, f"both nodes held the group after it settled: {two[:5]}"
        if mount_never_twice:
            both_mounted = self.sampler.overlaps(("mount",))
            assert not both_mounted, f"both nodes mounted the shared filesystem: {both_mounted[:5]}"
        mac = lab.vip_mac()
        assert mac == lab.macs[holder], \
            f"the VIP answers from {mac}, not from {holder}'s MAC ({lab.macs}); {lab.addresses()}"
        [acked] = [e for e in events if e.get("kind") == "acked"] or [{"ids": []}]
        assert acked["ids"], "the writer had acknowledged writes"
        stored = {int(x) for x in lab.sql(f"SELECT id FROM {self.table}").stdout.split()}
        lost = sorted(set(acked["ids"]) - stored)
        assert not lost, f"acknowledged writes lost: {lost[:20]} (of {len(acked['ids'])})"
        from hastore.lab.scenario import crashes
        assert not crashes(lab), crashes(lab)
        st = lab.status()["nodes"]
        for n, v in st.items():
            assert v["daemon"] == "running" or n in self.expected_exits, (n, v["daemon"])
        if holder != self.holder:
            reasons = [e["reason"] for e in self.new_logs(holder) if e.get("event") == "decision"
                       and ("taking group" in e["reason"] or "starting group" in e["reason"])]
            assert reasons, f"{holder} took the group without a logged reason"


def _run(request, lab):
    r = Run(lab, f"{next(_seq)}_" + request.node.name.replace("test_", "").replace("[", "_").replace("]", "")[:40])
    try:
        yield r
    finally:
        r.finish()


@pytest.fixture
def run(request, lab):
    yield from _run(request, lab)


@pytest.fixture
def run_failback(request, lab_failback):
    yield from _run(request, lab_failback)
