"""One daemon per UDP port and interface in a network namespace (hastore.io.transports.claim_port); no root needed."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from hastore.io.transports import TransportError, claim_port, turn_away


def free_port() -> int:
    """Random and far from Heartbeat's 694: the claim is per network namespace, and a daemon may run in this one."""
    return random.randrange(20000, 60000)


def test_a_second_claim_is_refused_and_names_the_holder():
    port = free_port()
    first = claim_port("eth1", port)
    try:
        for _ in range(20):  # more than the claim's backlog: turn_away keeps it from filling up
            with pytest.raises(TransportError) as e:
                claim_port("eth1", port)
            assert str(e.value).startswith(f"UDP port {port} on eth1: another hastore daemon (pid {os.getpid()})")
            turn_away(first)
        assert "another udpport" in str(e.value)
        for other in (claim_port("eth1", port + 1), claim_port("eth2", port)):  # other port, other interface
            other.close()
    finally:
        first.close()
    claim_port("eth1", port).close()  # closed: free again


def test_the_claim_dies_with_its_process():
    """No stale lock after kill -9: the kernel frees an abstract socket with its last descriptor."""
    port = free_port()
    child = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from hastore.io.transports import claim_port
claim = claim_port("eth1", {port})
print("held", flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(TransportError, match=rf"pid {child.pid}\)"):
            claim_port("eth1", port)
    finally:
        child.kill()
        child.wait()
    claim_port("eth1", port).close()
