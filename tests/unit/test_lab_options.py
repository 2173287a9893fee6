"""`hastore lab up` options checked before anything is built, and the lab's disk lease derived from deadtime."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from hastore.lab import cli
from hastore.config.durations import parse_duration
from hastore.lab.keeper import haresources_line, lease_timing


@pytest.mark.parametrize("name", ["keepalive", "warntime", "deadtime", "initdead"])
def test_a_bad_timing_names_its_option_and_builds_nothing(tmp_path, name):
    d = tmp_path / "lab"
    with pytest.raises(cli.LabCliError, match=f"^--{name}: '1x' has unknown unit"):
        cli.up(d, **{name: "1x"})
    assert not d.exists()


def test_timings_that_do_not_fit_together_are_refused_before_building(tmp_path):
    d = tmp_path / "lab"
    with pytest.raises(cli.LabCliError, match=r"deadtime 300ms must be more than 2 x keepalive 200ms"):
        cli.up(d, deadtime="300ms")
    with pytest.raises(cli.LabCliError, match=r"initdead 1s must be at least deadtime 2s"):
        cli.up(d, deadtime="2s", initdead="1s")
    assert not d.exists()


def test_a_crashed_holders_lease_runs_out_before_it_is_declared_dead():
    for deadtime, keepalive in (("1s", "200ms"), ("2500ms", "200ms"), ("3s", "1s"), ("10s", "1s")):
        lease, renew = lease_timing(deadtime, keepalive)
        dead, beat = parse_duration(deadtime), parse_duration(keepalive)
        # declared dead >= deadtime - keepalive after the crash; the observer sees the last renewal's lease run
        # out at most lease + renew/2 after it
        assert lease + renew / 2 <= dead - beat, (deadtime, keepalive, lease, renew)
        assert 3 * renew <= lease and renew >= 50
    assert lease_timing("1s", "200ms") == (750, 100)
    assert lease_timing("300ms", "100ms") == (600, 50)  # the floors: too short a lease is worse than a slow one
    line = haresources_line(Path("/var/tmp/x"), "/dev/loop7", "/dev/loop8", "alpha", lease_timing("3s", "1s"))
    assert line.startswith("alpha disklock::/dev/loop7::1875::8000::250 Filesystem::/dev/loop8::/var/tmp/x/data::ext4 ")


@pytest.mark.parametrize("argv, want_dir, want_cmd", [
    (["--dir", "/var/tmp/l", "--", "hastore", "status"], "/var/tmp/l", ["hastore", "status"]),
    (["--dir=/var/tmp/l", "ip", "a"], "/var/tmp/l", ["ip", "a"]),
    (["--", "ls", "--dir", "x"], "/default", ["ls", "--dir", "x"]),    # after `--` it is the command's
    (["ls", "--dir", "x"], "/default", ["ls", "--dir", "x"]),
    ([], "/default", []),
])
def test_exec_takes_a_dir_written_after_the_node(argv, want_dir, want_cmd):
    args = argparse.Namespace(dir="/default", argv=argv)
    cli.take_exec_options(args)
    assert (args.dir, args.argv) == (want_dir, want_cmd)


def test_exec_parses_through_the_real_parser():
    from hastore.cli.main import _parser
    args = _parser().parse_args(["lab", "vm", "exec", "alpha", "--dir", "/var/tmp/v", "--", "true"])
    cli.take_exec_options(args)
    assert (args.dir, args.argv) == ("/var/tmp/v", ["true"])
