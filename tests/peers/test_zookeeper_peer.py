"""Smoke test: a real ZooKeeper from the sandbox, one znode created, read back, deleted."""

from __future__ import annotations

import pytest
from kazoo.client import KazooClient

from syncworker.sandbox import harness

pytestmark = pytest.mark.peers


def test_zookeeper_round_trip(peers: harness.PeerPool) -> None:
    running = peers.get("zookeeper")
    client = KazooClient(hosts=running.endpoints["zookeeper"], timeout=10.0)
    client.start(timeout=15)
    try:
        path = "/syncworker-smoke/node"
        client.create(path, b"v1", makepath=True)
        data, stat = client.get(path)
        assert data == b"v1"
        assert stat.version == 0
        client.delete(path)
        assert client.exists(path) is None
        client.delete("/syncworker-smoke")
    finally:
        client.stop()
        client.close()
