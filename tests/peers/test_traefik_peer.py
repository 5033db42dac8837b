"""Smoke test: a real Traefik from the sandbox routes to a local backend declared in its watched file dir."""

from __future__ import annotations

import httpx
import pytest

from syncworker.sandbox import harness
from syncworker.sandbox.peers.traefik import Traefik

from .backend import running_backend, wait_for

pytestmark = pytest.mark.peers


def test_traefik_routes_to_backend_from_file_provider(peers: harness.PeerPool) -> None:
    running = peers.get("traefik")
    traefik = Traefik()
    with running_backend("traefik-smoke", peers.alloc.one()) as backend:
        traefik.set_http_service(running, "smoke", [f"http://{backend.address}"])

        url = f"{running.endpoints['http']}/some/path?x=1"
        resp = wait_for(url, lambda r: r.status_code == 200)
        assert resp.text == backend.body_for("/some/path?x=1")
        assert resp.headers["x-backend"] == "traefik-smoke"
        assert "/some/path?x=1" in [path for path, _ in backend.requests]

        router = httpx.get(f"{running.endpoints['api']}/api/http/routers/smoke@file", timeout=5.0)
        assert router.status_code == 200
        assert router.json()["status"] == "enabled"

        traefik.remove_dynamic(running, "smoke")
        wait_for(url, lambda r: r.status_code == 404)
