"""Smoke test: a real Envoy from the sandbox routes to a local backend fed through watched xDS files."""

from __future__ import annotations

import httpx
import pytest

from syncworker.sandbox import harness
from syncworker.sandbox.peers.envoy import Envoy

from .backend import running_backend, wait_for

pytestmark = pytest.mark.peers


def test_envoy_routes_to_backend_from_watched_files(peers: harness.PeerPool) -> None:
    running = peers.get("envoy")
    envoy = Envoy()
    with running_backend("envoy-smoke", peers.alloc.one()) as backend:
        envoy.set_clusters(running, {"smoke": [("127.0.0.1", backend.port)]})
        envoy.set_routes(running, [("/", "smoke")])

        url = f"{running.endpoints['http']}/some/path?x=1"
        resp = wait_for(url, lambda r: r.status_code == 200)
        assert resp.text == backend.body_for("/some/path?x=1")
        assert resp.headers["x-backend"] == "envoy-smoke"
        assert "/some/path?x=1" in [path for path, _ in backend.requests]

        clusters = httpx.get(f"{running.endpoints['admin']}/clusters", timeout=5.0).text
        assert f"smoke::127.0.0.1:{backend.port}::" in clusters

        envoy.set_routes(running, [])
        wait_for(url, lambda r: r.status_code == 404)
