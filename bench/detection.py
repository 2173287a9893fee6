#!/usr/bin/env python3
"""Detection benchmark: two `hastore run` daemons in a namespace lab (ucast veth + pty serial line).

For each timing profile it cuts every heartbeat path of alpha (nftables drop on the veth + the serial
line's socat stopped) and measures on bravo:
  - fault -> peer declared dead, minus deadtime (negative values are normal: the last beat before the
    fault arrived up to one keepalive earlier);
  - timer overshoot: the silence bravo measured when it declared alpha dead, minus deadtime (how late the
    engine's timer fired after the deadline; the target is <= 50 ms median).
Then idle CPU (% of one core, all its threads, from /proc/PID/task/*/schedstat), wakeups per second and RSS of each daemon over
--idle-seconds at the first profile (with the share of its timer ticks that read the quiet links first), their
guards' CPU, and for scale what a bare asyncio loop that passes one datagram per keepalive costs on the same
machine, and one that makes the daemon's system calls and nothing else.

Usage (root): python3 bench/detection.py [--trials 20] [--idle-seconds 60] [--no-pump]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hastore.lab.netns import Lab  # noqa: E402
from hastore.lab.pair import Pair, PairTiming, peer_alive  # noqa: E402

PROFILES = {
    "200ms/1s": PairTiming("200ms", "500ms", "1000ms", "3s"),
    "50ms/200ms": PairTiming("50ms", "100ms", "200ms", "3s"),
}
SILENCE = re.compile(r"no beat for (\d+) ms \(deadtime (\d+) ms\)")


def ms(v: str) -> int:
    return int(v[:-2]) if v.endswith("ms") else int(float(v[:-1]) * 1000)


def wait_dead_event(pair: Pair, seen: int, timeout: float = 10.0) -> tuple[dict, int]:
    """The first peer-dead decision on bravo logged after the first `seen` log lines."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = pair.events("bravo")
        for e in events[seen:]:
            if "peer-dead" in e.get("noticed", []):
                return e, len(events)
        time.sleep(0.02)
    raise TimeoutError("bravo never declared alpha dead")


def trial(pair: Pair, lab: Lab, deadtime_ms: int) -> tuple[float, float]:
    seen = len(pair.events("bravo"))
    lab.serial_down()
    time.sleep(0.05)
    t_fault = time.time()
    lab.loss("alpha", "hb", 100)
    event, _ = wait_dead_event(pair, seen)
    t_dead = dt.datetime.fromisoformat(event["timestamp"]).timestamp()
    silences = [int(m.group(1)) for m in SILENCE.finditer(event["reason"])]
    overshoot = max(silences) - deadtime_ms if silences else float("nan")
    lab.heal("alpha")
    lab.serial_up()
    pair.wait_for("bravo", peer_alive("alpha", {"ucast": True, "serial": True}), timeout=15)
    pair.wait_for("alpha", peer_alive("bravo", {"ucast": True, "serial": True}), timeout=15)
    return (t_dead - t_fault) * 1000 - deadtime_ms, overshoot


def summary(values: list[float]) -> str:
    q = statistics.quantiles(values, n=20, method="inclusive") if len(values) >= 2 else [values[0]] * 19
    return (f"median {statistics.median(values):7.1f}  min {min(values):7.1f}  p95 {q[18]:7.1f}  "
            f"max {max(values):7.1f}  stdev {statistics.pstdev(values):6.1f}")


def cpu_ns(pid: int) -> int:
    """CPU time of a process's threads in ns (/proc/PID/task/*/schedstat: finer than clock ticks): the loop and
    the beat pump's thread, which both live as long as the daemon."""
    return sum(int(Path(f"/proc/{pid}/task/{t}/schedstat").read_text().split()[0])
               for t in os.listdir(f"/proc/{pid}/task"))


def wakeups(pid: int) -> int:
    """Voluntary context switches of all the process's threads."""
    total = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        for line in Path(f"/proc/{pid}/task/{t}/status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                total += int(line.split()[1])
    return total


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


# What any Python asyncio program pays on this machine to wake once per keepalive: the floor under the daemon's
# figure. With every=False it passes one datagram; with every=True it makes the system calls the daemon makes every
# keepalive and nothing else: read the peer's beat, sign and send ours over UDP and a serial line (a pty here), send
# an ICMP echo and read its reply, pet the guard. No decisions and no parsing: what the idle target leaves for all
# of those is the target minus this figure. With plain=True the same calls run from a bare select.epoll loop instead
# of asyncio's: the floor for any Python process that beats, whatever its loop.
BASELINE = """
import asyncio, hmac, os, pty, select, socket, struct, time
from pathlib import Path
def cpu(): return int(Path("/proc/self/schedstat").read_text().split()[0])
def beater(every):
    a, b = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
    for s in (a, b):
        s.bind(("127.0.0.1", 0)); s.setblocking(False)
    reads = [lambda: a.recv(2048)]
    if every:
        pet, guard = socket.socketpair()
        pet.setblocking(False)
        master, line = pty.openpty()
        for fd in (master, line):
            os.set_blocking(fd, False)
        icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        icmp.setblocking(False)
        reads += [lambda: os.read(line, 4096), lambda: icmp.recv(2048)]
    seq = 0
    def tick():
        nonlocal seq
        seq += 1
        for read in reads:
            try:
                while True:
                    read()
            except BlockingIOError:
                pass
        if not every:
            b.sendto(bytes(110), a.getsockname())
        else:
            signed = struct.pack("!QQ", 1, seq) + bytes(95)
            beat = signed + hmac.digest(b"k" * 20, signed, "sha1")
            b.sendto(beat, a.getsockname())
            os.write(master, beat)
            icmp.sendto(struct.pack("!BBHHH", 8, 0, 0, 1, seq & 0xFFFF) + bytes(12), ("127.0.0.1", 0))
            try:
                pet.send(b'{"m":"pet"}\\n')
            except BlockingIOError:
                pass  # nobody reads the guard's end here: full after a minute, the call is still made
    tick.keep = (a, b, guard) if every else (a, b)  # the sockets live as long as the beat
    return tick
async def on_asyncio(seconds, tick):
    loop = asyncio.get_running_loop()
    def again():
        tick()
        loop.call_later(0.2, again)
    again()
    await asyncio.sleep(1)
    t0, c0 = time.monotonic(), cpu()
    await asyncio.sleep(seconds)
    return (cpu() - c0) / 1e9 / (time.monotonic() - t0) * 100
def on_epoll(seconds, tick):
    ep = select.epoll()
    start = due = time.monotonic()
    t0 = c0 = None
    while t0 is None or time.monotonic() - t0 < seconds:
        now = time.monotonic()
        if t0 is None and now - start >= 1.0:
            t0, c0 = now, cpu()
        if now >= due:
            tick()
            due += 0.2
        ep.poll(max(0.0, due - time.monotonic()))
    return (cpu() - c0) / 1e9 / (time.monotonic() - t0) * 100
seconds, every, plain = %f, %s, %s
tick = beater(every)
print(on_epoll(seconds, tick) if plain else asyncio.run(on_asyncio(seconds, tick)))
"""


def baseline(seconds: float, every: bool, plain: bool = False) -> float:
    r = subprocess.run([sys.executable, "-c", BASELINE % (min(seconds, 30), every, plain)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        print(f"  (baseline failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode})")
    return float(r.stdout or "nan")


def idle(pair: Pair, seconds: float) -> None:
    """Both daemons at once: their timer phases differ, and with them how often a beat tick reads (see the README)."""
    nodes = sorted(pair.procs)
    pids = {n: pair.procs[n].pid for n in nodes}
    for pid in pids.values():
        comm = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
        assert "hastore" in comm and "run" in comm, comm
    status = {n: pair.status(n) or {} for n in nodes}
    guards = {n: (status[n].get("guard") or {}).get("pid") for n in nodes}
    timer0 = {n: status[n].get("timer") or {} for n in nodes}
    t0 = time.monotonic()
    c0, w0 = {n: cpu_ns(pids[n]) for n in nodes}, {n: wakeups(pids[n]) for n in nodes}
    g0 = {n: cpu_ns(guards[n]) for n in nodes if guards[n]}
    peak = dict.fromkeys(nodes, 0)
    while time.monotonic() - t0 < seconds:
        time.sleep(1)
        for n in nodes:
            peak[n] = max(peak[n], rss_kib(pids[n]))
    elapsed = time.monotonic() - t0
    cpus = {n: (cpu_ns(pids[n]) - c0[n]) / 1e9 / elapsed * 100 for n in nodes}
    gcpu = {n: (cpu_ns(guards[n]) - g0[n]) / 1e9 / elapsed * 100 for n in g0}
    wake = {n: (wakeups(pids[n]) - w0[n]) / elapsed for n in nodes}
    rss = {n: rss_kib(pids[n]) for n in nodes}
    print(f"idle over {seconds:.0f} s at keepalive 200 ms (ucast + serial + 1 ping node), per daemon:")
    for n in nodes:
        t1 = (pair.status(n) or {}).get("timer") or {}
        fired = t1.get("fired", 0) - timer0[n].get("fired", 0)
        reads = t1.get("read", 0) - timer0[n].get("read", 0)
        share = f"{reads / fired * 100:.0f} % of its {fired} timer ticks read" if fired else "timer ticks unknown"
        guard = f"{gcpu[n]:.2f} %" if n in gcpu else "no guard"
        print(f"  {n}: CPU {cpus[n]:.2f} % of one core ({share}), {wake[n]:.1f} wakeups/s, "
              f"RSS {rss[n] / 1024:.1f} MiB (peak {peak[n] / 1024:.1f} MiB); its guard {guard}")
    print(f"  mean of the two: {statistics.mean(cpus.values()):.2f} %")
    print(f"  for scale, on this machine: a bare asyncio loop passing one datagram per keepalive "
          f"{baseline(seconds, False):.2f} %; one making the daemon's system calls per keepalive and nothing "
          f"else {baseline(seconds, True):.2f} %; those calls from a plain epoll loop (no asyncio) "
          f"{baseline(seconds, True, plain=True):.2f} %")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--idle-seconds", type=float, default=60)
    ap.add_argument("--no-pump", action="store_true", help="run the daemons without the beat pump (HASTORE_PUMP=off)")
    args = ap.parse_args()
    if args.no_pump:
        os.environ["HASTORE_PUMP"] = "off"  # the lab's daemons inherit it (hastore.lab.pair)
    if os.geteuid() != 0:
        print("bench/detection.py needs root (network namespaces)", file=sys.stderr)
        return 2
    for name, timing in PROFILES.items():
        with Lab() as lab, Pair(lab, timing) as pair:
            pair.start_all()
            for me, peer in (("alpha", "bravo"), ("bravo", "alpha")):
                pair.wait_for(me, peer_alive(peer, {"ucast": True, "serial": True}), timeout=20)
            if name == "200ms/1s" and args.idle_seconds > 0:
                idle(pair, args.idle_seconds)
            results = [trial(pair, lab, ms(timing.deadtime)) for _ in range(args.trials)]
            print(f"keepalive/deadtime {name}, {args.trials} trials (ms):")
            print(f"  fault -> peer dead, minus deadtime: {summary([r[0] for r in results])}")
            print(f"  timer overshoot past deadline:      {summary([r[1] for r in results])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
