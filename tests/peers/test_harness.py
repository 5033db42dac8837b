"""The harness itself: restart on the same ports after a kill, and no port handed out twice."""

from __future__ import annotations

import pytest
import redis

from syncworker.sandbox import catalog, ports

pytestmark = pytest.mark.peers


def test_redis_killed_then_restarted_on_the_same_port(peers) -> None:
    running = peers.fresh("redis")
    url = running.endpoints["redis"]
    assert redis.Redis.from_url(url).ping()
    running.kill()
    assert not running.alive()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    running.restart()
    catalog.get("redis").wait_ready(running)
    assert redis.Redis.from_url(url).ping()
    running.stop()
    assert not running.alive()


def test_port_patterns_never_overlap(tmp_path) -> None:
    alloc = ports.PortAllocator(tmp_path)
    seen: set[int] = set()
    for _ in range(20):
        got = alloc.take_offsets((0, 1000, 1001, -1000))
        assert got[1] == got[0] + 1000 and got[3] == got[0] - 1000
        assert not seen & set(got)
        seen.update(got)
    other = ports.PortAllocator(tmp_path)  # a second allocator (another process) sees the reservations
    for _ in range(50):
        assert other.one() not in seen
    alloc.release_all()
    other.release_all()
