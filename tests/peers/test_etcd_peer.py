"""Smoke test: a real etcd from the sandbox, one key put, read, deleted through the v3 JSON gateway."""

from __future__ import annotations

import base64

import httpx
import pytest

from syncworker.sandbox import harness

pytestmark = pytest.mark.peers


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_etcd_round_trip(peers: harness.PeerPool) -> None:
    running = peers.get("etcd")
    url = running.endpoints["etcd"]
    key = _b64("/syncworker/smoke")
    with httpx.Client(base_url=url, timeout=5.0) as client:
        put = client.post("/v3/kv/put", json={"key": key, "value": _b64("v1")})
        assert put.status_code == 200, put.text

        got = client.post("/v3/kv/range", json={"key": key}).json()
        assert [base64.b64decode(kv["value"]) for kv in got["kvs"]] == [b"v1"]

        deleted = client.post("/v3/kv/deleterange", json={"key": key}).json()
        assert deleted["deleted"] == "1"

        after = client.post("/v3/kv/range", json={"key": key}).json()
        assert "kvs" not in after
        assert after.get("count", "0") == "0"
