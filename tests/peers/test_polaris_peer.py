"""Smoke test: a real Polaris v1.18.1 from the sandbox, driven through its HTTP OpenAPI.

A service is created in namespace "default", an instance registered, read back from
the console API and through the client Discover API (with its revision), deleted, and
checked gone. Polaris answers queries from a cache that refreshes about once a second,
so reads poll for a few seconds.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from syncworker.sandbox import base

pytestmark = pytest.mark.peers

OK = 200000
NO_CHANGE = 200001
EXISTED = 400201
UNAUTHORIZED = 401001


def _client(running: base.Running) -> httpx.Client:
    headers: dict[str, str] = {}
    if running.credentials.get("token"):
        headers["X-Polaris-Token"] = running.credentials["token"]
    return httpx.Client(base_url=running.endpoints["http"], headers=headers, timeout=10.0)


def _eventually(fetch: Callable[[], dict[str, Any]], done: Callable[[dict[str, Any]], bool],
                timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    body = fetch()
    while not done(body) and time.monotonic() < deadline:
        time.sleep(0.2)
        body = fetch()
    return body


def _instances(client: httpx.Client, service: str) -> dict[str, Any]:
    resp = client.get("/naming/v1/instances", params={"service": service, "namespace": "default"})
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    assert body["code"] == OK, body
    return body


def _round_trip(client: httpx.Client) -> None:
    service = f"syncworker-smoke-{uuid.uuid4().hex[:8]}"
    svc = {"name": service, "namespace": "default", "metadata": {"owner": "syncworker"}}

    resp = client.post("/naming/v1/services", json=[svc])
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["code"] == OK and body["responses"][0]["code"] == OK, body
    # The same service again: batch and item carry "existed resource", HTTP status 400.
    again = client.post("/naming/v1/services", json=[svc])
    assert again.status_code == 400
    assert again.json()["responses"][0]["code"] == EXISTED
    assert again.headers["X-Polaris-Code"] == str(EXISTED)

    instance = {
        "service": service,
        "namespace": "default",
        "host": "127.0.0.10",
        "port": 18080,
        "weight": 42,
        "protocol": "http",
        "healthy": True,
        "isolate": False,
        "metadata": {"env": "smoke", "syncworker.owned": "yes"},
    }
    resp = client.post("/naming/v1/instances", json=[instance])
    assert resp.status_code == 200, resp.text
    created = resp.json()["responses"][0]
    assert created["code"] == OK, created
    instance_id = created["instance"]["id"]
    assert instance_id  # sha1 of "default##<service>##127.0.0.10##18080"

    body = _eventually(lambda: _instances(client, service), lambda b: b["amount"] == 1)
    assert body["amount"] == 1, body
    got = body["instances"][0]
    assert got["id"] == instance_id
    assert (got["host"], got["port"], got["weight"]) == ("127.0.0.10", 18080, 42)
    assert got["healthy"] is True and got["isolate"] is False
    assert got["metadata"] == {"env": "smoke", "syncworker.owned": "yes"}
    assert got["revision"]

    # Client Discover API: the service revision changes with the instance list, and a
    # request carrying the current revision gets 200001 "no change" and no instances.
    # A just-created service is "not found" (400202) there until the service cache catches up.
    discover = {"type": "INSTANCE", "service": {"name": service, "namespace": "default"}}

    def discover_now() -> dict[str, Any]:
        result: dict[str, Any] = client.post("/v1/Discover", json=discover).json()
        return result

    first = _eventually(discover_now, lambda b: b["code"] == OK and len(b["instances"]) == 1)
    assert first["code"] == OK and [i["id"] for i in first["instances"]] == [instance_id], first
    revision = first["service"]["revision"]
    same = client.post("/v1/Discover", json={**discover, "service": {**discover["service"], "revision": revision}})
    assert same.json()["code"] == NO_CHANGE
    assert not same.json()["instances"]

    resp = client.post("/naming/v1/instances/delete",
                       json=[{"service": service, "namespace": "default", "host": "127.0.0.10", "port": 18080}])
    assert resp.status_code == 200, resp.text
    assert resp.json()["responses"][0]["code"] == OK

    body = _eventually(lambda: _instances(client, service), lambda b: b["amount"] == 0)
    assert body["amount"] == 0 and not body["instances"], body

    def discover_changed() -> dict[str, Any]:
        payload = {**discover, "service": {**discover["service"], "revision": revision}}
        result: dict[str, Any] = client.post("/v1/Discover", json=payload).json()
        return result

    after = _eventually(discover_changed, lambda b: b["code"] == OK)
    assert after["code"] == OK and after["service"]["revision"] != revision and not after["instances"], after

    resp = client.post("/naming/v1/services/delete", json=[{"name": service, "namespace": "default"}])
    assert resp.status_code == 200, resp.text
    assert resp.json()["responses"][0]["code"] == OK


def test_polaris_openapi_round_trip(peers) -> None:
    running = peers.get("polaris")
    assert running.credentials["token"]
    with _client(running) as client:
        _round_trip(client)


def test_polaris_console_auth_needs_token(peers) -> None:
    running = peers.get("polaris")
    resp = httpx.post(f"{running.endpoints['http']}/naming/v1/services",
                      json=[{"name": "syncworker-no-token", "namespace": "default"}], timeout=10.0)
    assert resp.status_code == 401
    assert resp.json()["code"] == UNAUTHORIZED
    # The seeded admin can log in with the documented default password and gets the same token.
    with _client(running) as client:
        login = client.post("/core/v1/user/login",
                            json={"name": running.credentials["username"], "password": running.credentials["password"]})
    assert login.status_code == 200, login.text
    assert login.json()["loginResponse"]["token"] == running.credentials["token"]


def test_polaris_without_auth_round_trip(peers) -> None:
    running = peers.get("polaris", auth=False)
    assert "token" not in running.credentials
    with _client(running) as client:
        _round_trip(client)
