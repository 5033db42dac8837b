"""Helpers for the Polaris contract tests: raw OpenAPI calls (natives, checks) and watch collection."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx

from syncworker import model
from syncworker.connectors import base


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


class RawPolaris:
    """Direct OpenAPI access, as a native application or an operator would use it."""

    def __init__(self, base_url: str, token: str = "") -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"X-Polaris-Token": token} if token else {}

    async def call(self, method: str, path: str, *, json: Any = None,
                   params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        async with httpx.AsyncClient(headers=self.headers, timeout=10, trust_env=False) as client:
            resp = await client.request(method, self.base_url + path, json=json, params=params)
        data: dict[str, Any] = resp.json()
        return data

    async def register(self, namespace: str, service: str, host: str, port: int, **fields: Any) -> dict[str, Any]:
        body = {"namespace": namespace, "service": service, "host": host, "port": port, **fields}
        return await self.call("POST", "/naming/v1/instances", json=[body])

    async def deregister(self, namespace: str, service: str, host: str, port: int) -> dict[str, Any]:
        body = {"namespace": namespace, "service": service, "host": host, "port": port}
        return await self.call("POST", "/naming/v1/instances/delete", json=[body])

    async def namespace_exists(self, name: str) -> bool:
        data = await self.call("GET", "/naming/v1/namespaces", params={"name": name})
        return any(ns.get("name") == name for ns in data.get("namespaces") or [])

    async def service_exists(self, namespace: str, name: str) -> bool:
        data = await self.call("GET", "/naming/v1/services", params={"namespace": namespace, "name": name})
        return any(s.get("name") == name and s.get("namespace") == namespace for s in data.get("services") or [])


class WatchTap:
    """Runs a connector's watch in a task and records (loop time, event) pairs."""

    def __init__(self, conn: base.Connector, services: list[model.ServiceKey], namespaces: list[str]) -> None:
        self.gen: AsyncIterator[base.WatchEvent] = conn.watch(services, namespaces)
        self.queue: asyncio.Queue[tuple[float, base.WatchEvent]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        async for event in self.gen:
            self.queue.put_nowait((loop.time(), event))

    async def __aenter__(self) -> WatchTap:
        self.task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        aclose = getattr(self.gen, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()

    async def next_event(self, timeout: float) -> tuple[float, base.WatchEvent]:
        if self.task is not None and self.task.done():
            self.task.result()  # re-raise what ended the watch
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def wait_for(self, key: model.ServiceKey, timeout: float,
                       seen: list[base.WatchEvent] | None = None) -> float | None:
        """Loop time at which `key` was yielded, or None when it was not within `timeout`.

        Other events taken from the queue meanwhile are appended to `seen`.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                return None
            try:
                at, event = await self.next_event(left)
            except TimeoutError:
                return None
            if event == key:
                return at
            if seen is not None:
                seen.append(event)

    def drain(self) -> list[base.WatchEvent]:
        out = []
        while not self.queue.empty():
            out.append(self.queue.get_nowait()[1])
        return out
