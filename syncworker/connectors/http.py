"""The HTTP transport shared by connectors that speak JSON over HTTP(S) to a list of addresses.

It owns what every such connector did alike: turning configured addresses into
base URLs (`host:port` means http; `grpc://` and other schemes are skipped), one
httpx.AsyncClient with the endpoint's TLS verification (a bool or a CA bundle
path), timeout and auth headers, and failover: a request that was never sent
(connection refused, connect timeout) moves on to the next address, and the
address that answered is tried first afterwards. A request that may have reached
the server moves on only when the caller says it is idempotent.
"""

from __future__ import annotations

import collections
import ssl
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any

import httpx

from syncworker import jsonwire
from syncworker.connectors import base

_JSON_HEADERS = {"Content-Type": jsonwire.CONTENT_TYPE}
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def base_urls(addresses: Iterable[str], default_path: str = "") -> list[str]:
    """HTTP(S) base URLs of the configured addresses, with `default_path` where the address has none."""
    out: list[str] = []
    for raw in addresses:
        addr = raw.strip().rstrip("/")
        if not addr:
            continue
        if "://" not in addr:
            addr = f"http://{addr}"
        parts = urllib.parse.urlsplit(addr)
        if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
            continue
        addr = f"{parts.scheme.lower()}://{addr.split('://', 1)[1]}"
        if default_path and not parts.path.strip("/"):
            addr += default_path
        out.append(addr)
    return out


def temporary_status(status: int) -> bool:
    """An HTTP status worth retrying: the server's trouble, a timeout, or throttling."""
    return status >= 500 or status in (408, 429)


class WriteFailed(Exception):
    """One write the peer refused or never answered; `temporary` says whether a retry may help."""

    def __init__(self, message: str, temporary: bool) -> None:
        super().__init__(message)
        self.temporary = temporary


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Transport:
    def __init__(self, bases: list[str], *, timeout: float = 5.0, verify: Any = True,
                 headers: Mapping[str, str] | None = None, auth: tuple[str, str] | None = None,
                 max_connections: int = 32) -> None:
        self.bases = bases
        self.timeout = timeout
        self.verify = verify
        self.headers = {"Accept": "application/json", **dict(headers or {})}
        self.auth = auth
        self.max_connections = max_connections
        self._current = 0
        self._client: httpx.AsyncClient | None = None
        #: requests sent, by "METHOD path" (for metrics and tests)
        self.calls: collections.Counter[str] = collections.Counter()

    @property
    def current(self) -> int:
        """Index of the address tried first (the last one that answered)."""
        return self._current

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            verify: Any = self.verify
            if isinstance(verify, str):
                verify = ssl.create_default_context(cafile=verify)
            self._client = httpx.AsyncClient(
                headers=self.headers, auth=self.auth, verify=verify, timeout=httpx.Timeout(self.timeout),
                limits=httpx.Limits(max_connections=self.max_connections,
                                    max_keepalive_connections=max(8, self.max_connections // 2)),
                trust_env=False)
        return self._client

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def send(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                   body: Any = None, idempotent: bool = False) -> httpx.Response:
        """Send to the addresses in turn; raises httpx.HTTPError when none answered."""
        client = self.client()
        self.calls[f"{method} {path}"] += 1
        last: httpx.HTTPError | None = None
        n = len(self.bases)
        for i in range(n):
            idx = (self._current + i) % n
            try:
                resp = await client.request(method, self.bases[idx] + path, params=params,
                                            content=None if body is None else jsonwire.dumps(body),
                                            headers=None if body is None else _JSON_HEADERS)
            except _NOT_SENT as exc:
                last = exc
                continue
            except httpx.TransportError as exc:
                if not idempotent:
                    raise
                last = exc
                continue
            self._current = idx
            return resp
        assert last is not None
        raise last


class HttpConnector(base.Connector):
    """A connector whose peer speaks HTTP through one `Transport` (set `self.http` in __init__)."""

    http: Transport

    async def open(self) -> None:
        self.http.client()

    async def close(self) -> None:
        await self.http.close()

    @property
    def bases(self) -> list[str]:
        return self.http.bases

    @property
    def calls(self) -> collections.Counter[str]:
        return self.http.calls

    async def _send(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                    body: Any = None, idempotent: bool = False) -> httpx.Response:
        return await self.http.send(method, path, params=params, body=body, idempotent=idempotent)
