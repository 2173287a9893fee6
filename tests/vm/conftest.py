"""When a VM lab test fails, its report carries what the guests' daemons logged (the last decisions and warnings of
each), so a failure in CI can be read without the lab, which is gone by then."""

from __future__ import annotations

import json

import pytest

TAIL = 30
MOVES = 12
SKIP = {"timestamp", "level", "event"}


def guest_log(vm, node: str) -> tuple[list[str], list[str]]:
    """The guest's /var/log/hastore.log above debug, one short line each: (all of them, the decisions that started
    or stopped a group and the daemon's starts). Lines that are not JSON (a traceback, Python's own complaints
    before logging was set up) are kept as they are: they say why a daemon is not there."""
    try:
        _, text, _ = vm.exec(node, ["cat", "/var/log/hastore.log"], timeout=30)
    except Exception as e:  # noqa: BLE001 - the guest may be down or its channel broken: say so, never mask the failure
        return [f"(could not read {node}'s /var/log/hastore.log: {e})"], []
    out, moves = [], []
    for line in text.splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            out.append(line[:400])
            continue
        if isinstance(e, dict) and e.get("level") != "debug":
            rest = " ".join(f"{k}={e[k]}" for k in e if k not in SKIP)
            when = str(e.get("timestamp", ""))[11:23]
            out.append(f"{when} {e.get('level', '?'):7} {e.get('event', '')} {rest}"[:400])
            if e.get("actions") or e.get("event") in ("started", "exiting"):
                moves.append(out[-1])
    return out, moves


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    vm = getattr(item, "funcargs", {}).get("vm")
    if report.when == "call" and report.failed and vm is not None:
        # Each node's last group moves first, both nodes', then the tails: a CI report cut short keeps what
        # decided where the groups run.
        logs = {node: guest_log(vm, node) for node in ("alpha", "bravo")}
        for node, (_, moves) in logs.items():
            report.sections.append((f"{node}'s daemon starts and group moves (last {MOVES})",
                                    "\n".join(moves[-MOVES:]) or "(none)"))
        for node, (lines, _) in logs.items():
            report.sections.append((f"hastore log of {node} (last {TAIL} lines above debug)",
                                    "\n".join(lines[-TAIL:]) or "(empty)"))
