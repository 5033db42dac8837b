"""Smoke test: a real nginx from the sandbox proxies to a local backend after an upstream rewrite + reload."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from syncworker.sandbox import base, harness
from syncworker.sandbox.peers.nginx import Nginx

from .backend import running_backend

pytestmark = pytest.mark.peers


def test_nginx_proxies_to_backend_after_reload(peers: harness.PeerPool) -> None:
    running = peers.get("nginx")
    nginx = Nginx()
    front_port = peers.alloc.one()
    with running_backend("nginx-smoke", peers.alloc.one()) as backend:
        nginx.apply_upstreams(
            running,
            f"""
upstream smoke_backend {{
    server {backend.address};
}}
server {{
    listen 127.0.0.1:{front_port};
    location / {{
        proxy_pass http://smoke_backend;
        proxy_set_header Host $host;
    }}
}}
""",
        )
        resp = httpx.get(f"http://127.0.0.1:{front_port}/some/path?x=1", timeout=5.0)
        assert resp.status_code == 200, resp.text
        assert resp.text == backend.body_for("/some/path?x=1")
        assert resp.headers["x-backend"] == "nginx-smoke"
        assert [path for path, _ in backend.requests] == ["/some/path?x=1"]


def test_nginx_rejects_invalid_upstreams_and_keeps_serving(peers: harness.PeerPool) -> None:
    running = peers.get("nginx")
    nginx = Nginx()
    upstreams = Path(str(running.extra["upstreams_path"]))
    before = upstreams.read_text()
    with pytest.raises(base.PeerError, match="nginx config check"):
        nginx.apply_upstreams(running, "upstream broken { server ; }\n")
    assert upstreams.read_text() == before
    assert httpx.get(f"{running.endpoints['http']}/__sandbox/ready", timeout=5.0).status_code == 200
