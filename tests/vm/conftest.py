"""When a VM lab test fails, its report carries what the guests' daemons logged (the last decisions and warnings of
each), so a failure in CI can be read without the lab, which is gone by then."""

from __future__ import annotations

import json

import pytest

TAIL = 40
SKIP = {"timestamp", "level", "event"}


def guest_log_tail(vm, node: str) -> str:
    """The last lines of the guest's /var/log/hastore.log above debug, short; lines that are not JSON (a traceback,
    Python's own complaints before logging was set up) are kept as they are: they say why a daemon is not there."""
    try:
        _, text, _ = vm.exec(node, ["cat", "/var/log/hastore.log"], timeout=30)
    except Exception as e:  # noqa: BLE001 - the guest may be down or its channel broken: say so, never mask the failure
        return f"(could not read {node}'s /var/log/hastore.log: {e})"
    out = []
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
    return "\n".join(out[-TAIL:]) or "(empty)"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    vm = getattr(item, "funcargs", {}).get("vm")
    if report.when == "call" and report.failed and vm is not None:
        for node in ("alpha", "bravo"):
            report.sections.append((f"hastore log of {node} (last {TAIL} lines above debug)",
                                    guest_log_tail(vm, node)))
