"""Shared pytest configuration: the `root` marker, require_root() and the `lab` fixture."""

from __future__ import annotations

import os

import pytest


def require_root() -> None:
    """Skip a test that needs root; under CI=true fail instead, so a skip never hides a failure."""
    if os.geteuid() == 0:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("needs root (network namespaces); CI=true does not allow skipping it",
                    pytrace=False)
    pytest.skip("needs root (network namespaces)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "root: needs root and the kernel features of the lab (network namespaces, "
                   "veth, ptys)")


def pytest_sessionstart(session: pytest.Session) -> None:
    # Leftovers of a crashed earlier run; labs whose owner process is alive are never touched.
    if os.geteuid() == 0:
        from hastore.lab.netns import cleanup_stale
        cleanup_stale("hs*")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is not None:
        require_root()


@pytest.fixture
def lab():
    """A started two-node Lab (alpha, bravo), always torn down after the test."""
    require_root()
    from hastore.lab.netns import Lab
    with Lab() as started:
        yield started


@pytest.fixture(scope="session")
def as_root() -> None:
    """For fixtures wider than a test (which run before a test's marker is looked at)."""
    require_root()
