#!/usr/bin/env python3
"""Failover benchmark on the namespace lab (`hastore lab`): disklock -> Filesystem -> IPaddr -> MariaDB,
keepalive 200 ms, deadtime 1 s, Heartbeat files.

Each trial starts from a healthy lab, writes rows through the VIP every 100 ms (PyMySQL) while probing it
(ICMP and TCP every 10 ms, and who answers ARP for it), injects the fault on the node holding the group and
measures, from the fault:
  - detection: the peer's daemon logs the holder dead (kill, crash, cut) or gone;
  - VIP answering: the first ICMP reply from the VIP while its MAC is the peer's;
  - first write: the first INSERT acknowledged through the VIP after the fault.
It also records each resource's start on the peer (from the daemon's "agent" log lines).

Kinds: kill (kill -9 of the holder's daemon: its guard stops the resources), crash (every process of the
node killed, addresses gone) and cut (the holder's heartbeat cable, serial line and LAN all down at once).

Usage (root): python3 bench/failover.py [--trials 10] [--kinds kill,crash,cut] [--dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hastore.lab import cli, timeline  # noqa: E402
from hastore.lab.demo import daemon_milestones  # noqa: E402
from hastore.lab.probe import Writer, start_probe  # noqa: E402
from hastore.lab.scenario import LabHandle  # noqa: E402

DEADTIME_MS = 1000


def inject(lab: LabHandle, kind: str, node: str) -> float:
    if kind in ("kill", "crash"):
        return lab.fault(node, kind)
    if kind == "cut":
        t0 = lab.fault(node, "link-down", "hb")
        lab.fault(node, "link-down", "serial")
        lab.fault(node, "link-down", "lan")
        return t0
    raise SystemExit(f"unknown kind {kind!r} (kill, crash, cut)")


def trial(lab: LabHandle, kind: str, n: int) -> dict:
    holder = lab.heal_all()
    peer = lab.peer(holder)
    table = f"bench_{kind}_{n}"
    lab.sql(f"DROP TABLE IF EXISTS {table}")
    db = lab.db
    probe = start_probe(lab, lab.vip, db["port"], lab.d / f"probe-{table}.jsonl", macs=lab.macs,
                        writer=Writer(user=db["user"], password=db["password"], database=db["database"], table=table))
    try:
        lab.wait("writes through the VIP", lambda: any(e.get("kind") == "write" and e.get("ok")
                                                       for e in probe.events()), timeout=30)
        time.sleep(0.5)
        since_wall = time.time()
        t0 = inject(lab, kind, holder)
        lab.wait_group_on(peer, timeout=60)
        lab.wait("a write after the fault", lambda: any(
            e.get("kind") == "write" and e.get("ok") and e["t"] > t0 for e in probe.events()), timeout=30)
    finally:
        events = probe.stop()
    ms = dict((label, round(t * 1000)) for label, t in reversed(
        timeline.derive(events, t0, daemon_milestones(lab, peer, since_wall, holder), from_node=holder)))
    dead = ms.get(f"{peer} declares {holder} dead", ms.get(f"{peer} hears {holder} leave"))
    [acked] = [e for e in events if e.get("kind") == "acked"] or [{"ids": []}]
    stored = {int(x) for x in lab.sql(f"SELECT id FROM {table}").stdout.split()}
    return {"kind": kind, "from": holder, "to": peer, "detect": dead,
            "vip": ms.get(timeline._vip_from(peer)), "write": ms.get(timeline.FIRST_WRITE),
            "lost": len(set(acked["ids"]) - stored),
            "starts": {k.split(": ", 1)[1]: v for k, v in ms.items() if k.startswith(f"{peer}: ") and
                       k.endswith(" started")}}


def figures(values: list[int | None]) -> str:
    v = sorted(x for x in values if x is not None)
    if not v:
        return "      -      -      -      -"
    p90 = v[min(len(v) - 1, round(0.9 * (len(v) - 1)))]
    return f"{statistics.median(v):7.0f}{v[0]:7d}{p90:7d}{v[-1]:7d}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--kinds", default="kill,crash,cut")
    p.add_argument("--dir", type=Path, default=Path("/var/tmp/hastore-bench-failover"))
    p.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    a = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/failover.py needs root (network namespaces, loop devices, mounts)")
    kinds = [k for k in a.kinds.split(",") if k]
    cli.up(a.dir, owner_pid=None if a.keep else os.getpid())
    lab = LabHandle(a.dir)
    results: list[dict] = []
    try:
        for kind in kinds:
            for n in range(a.trials):
                r = trial(lab, kind, n)
                results.append(r)
                starts = " ".join(f"{k}={v}" for k, v in sorted(r["starts"].items(), key=lambda kv: kv[1]))
                print(f"{kind:5} #{n:<2} {r['from']}->{r['to']}: detect {r['detect']} ms, VIP {r['vip']} ms, "
                      f"first write {r['write']} ms, lost {r['lost']}; starts: {starts}", flush=True)
    finally:
        if not a.keep:
            cli.down(a.dir)
    print(f"\nfailover, keepalive 200 ms / deadtime {DEADTIME_MS} ms, ms after the fault "
          f"(median, min, p90, max over {a.trials} trials)")
    print(f"{'kind':6}{'what':14}{'median':>7}{'min':>7}{'p90':>7}{'max':>7}")
    for kind in kinds:
        rs = [r for r in results if r["kind"] == kind]
        for what, key in (("detection", "detect"), ("VIP answering", "vip"), ("first write", "write")):
            print(f"{kind:6}{what:14}{figures([r[key] for r in rs])}")
        print(f"{kind:6}{'writes lost':14}{sum(r['lost'] for r in rs):7d}")
    print(f"\ntarget: VIP answering <= deadtime + 50 ms = {DEADTIME_MS + 50} ms median, per kind:")
    for kind in kinds:
        vip = [r["vip"] for r in results if r["kind"] == kind and r["vip"] is not None]
        if vip:
            med = statistics.median(vip)
            print(f"  {kind:6}{'met' if med <= DEADTIME_MS + 50 else 'NOT met':8} ({med:.0f} ms)")
    missing = [r for r in results if r["vip"] is None or r["write"] is None]
    return 1 if missing or any(r["lost"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
