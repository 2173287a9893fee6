"""The daemon's state directory: its lock (one daemon per directory) and the boot generation."""

import os

import pytest

from hastore.io.state import StateError, StateStore


def test_one_daemon_per_state_directory(tmp_path):
    first = StateStore(str(tmp_path / "state"))
    first.lock()
    assert (tmp_path / "state" / "daemon.lock").read_text() == f"{os.getpid()}\n"
    second = StateStore(str(tmp_path / "state"))
    with pytest.raises(StateError, match=rf"another hastore daemon \(pid {os.getpid()}\) runs with state directory"):
        second.lock()
    os.close(first._lock_fd)  # what exit or exec does
    second.lock()


def test_the_generation_grows_across_restarts(tmp_path):
    store = StateStore(str(tmp_path / "state"))
    a = store.next_generation()
    b = StateStore(str(tmp_path / "state")).next_generation()
    assert b > a
