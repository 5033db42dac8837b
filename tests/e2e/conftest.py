"""Fixtures of the acceptance tests: the session's Nacos and Polaris, and `syncworker run` children."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from syncworker.sandbox import base as sandbox_base
from syncworker.sandbox import harness
from tests.e2e.helpers import SyncChild

StartSync = Callable[[dict[str, Any]], SyncChild]


@pytest.fixture
def nacos(peers: harness.PeerPool) -> sandbox_base.Running:
    """The session's Nacos (shared: tests work in namespaces of their own)."""
    return peers.get("nacos")


@pytest.fixture
def polaris(peers: harness.PeerPool) -> sandbox_base.Running:
    """The session's Polaris (shared: tests work in namespaces of their own)."""
    return peers.get("polaris")


@pytest.fixture
def start_sync(tmp_path: Path, peers: harness.PeerPool) -> Iterator[StartSync]:
    """Start `syncworker run` children (each in a directory of its own); all are stopped afterwards."""
    children: list[SyncChild] = []

    def start(config: dict[str, Any]) -> SyncChild:
        workdir = tmp_path / f"sync-{len(children)}"
        workdir.mkdir()
        child = SyncChild(workdir, config, peers.alloc.one())
        children.append(child)
        child.wait_up()
        return child

    yield start
    for child in children:
        child.stop()
        # shown with the test's output when it fails
        print(f"--- syncworker log {child.log_path} (last lines) ---\n{child.log_tail(60)}")
