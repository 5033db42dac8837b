"""Smoke tests: the APISIX Admin API CONTRACT DOUBLE (APISIX itself cannot run here) - upstream round trips.

The second test backs the double with the sandbox's real etcd and checks that
the upstream lands under /apisix/ as APISIX stores it; it is skipped when the
etcd peer cannot be started.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import httpx
import pytest

from syncworker.sandbox import base
from tests.doubles.apisix_admin_double import DEFAULT_ADMIN_KEY, ApisixAdminDouble
from tests.doubles.fixtures import running_apisix_double

pytestmark = pytest.mark.peers

KEY = {"X-API-KEY": DEFAULT_ADMIN_KEY}


@pytest.fixture
def apisix_double(peers) -> Iterator[ApisixAdminDouble]:
    with running_apisix_double(peers.alloc) as double:
        yield double


def _round_trip(admin: str) -> None:
    with httpx.Client(base_url=admin, headers=KEY, timeout=5.0) as api:
        put = api.put("/upstreams/smoke", json={"nodes": [{"host": "10.0.0.1", "port": 8080, "weight": 10}],
                                                "labels": {"managed-by": "syncworker"}})
        assert put.status_code == 201, put.text

        got = api.get("/upstreams/smoke").json()
        assert got["key"] == "/apisix/upstreams/smoke"
        assert got["value"]["nodes"] == [{"host": "10.0.0.1", "port": 8080, "weight": 10, "priority": 0}]
        listed = api.get("/upstreams", params={"label": "managed-by"}).json()
        assert listed["total"] == 1

        assert api.delete("/upstreams/smoke").json() == {"deleted": "1", "key": "/apisix/upstreams/smoke"}
        gone = api.get("/upstreams/smoke")
        assert gone.status_code == 404
        assert gone.json() == {"message": "Key not found"}


def test_apisix_double_upstream_round_trip(apisix_double: ApisixAdminDouble) -> None:
    _round_trip(f"{apisix_double.url}/apisix/admin")
    assert apisix_double.state()["upstreams"] == {}


def test_apisix_double_on_real_etcd_stores_under_apisix_prefix(peers) -> None:
    try:
        etcd = peers.get("etcd")
    except base.PeerError as exc:
        pytest.skip(f"etcd peer unavailable: {exc}")
    etcd_url = etcd.endpoints["etcd"]

    def raw(key: str) -> list[dict]:
        found = httpx.post(f"{etcd_url}/v3/kv/range",
                           json={"key": base64.b64encode(key.encode()).decode()}, timeout=5.0)
        return found.json().get("kvs", [])

    with running_apisix_double(peers.alloc, etcd_url=etcd_url) as double:
        admin = f"{double.url}/apisix/admin"
        created = httpx.put(f"{admin}/upstreams/etcd-smoke", json={"nodes": {"10.0.0.2:80": 1}}, headers=KEY)
        assert created.status_code == 201, created.text
        stored = raw("/apisix/upstreams/etcd-smoke")
        assert len(stored) == 1
        value = json.loads(base64.b64decode(stored[0]["value"]))
        assert value["nodes"] == {"10.0.0.2:80": 1} and value["id"] == "etcd-smoke"
        got = httpx.get(f"{admin}/upstreams/etcd-smoke", headers=KEY).json()
        assert got["createdIndex"] == int(stored[0]["create_revision"])
        assert httpx.delete(f"{admin}/upstreams/etcd-smoke", headers=KEY).status_code == 200
        assert raw("/apisix/upstreams/etcd-smoke") == []
        _round_trip(admin)
