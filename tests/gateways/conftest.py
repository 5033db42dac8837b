"""Shared pieces of the gateway tests: local backends, an engine in the test's loop, traffic probes.

Each test runs its coroutine with `asyncio.run`; the engine, the connectors and
the HTTP probes share that loop, the backends answer from their own threads, and
the gateways are real processes (a fresh one per test module, so that no other
test rewrites their files).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import httpx
import pytest

from syncworker.config import loader, models
from syncworker.connectors import memory, registry
from syncworker.reconcile import engine as engine_mod
from syncworker.sandbox import harness
from tests.peers.backend import Backend, running_backend

#: how fast a registry change must show in the gateway's traffic
PROPAGATION_LIMIT = 2.0


@pytest.fixture
def backends(peers: harness.PeerPool) -> Iterator[list[Backend]]:
    """Three real HTTP backends on loopback ports (b0, b1, b2)."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(running_backend(f"b{i}-{uuid.uuid4().hex[:4]}", peers.alloc.one()))
               for i in range(3)]


@pytest.fixture
def store() -> Iterator[tuple[str, memory.Store]]:
    """A fresh in-memory registry (its address and its store)."""
    name = f"memory://gw-{uuid.uuid4().hex[:8]}"
    yield name, memory.store(name)
    memory.STORES.pop(name, None)


def config(task: str, source: str | dict[str, Any], destination: dict[str, Any],
           match: Sequence[dict[str, Any]], *, pull: str = "1s", empty_grace: str = "60s") -> models.RegistryConfig:
    """A task file text through the real loader: `source` (a memory registry's address, or an
    endpoint) -> `destination`."""
    if isinstance(source, str):
        source = {"name": "registry", "type": "memory", "addresses": [source]}
    doc = {
        "tasks": [{
            "name": task,
            "source": source,
            "destination": destination,
            "match": list(match),
            "safety": {"empty_grace": empty_grace},
        }],
        "methods": [{"type": "watch"}, {"type": "pull", "interval": pull}],
    }
    return loader.load_text(json.dumps(doc), "gateway-test.json")


@contextlib.asynccontextmanager
async def running_engine(cfg: models.RegistryConfig) -> AsyncIterator[engine_mod.Engine]:
    eng = engine_mod.Engine(registry.create, workers=4, discover_interval=1.0)
    await eng.start(cfg)
    try:
        yield eng
    finally:
        await eng.stop()


def client() -> httpx.AsyncClient:
    # a new connection per request, so a reloaded nginx's new workers answer at once
    return httpx.AsyncClient(timeout=3.0, limits=httpx.Limits(max_keepalive_connections=0))


async def hit(c: httpx.AsyncClient, url: str) -> str:
    """Which backend answered (its X-Backend header), or what went wrong."""
    try:
        resp = await c.get(url)
    except httpx.HTTPError as exc:
        return f"error {type(exc).__name__}"
    return resp.headers.get("x-backend") or f"status {resp.status_code}"


async def sample(c: httpx.AsyncClient, url: str, n: int = 30) -> list[str]:
    return [await hit(c, url) for _ in range(n)]


async def wait_serving(c: httpx.AsyncClient, url: str, names: set[str], timeout: float = 15.0) -> list[str]:
    """Poll until a window of requests is answered by exactly `names`; the last window."""
    deadline = time.monotonic() + timeout
    window: list[str] = []
    while time.monotonic() < deadline:
        window = await sample(c, url, 6 * max(1, len(names)))
        if set(window) == names:
            return window
        await asyncio.sleep(0.05)
    raise AssertionError(f"{url} never served exactly {sorted(names)}; last window {window}")


async def time_until_seen(c: httpx.AsyncClient, url: str, name: str, t0: float, timeout: float = 10.0) -> float:
    """Seconds from t0 until a request through the gateway reaches backend `name`."""
    while time.monotonic() - t0 < timeout:
        if await hit(c, url) == name:
            return time.monotonic() - t0
    raise AssertionError(f"backend {name} got no request within {timeout}s")


async def time_until_gone(c: httpx.AsyncClient, url: str, name: str, t0: float, *, streak: int = 20,
                          timeout: float = 10.0) -> float:
    """Seconds from t0 until the first of `streak` requests in a row that all miss backend `name`."""
    clean_since: float | None = None
    clean = 0
    while time.monotonic() - t0 < timeout:
        sent = time.monotonic()
        got = await hit(c, url)
        if got == name or not got.startswith("b"):
            clean, clean_since = 0, None
            continue
        if clean_since is None:
            clean_since = sent
        clean += 1
        if clean >= streak:
            return clean_since - t0
    raise AssertionError(f"backend {name} still got requests (or errors) {timeout}s after its removal")


class RawPolaris:
    """Polaris's OpenAPI as a native application uses it (register, deregister)."""

    def __init__(self, running: Any) -> None:
        self.url = str(running.endpoints["http"]).rstrip("/")
        token = running.credentials.get("token", "")
        self.headers = {"X-Polaris-Token": token} if token else {}

    async def _post(self, path: str, body: list[dict[str, Any]]) -> None:
        async with httpx.AsyncClient(headers=self.headers, timeout=10, trust_env=False) as c:
            resp = await c.post(self.url + path, json=body)
        assert resp.status_code == 200, resp.text

    async def register(self, namespace: str, service: str, port: int, **fields: Any) -> None:
        await self._post("/naming/v1/instances", [{"namespace": namespace, "service": service,
                                                   "host": "127.0.0.1", "port": port, **fields}])

    async def deregister(self, namespace: str, service: str, port: int) -> None:
        await self._post("/naming/v1/instances/delete", [{"namespace": namespace, "service": service,
                                                          "host": "127.0.0.1", "port": port}])


def polaris_source(running: Any) -> dict[str, Any]:
    return {"name": "polaris", "type": "polaris", "addresses": [running.endpoints["http"]],
            "token": running.credentials.get("token", "")}
