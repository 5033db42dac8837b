"""A small HTTP endpoint: `/status` (every unit as JSON), `/metrics` (Prometheus), `/healthz`.

It serves from a snapshot function, so it knows nothing about the engine or the
cluster store behind it. asyncio's own server is enough for two read-only pages.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from syncworker import jsonwire

Snapshot = Callable[[], list[dict[str, object]]]


def metrics_text(rows: list[dict[str, object]], extra: dict[str, float] | None = None) -> bytes:
    reg = CollectorRegistry()
    in_sync = Gauge("syncworker_unit_in_sync_instances", "copies in sync at the destination",
                    ["task", "service"], registry=reg)
    source = Gauge("syncworker_unit_source_instances", "instances read at the source", ["task", "service"],
                   registry=reg)
    lag = Gauge("syncworker_unit_seconds_since_last_ok", "seconds since the unit last converged",
                ["task", "service"], registry=reg)
    ok = Gauge("syncworker_unit_ok", "1 when the unit's last run succeeded", ["task", "service"], registry=reg)
    ops = Gauge("syncworker_operations", "writes applied, by kind", ["task", "kind"], registry=reg)
    clashes = Gauge("syncworker_unit_clashes", "native records at a copy's address", ["task", "service"],
                    registry=reg)
    import time

    now = time.time()
    totals: dict[tuple[str, str], float] = {}
    for r in rows:
        labels = (str(r["task"]), str(r["service"]))
        in_sync.labels(*labels).set(float(r["in_sync"]))  # type: ignore[arg-type]
        source.labels(*labels).set(float(r["source_instances"]))  # type: ignore[arg-type]
        clashes.labels(*labels).set(float(r["clashes"]))  # type: ignore[arg-type]
        last_ok = float(r["last_ok"] or 0)  # type: ignore[arg-type]
        lag.labels(*labels).set(now - last_ok if last_ok else float("nan"))
        ok.labels(*labels).set(1.0 if r["outcome"] in ("ok", "held deletes") else 0.0)
        for kind, n in dict(r["ops"]).items():  # type: ignore[call-overload]
            totals[(str(r["task"]), kind)] = totals.get((str(r["task"]), kind), 0) + n
    for (task, kind), n in totals.items():
        ops.labels(task, kind).set(n)
    for name, value in (extra or {}).items():
        Gauge(name, name, registry=reg).set(value)
    return generate_latest(reg)


class StatusServer:
    def __init__(self, snapshot: Snapshot, host: str = "127.0.0.1", port: int = 0) -> None:
        self.snapshot = snapshot
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            path = request.split(b" ", 2)[1].decode(errors="replace").split("?")[0]
            if path == "/status":
                status, ctype, body = 200, "application/json", jsonwire.dumps(self.snapshot(), default=str)
            elif path == "/metrics":
                status, ctype, body = 200, CONTENT_TYPE_LATEST, metrics_text(self.snapshot())
            elif path == "/healthz":
                status, ctype, body = 200, "text/plain", b"ok\n"
            else:
                status, ctype, body = 404, "text/plain", b"not found: try /status, /metrics, /healthz\n"
            writer.write(f"HTTP/1.1 {status} OK\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, IndexError, ConnectionError):
            pass
        finally:
            writer.close()
