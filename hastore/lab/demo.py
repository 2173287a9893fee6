"""The pair demo: two `hastore run` daemons in a namespace lab, then the faults a Heartbeat admin tests by hand.

    python3 -m hastore.lab.demo        (root)

Prints each step with the time since the fault and what `hastore status` says. Everything it creates
(namespaces, socat, daemons) is removed when it ends, also on Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from hastore.cli.main import format_status
from hastore.lab.netns import Lab
from hastore.lab.pair import Pair, PairTiming, peer_alive, peer_dead


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def owner(status: dict) -> str | None:
    return next(iter(status["groups"].values()))["owner"]


def timed(pair: Pair, node: str, predicate, what: str, t0: float, timeout: float = 10) -> dict:
    s = pair.wait_for(node, predicate, timeout=timeout, interval=0.02)
    print(f"   +{(time.monotonic() - t0) * 1000:6.0f} ms  {what}", flush=True)
    return s


def main() -> int:
    if os.geteuid() != 0:
        print("the demo needs root (network namespaces)", file=sys.stderr)
        return 2
    timing = PairTiming()
    with Lab() as lab, Pair(lab, timing) as pair:
        say(f"lab {lab.prefix}: nodes alpha and bravo, heartbeat over a veth pair (ucast) and a pty serial line, "
            f"ping node {lab.gateway}; keepalive {timing.keepalive}, deadtime {timing.deadtime}")
        print(f"   config (Heartbeat format): {lab.workdir}/alpha/ha.d/ha.cf")
        pair.start_all()
        t0 = time.monotonic()
        for me, peer in (("alpha", "bravo"), ("bravo", "alpha")):
            timed(pair, me, peer_alive(peer, {"ucast": True, "serial": True}), f"{me} sees {peer} on both links", t0)
        timed(pair, "bravo", lambda s: owner(s) == "alpha", "alpha (preferred node) holds group1", t0)
        print(format_status(pair.status("bravo")))

        say("fault: the heartbeat cable (veth) goes down — serial keeps the cluster together")
        t0 = time.monotonic()
        lab.link_down("alpha", "hb")
        timed(pair, "bravo", peer_alive("alpha", {"ucast": False, "serial": True}),
              "bravo: ucast link dead, alpha still alive over serial", t0)
        time.sleep(1.2)
        print(f"   group1 still on {owner(pair.status('bravo'))} (no failover)")
        lab.link_up("alpha", "hb")
        timed(pair, "bravo", peer_alive("alpha", {"ucast": True, "serial": True}), "cable back: both links up", t0)

        say("fault: alpha's daemon is killed with SIGKILL (no goodbye) — bravo waits deadtime, then takes over")
        t0 = time.monotonic()
        pair.signal("alpha", signal.SIGKILL)
        timed(pair, "bravo", lambda s: s["peers"]["alpha"]["state"] == "warn", "bravo: alpha is late (warntime)", t0)
        timed(pair, "bravo", peer_dead("alpha"), "bravo: alpha declared dead", t0)
        timed(pair, "bravo", lambda s: owner(s) == "bravo", "bravo holds group1", t0)
        print(format_status(pair.status("bravo")))

        say("alpha's daemon starts again (auto_failback off: the group stays on bravo)")
        t0 = time.monotonic()
        pair.procs["alpha"].wait(5)
        pair.start("alpha")
        timed(pair, "bravo", peer_alive("alpha", {"ucast": True, "serial": True}), "bravo sees alpha's new generation", t0)
        print(f"   group1 on {owner(pair.status('alpha'))}")

        say("planned stop: SIGTERM to bravo — it releases, tells alpha, alpha takes over without waiting deadtime")
        t0 = time.monotonic()
        pair.signal("bravo", signal.SIGTERM)
        timed(pair, "alpha", lambda s: owner(s) == "alpha", "alpha holds group1", t0)
        print(format_status(pair.status("alpha")))
        print("\nreasons alpha logged, newest last:")
        for e in pair.events("alpha")[-6:]:
            if e.get("reason"):
                print(f"   {e['timestamp'][11:23]}  {e['reason']}")
    print("\nlab removed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
