"""Failover milestones from probe events (hastore.lab.probe) and daemon log items, as a table or a picture.

    ms = derive(probe_events, t_fault, extra=[{"t": t_dead, "label": "bravo declares alpha dead"}, ...])
    print(text(ms))
    png(ms, "failover.png", "alpha loses its LAN cable")

All times are CLOCK_MONOTONIC seconds (time.monotonic() of any process on the host); milestones are
``(label, seconds after the fault)`` sorted by time.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Milestone = tuple[str, float]

FAULT = "fault"
VIP_DOWN = "VIP stops answering (ICMP)"
TCP_DOWN = "TCP port stops answering"
WRITES_FAIL = "writes fail"
VIP_UP = "VIP answers again (ICMP)"
TCP_UP = "TCP port open"
FIRST_WRITE = "first write after the fault"


def _vip_from(node: str) -> str:
    return f"VIP answers from {node}'s MAC"


def derive(events: Iterable[Mapping[str, Any]], t0: float, extra: Iterable[Mapping[str, Any]] = (),
           *, slack: float = 0.05, from_node: str | None = None) -> list[Milestone]:
    """The standard milestones of one failover, in seconds after the fault at monotonic time t0.

    events: probe records (kinds icmp, tcp, mac, write, write-failed; an ``acked`` summary is used for
    the first write when no write event follows the fault).  extra: ``{"t": ..., "label": ...}`` items
    from daemon logs (peer declared dead, each resource started, ...).  Anything earlier than
    t0 - slack is history, not part of this failover (slack absorbs a fault time taken just after
    the action).  from_node: who held the VIP before (default: the MAC owner at t0).  A milestone
    that did not happen is left out.
    """
    evs = sorted((e for e in events if isinstance(e.get("t"), (int, float))), key=lambda e: e["t"])
    since = t0 - slack
    out: list[Milestone] = [(FAULT, 0.0)]

    def first(kind: str, ok: bool, after: float = since) -> Mapping[str, Any] | None:
        return next((e for e in evs if e.get("kind") == kind and bool(e.get("ok")) is ok
                     and e["t"] >= after), None)

    def add(label: str, e: Mapping[str, Any] | None) -> None:
        if e is not None:
            out.append((label, e["t"] - t0))

    down = first("icmp", False)
    add(VIP_DOWN, down)
    add(VIP_UP, first("icmp", True, down["t"] if down else since))
    add(TCP_DOWN, first("tcp", False))
    add(TCP_UP, first("tcp", True))
    failed = first("write-failed", False)
    add(WRITES_FAIL, failed)
    resumed = first("write", True, failed["t"] if failed else since)
    if resumed is None and failed is None:
        resumed = _first_ack(evs, since)
    add(FIRST_WRITE, resumed)

    # The owner of the VIP's MAC at the fault, then the first moment the VIP answers (ICMP ok)
    # while its MAC belongs to another node.  Unknown owner (probe started late): left out.
    before, captured = from_node, from_node is not None
    owner, icmp_ok = None, False
    for e in evs:
        if not captured and e["t"] >= since:
            before, captured = owner, True
        kind = e.get("kind")
        if kind == "mac":
            owner = e.get("node") or (e.get("detail") or {}).get("mac")
        elif kind == "icmp":
            icmp_ok = bool(e.get("ok"))
        else:
            continue
        if captured and e["t"] >= since and before is not None and icmp_ok and owner not in (None, before):
            out.append((_vip_from(owner), e["t"] - t0))
            break

    for item in extra:
        t, label = item.get("t"), item.get("label")
        if isinstance(t, (int, float)) and label and t >= since:
            out.append((str(label), t - t0))
    out.sort(key=lambda m: (m[1], m[0] != FAULT))
    return out


def _first_ack(evs: Sequence[Mapping[str, Any]], since: float) -> Mapping[str, Any] | None:
    """The first acknowledged write at or after `since`, from the probe's ``acked`` summary."""
    times = [t for e in evs if e.get("kind") == "acked" for t in e.get("t_acked") or [] if t >= since]
    return {"t": min(times)} if times else None


def text(milestones: Sequence[Milestone]) -> str:
    """An aligned table: label, then milliseconds after the fault."""
    if not milestones:
        return "(no milestones)"
    width = max(len("milestone"), *(len(label) for label, _ in milestones))
    lines = [f"{'milestone':<{width}}  {'after fault':>11}"]
    for label, s in milestones:
        lines.append(f"{label:<{width}}  {round(s * 1000):>+8d} ms")
    return "\n".join(lines)


def png(milestones: Sequence[Milestone], path: str | os.PathLike, title: str = "failover") -> None:
    """A horizontal timeline (x: ms after the fault), one marker and label per milestone."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError(f"the timeline picture needs matplotlib ({e}): "
                           "pip install 'hastore[lab]' (matplotlib)") from None
    ms = sorted(((label, s * 1000.0) for label, s in milestones), key=lambda m: m[1])
    if not ms:
        ms = [(FAULT, 0.0)]
    xs = [x for _, x in ms]
    lo, hi = min(0.0, *xs), max(0.0, *xs)
    span = max(hi - lo, 1.0)
    # Stems of staggered heights, alternating above and below the axis, so close labels do not collide.
    levels = [3, -3, 2, -2, 1, -1]
    fig, ax = plt.subplots(figsize=(12, 2.2 + 0.35 * len(ms)), layout="constrained")
    ax.axhline(0, color="0.3", linewidth=1.2, zorder=1)
    for i, (label, x) in enumerate(ms):
        level = levels[i % len(levels)]
        color = "black" if label == FAULT else f"C{i % 10}"
        ax.vlines(x, 0, level, color=color, linewidth=0.8, zorder=1)
        ax.plot([x], [0], "o", color=color, markersize=7, zorder=3)
        ax.annotate(f"{label}\n{x:+.0f} ms", xy=(x, level), xytext=(3, 3 if level > 0 else -3),
                    textcoords="offset points", ha="left", va="bottom" if level > 0 else "top",
                    fontsize=9, bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": color, "lw": 0.6})
    ax.set_xlim(lo - 0.05 * span, hi + 0.35 * span)     # room on the right for the last labels
    ax.set_ylim(-4.2, 4.2)
    ax.yaxis.set_visible(False)
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    ax.set_xlabel("ms after the fault")
    ax.set_title(title)
    ax.grid(axis="x", color="0.9", zorder=0)
    fig.savefig(os.fspath(path), format="png", dpi=110)
    plt.close(fig)
