"""Smoke tests: a real Nacos 3.1 from the sandbox, auth off and auth on, through Nacos's own open API.

One persistent instance is registered with the v1 naming API, read back from the
instance list, deregistered and checked gone. Nacos applies writes asynchronously
(the list shows a change 0-3 s later), so reads poll. Only 127.0.0.0/8 addresses
are registered: Nacos health-checks persistent instances itself (TCP to ip:port).
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from syncworker.sandbox import base

pytestmark = pytest.mark.peers

NAMESPACE = "public"
GROUP = "SYNCWORKER_SMOKE"
IP = "127.0.0.21"
PORT = 18081


def _wait_for(what: str, probe: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")


def _round_trip(running: base.Running, auth_params: dict[str, str]) -> None:
    api = running.endpoints["http"]
    service = f"smoke-{uuid.uuid4().hex[:10]}"
    metadata = {"zone": "z1", "owner": "syncworker"}
    ident = {"serviceName": service, "groupName": GROUP, "namespaceId": NAMESPACE}
    with httpx.Client(base_url=api, timeout=10.0) as client:
        resp = client.post("/v1/ns/instance", params=auth_params, data={
            **ident, "ip": IP, "port": str(PORT), "weight": "2.5",
            "metadata": json.dumps(metadata), "ephemeral": "false", "enabled": "true",
        })
        assert resp.status_code == 200, resp.text
        assert resp.text == "ok"

        def hosts() -> list[dict[str, Any]]:
            r = client.get("/v1/ns/instance/list", params={**ident, **auth_params, "healthyOnly": "false"})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["name"] == f"{GROUP}@@{service}"
            return list(body["hosts"])

        found = _wait_for("the registered instance", hosts)
        assert len(found) == 1
        host = found[0]
        assert (host["ip"], host["port"]) == (IP, PORT)
        assert host["weight"] == 2.5
        assert host["metadata"] == metadata
        assert host["ephemeral"] is False
        assert host["enabled"] is True

        services = client.get("/v1/ns/service/list", params={
            "pageNo": 1, "pageSize": 100, "groupName": GROUP, "namespaceId": NAMESPACE, **auth_params})
        assert services.status_code == 200, services.text
        assert service in services.json()["doms"]

        # A persistent instance is only removed with ephemeral=false (without it Nacos answers "ok"
        # and removes nothing).
        resp = client.delete("/v1/ns/instance", params={
            **ident, **auth_params, "ip": IP, "port": str(PORT), "ephemeral": "false"})
        assert resp.status_code == 200, resp.text
        assert resp.text == "ok"
        _wait_for("the instance to be gone", lambda: hosts() == [])


def test_nacos_round_trip(peers) -> None:
    running = peers.get("nacos")
    assert running.extra["auth"] is False
    _round_trip(running, {})


def test_nacos_auth_round_trip(peers) -> None:
    running = peers.get("nacos-auth")
    api = running.endpoints["http"]
    user, password = running.credentials["username"], running.credentials["password"]
    with httpx.Client(base_url=api, timeout=10.0) as client:
        # without a token the naming API refuses reads and writes
        refused = client.get("/v1/ns/instance/list", params={"serviceName": "any", "namespaceId": NAMESPACE})
        assert refused.status_code == 403, refused.text
        refused = client.post("/v1/ns/instance", data={
            "serviceName": "any", "ip": IP, "port": str(PORT), "ephemeral": "false"})
        assert refused.status_code == 403, refused.text
        # a wrong password gets no token (3.1 answers 500 here, not 401/403)
        bad = client.post("/v1/auth/login", data={"username": user, "password": password + "-wrong"})
        assert bad.status_code != 200
        assert "accessToken" not in bad.text

        login = client.post("/v1/auth/login", data={"username": user, "password": password})
        assert login.status_code == 200, login.text
        token = login.json()["accessToken"]
        assert token
    _round_trip(running, {"accessToken": token})


def test_nacos_ports_and_health_check_switch(peers) -> None:
    running = peers.get("nacos")
    main = int(running.extra["main_port"])  # type: ignore[arg-type]
    assert int(running.endpoints["grpc_port"]) == main + 1000
    with socket.create_connection(("127.0.0.1", int(running.endpoints["grpc_port"])), timeout=5):
        pass  # the client gRPC port accepts connections
    assert running.endpoints["http"] == f"http://127.0.0.1:{main}/nacos"
    console = httpx.get(running.endpoints["console"] + "/", timeout=10.0)
    assert console.status_code == 200
    ready = httpx.get(running.endpoints["http"] + "/v3/admin/core/state/readiness", timeout=10.0)
    assert ready.status_code == 200, ready.text
    # the sandbox turns Nacos's own TCP probing of persistent instances off unless asked not to
    switches = httpx.get(running.endpoints["http"] + "/v3/admin/ns/ops/switches", timeout=10.0).json()["data"]
    assert switches["healthCheckEnabled"] is False
    assert running.extra["health_checks"] is False
