"""Smoke test: a real Consul agent from the sandbox; one service instance registered,
read back from the catalog and the health API, deregistered, gone."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from syncworker.sandbox.base import PeerError

pytestmark = pytest.mark.peers

SERVICE = "syncworker-smoke"
INSTANCE = "syncworker-smoke-1"


def _wait_for(check: Callable[[], Any], timeout: float = 15.0) -> Any:
    """Poll until check() returns something truthy; the agent syncs to the catalog asynchronously."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.2)


# The route in PEERS.md does not work here (see docs/testing.md): the build is attempted
# on every run and must fail with PeerError; if the route ever opens, this xfail turns
# into a failure (strict) and the marker must go.
@pytest.mark.xfail(
    raises=PeerError, strict=True,
    reason="consul 1.16.4 (last MPL release): the Go module proxy refuses its source (403 'This module version "
           "is not available'); 1.16.3 downloads but requires consul/envoyextensions and consul/troubleshoot, "
           "which this workplace lists as not-to-use (licence)")
def test_consul_register_read_deregister(peers) -> None:
    running = peers.get("consul")
    with httpx.Client(base_url=running.endpoints["http"], timeout=5.0) as client:
        registration = {
            "ID": INSTANCE,
            "Name": SERVICE,
            "Address": "127.0.0.1",
            "Port": 18080,
            "Tags": ["syncworker", "v1"],
            "Meta": {"zone": "local", "weight": "10"},
        }
        resp = client.put("/v1/agent/service/register", json=registration)
        assert resp.status_code == 200, resp.text

        def catalog_entries() -> list[dict[str, Any]]:
            resp = client.get(f"/v1/catalog/service/{SERVICE}")
            assert resp.status_code == 200, resp.text
            return [e for e in resp.json() if e["ServiceID"] == INSTANCE]

        entries = _wait_for(catalog_entries)
        assert len(entries) == 1, "registered instance never showed up in the catalog"
        entry = entries[0]
        assert entry["ServiceName"] == SERVICE
        assert entry["ServiceAddress"] == "127.0.0.1"
        assert entry["ServicePort"] == 18080
        assert sorted(entry["ServiceTags"]) == ["syncworker", "v1"]
        assert entry["ServiceMeta"] == {"zone": "local", "weight": "10"}

        health = client.get(f"/v1/health/service/{SERVICE}")
        assert health.status_code == 200, health.text
        assert [h["Service"]["ID"] for h in health.json()] == [INSTANCE]

        resp = client.put(f"/v1/agent/service/deregister/{INSTANCE}")
        assert resp.status_code == 200, resp.text
        gone = _wait_for(lambda: not catalog_entries())
        assert gone, "deregistered instance is still in the catalog"
        assert client.get(f"/v1/health/service/{SERVICE}").json() == []
