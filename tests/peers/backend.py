"""A tiny real HTTP backend on a loopback port, for the gateway smoke tests (nginx, Envoy, Traefik).

It answers every GET with a body naming itself and the path it was asked for,
and records the requests it saw, so a test can prove that a request sent to the
gateway reached this process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx


class Backend:
    def __init__(self, name: str, port: int) -> None:
        self.name = name
        self.port = port
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._lock = threading.Lock()
        backend = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with backend._lock:
                    backend.requests.append((self.path, dict(self.headers.items())))
                body = backend.body_for(self.path).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("X-Backend", backend.name)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"backend-{name}",
                                        daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def body_for(self, path: str) -> str:
        return f"hello from backend {self.name} path={path}\n"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@contextmanager
def running_backend(name: str, port: int) -> Iterator[Backend]:
    backend = Backend(name, port)
    backend.start()
    try:
        yield backend
    finally:
        backend.stop()


def wait_for(url: str, accept: Callable[[httpx.Response], bool], *, timeout: float = 20.0,
             headers: dict[str, str] | None = None) -> httpx.Response:
    """GET url until accept(response) holds (gateways apply new config asynchronously)."""
    deadline = time.monotonic() + timeout
    last: httpx.Response | Exception | None = None
    while time.monotonic() < deadline:
        try:
            resp = httpx.get(url, timeout=2.0, headers=headers)
            if accept(resp):
                return resp
            last = resp
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.1)
    detail = f"{last.status_code} {last.text[:200]!r}" if isinstance(last, httpx.Response) else repr(last)
    raise AssertionError(f"{url} never gave the expected answer within {timeout:.0f}s; last: {detail}")
