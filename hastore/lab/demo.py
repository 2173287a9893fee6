"""`hastore lab demo`: the lab up, rows written through the VIP, the active node killed, the takeover shown
as a timeline (text and PNG), the node brought back and the group failed back.

Run as root on Debian 12 after scripts/install-deps (the README's first command does both).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from hastore.lab import cli, timeline
from hastore.lab.probe import Writer, start_probe
from hastore.lab.scenario import LabHandle, Sampler, decisions, log_time

TABLE = "demo"


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def daemon_milestones(lab: LabHandle, node: str, since_wall: float, peer: str) -> list[dict]:
    """What the daemon on `node` logged after since_wall, as {t (monotonic), label} items."""
    offset = time.time() - time.monotonic()
    out = []
    patterns = ((f"{peer} is dead", f"{node} declares {peer} dead"), (f"{peer} left the cluster", f"{node} hears {peer} leave"),
                ("taking group", f"{node} decides to take the group"),
                ("starting group", f"{node} decides to start the group"),
                ("group group1 started", f"{node}: group started"))
    seen = set()
    for e in lab.logs(node):
        wall = log_time(e)
        if wall is None or wall < since_wall:
            continue
        text = e.get("reason", "") if e.get("event") == "decision" else ""
        if e.get("event") == "agent" and e.get("op") == "start" and e.get("rc") == 0:
            label = f"{node}: {e.get('resource', '?').split('::')[0]} started"
        else:
            label = next((lbl for pat, lbl in patterns if pat in text), None)
        if label and label not in seen:
            seen.add(label)
            out.append({"t": wall - offset, "label": label})
    return out


def failover(lab: LabHandle, kind: str, victim: str, title: str, png: Path, writer_table: str) -> dict:
    survivor = lab.peer(victim)
    db = lab.db
    probe = start_probe(lab, lab.vip, db["port"], lab.d / f"probe-{png.stem}.jsonl", macs=lab.macs,
                        writer=Writer(user=db["user"], password=db["password"], database=db["database"],
                                      table=writer_table))
    sampler = Sampler(lab)
    sampler.start()
    try:
        lab.wait("writes through the VIP", lambda: sum(1 for e in probe.events() if e.get("kind") == "write") >= 1,
                 timeout=30)
        time.sleep(1.0)
        since_wall = time.time()
        say(f"{title}: t=0")
        t0 = lab.fault(victim, kind) if kind != "standby" else _standby(lab, victim)
        lab.wait_group_on(survivor, timeout=60)
        lab.wait("a write after the fault", lambda: any(
            e.get("kind") == "write" and e["t"] > t0 for e in probe.events()), timeout=30)
        time.sleep(0.5)
    finally:
        samples = sampler.stop()
        events = probe.stop()
    extra = daemon_milestones(lab, survivor, since_wall, victim)
    ms = timeline.derive(events, t0, extra)
    print(timeline.text(ms))
    timeline.png(ms, png, title)
    both = sampler.overlaps()
    say(f"picture: {png}")
    say(f"samples of who holds the group: {len(samples)}; with both nodes holding something: {len(both)}")
    return {"events": events, "milestones": ms, "overlaps": both}


def _standby(lab: LabHandle, node: str) -> float:
    t = time.monotonic()
    r = lab.hastore(node, "standby")
    if r.returncode != 0:
        raise RuntimeError(f"hastore standby on {node}: {r.stderr.strip()}")
    return t


def run(d: Path, keep: bool = False) -> int:
    say(f"building the lab in {d} (two nodes in network namespaces, a shared disk, MariaDB)")
    info = cli.up(d)
    cli.print_summary(info)
    lab = LabHandle(d)
    out = d.with_name(d.name + "-demo")  # outlives `lab down`
    out.mkdir(parents=True, exist_ok=True)
    ok = True
    try:
        holder = lab.heal_all()
        peer = lab.peer(holder)
        say(f"the group runs on {holder}: disk lock -> ext4 mount -> VIP {lab.vip} -> MariaDB")
        lab.sql(f"DROP TABLE IF EXISTS {TABLE}")
        r1 = failover(lab, "kill", holder, f"kill -9 of hastore on {holder}", out / "timeline-kill.png", TABLE)
        say(f"bringing {holder} back")
        lab.fault(holder, "heal")
        lab.wait("both nodes see each other", lab.healthy, timeout=60)
        say(f"failing back: hastore standby on {peer}")
        r2 = failover(lab, "standby", peer, f"hastore standby on {peer} (fail back)", out / "timeline-failback.png",
                      TABLE + "_back")
        for name, r in (("failover", r1), ("failback", r2)):
            [acked] = [e for e in r["events"] if e.get("kind") == "acked"] or [{"ids": []}]
            table = TABLE if name == "failover" else TABLE + "_back"
            stored = {int(x) for x in lab.sql(f"SELECT id FROM {table}").stdout.split()}
            lost = sorted(set(acked["ids"]) - stored)
            say(f"{name}: {len(acked['ids'])} writes acknowledged, {len(lost)} missing afterwards"
                + (f": {lost[:10]}" if lost else ""))
            ok = ok and not lost and not r["overlaps"]
    finally:
        if keep:
            say(f"the lab stays up: hastore lab status --dir {d}; hastore lab down --dir {d}")
        else:
            say("taking the lab down")
            cli.down(d)
    say("done" if ok else "FAILED: see above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1]) if len(sys.argv) > 1 else cli.DEFAULT_DIR))
