"""Shared fixtures: real peers started on demand, and a check that none outlives the session."""

from __future__ import annotations

import pytest

from syncworker.sandbox import harness

pytest_plugins: list[str] = []


@pytest.fixture(scope="session")
def peers() -> harness.PeerPool:
    """Start real servers by name: `peers.get("nacos")` starts Nacos once per session."""
    pool = harness.PeerPool()
    yield pool
    pool.stop_all()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    leftovers = harness.leftover_processes()
    if leftovers:
        harness.kill_leftovers(leftovers)
        session.exitstatus = 1
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        msg = "peer processes left running after the session (killed now): " + ", ".join(
            f"{pid} {cmd[:80]}" for pid, cmd in leftovers
        )
        if reporter is not None:
            reporter.write_line(msg, red=True)
