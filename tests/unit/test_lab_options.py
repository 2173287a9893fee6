"""`hastore lab up` options checked before anything is built, and the lab's disk lease derived from deadtime."""

from __future__ import annotations

from pathlib import Path

import pytest

from hastore.lab import cli
from hastore.lab.keeper import haresources_line, lease_ms


@pytest.mark.parametrize("name", ["keepalive", "warntime", "deadtime", "initdead"])
def test_a_bad_timing_names_its_option_and_builds_nothing(tmp_path, name):
    d = tmp_path / "lab"
    with pytest.raises(cli.LabCliError, match=f"^--{name}: '1x' has unknown unit"):
        cli.up(d, **{name: "1x"})
    assert not d.exists()


def test_the_lease_follows_deadtime_with_a_floor():
    assert lease_ms("1s") == 1000
    assert lease_ms("2500ms") == 2500
    assert lease_ms("300ms") == 600
    line = haresources_line(Path("/var/tmp/x"), "/dev/loop7", "/dev/loop8", "alpha", lease_ms("3s"))
    assert line.startswith("alpha disklock::/dev/loop7::3000::8000 Filesystem::/dev/loop8::/var/tmp/x/data::ext4 ")
