"""Process identity: a zombie is not alive."""

import os
import subprocess
import time

from hastore.io.proc import start_ticks


def test_a_live_process_has_a_start_time_and_its_zombie_has_none():
    p = subprocess.Popen(["sleep", "30"])
    try:
        assert start_ticks(p.pid) is not None and start_ticks(p.pid) == start_ticks(p.pid)
        p.kill()
        deadline = time.monotonic() + 5
        while start_ticks(p.pid) is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert os.path.exists(f"/proc/{p.pid}"), "still a zombie: not reaped yet"
        assert start_ticks(p.pid) is None
    finally:
        p.kill()
        p.wait()
    assert start_ticks(p.pid) is None
    assert start_ticks(os.getpid()) is not None
