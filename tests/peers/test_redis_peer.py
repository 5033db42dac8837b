"""Smoke test: a real Redis from the sandbox, one key written, read back, deleted."""

from __future__ import annotations

import pytest
import redis

pytestmark = pytest.mark.peers


def test_redis_round_trip(peers) -> None:
    running = peers.get("redis")
    client = redis.Redis.from_url(running.endpoints["redis"])
    client.set("syncworker:smoke", "v1")
    assert client.get("syncworker:smoke") == b"v1"
    assert client.delete("syncworker:smoke") == 1
    assert client.get("syncworker:smoke") is None
