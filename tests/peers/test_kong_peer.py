"""Smoke test: the Kong Admin API CONTRACT DOUBLE (Kong itself cannot run here) - upstream + target round trip."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.doubles.fixtures import running_kong_double
from tests.doubles.kong_admin_double import KongAdminDouble

pytestmark = pytest.mark.peers


@pytest.fixture
def kong_double(peers) -> Iterator[KongAdminDouble]:
    with running_kong_double(peers.alloc) as double:
        yield double


def test_kong_double_upstream_target_round_trip(kong_double: KongAdminDouble) -> None:
    with httpx.Client(base_url=kong_double.url, timeout=5.0) as api:
        upstream = api.post("/upstreams", json={"name": "smoke.v1.svc", "tags": ["syncworker"]})
        assert upstream.status_code == 201, upstream.text
        up_id = upstream.json()["id"]

        target = api.post(f"/upstreams/{up_id}/targets", json={"target": "10.0.0.1:8080", "weight": 10})
        assert target.status_code == 201, target.text

        listed = api.get("/upstreams/smoke.v1.svc/targets").json()
        assert [(t["target"], t["weight"]) for t in listed["data"]] == [("10.0.0.1:8080", 10)]
        assert listed["next"] is None
        assert api.get("/upstreams", params={"tags": "syncworker"}).json()["data"][0]["id"] == up_id

        assert api.delete("/upstreams/smoke.v1.svc/targets/10.0.0.1:8080").status_code == 204
        assert api.get("/upstreams/smoke.v1.svc/targets").json()["data"] == []
        assert api.delete(f"/upstreams/{up_id}").status_code == 204
        gone = api.get("/upstreams/smoke.v1.svc")
        assert gone.status_code == 404
        assert gone.json() == {"message": "Not found"}
    assert kong_double.state() == {"services": [], "upstreams": [], "targets": []}
