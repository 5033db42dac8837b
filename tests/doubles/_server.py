"""Plumbing shared by the contract doubles: a real loopback HTTP server on a background thread.

A double is a `DoubleServer` subclass that turns one parsed `Request` into one
`Reply`. This module owns everything that is not the vendor's contract: the
stdlib `ThreadingHTTPServer`, keep-alive bookkeeping, the request log, and the
fault switches a test uses to make the peer misbehave for a while:

* `set_down(True)` answers every request with 503 (the process is up, the
  service is not); `set_down(True, mode="refuse")` closes the listening socket
  and every open connection, so clients get "connection refused" until
  `set_down(False)` binds the same port again;
* `fail_next(n, status)` answers the next `n` requests with `status`.

The state of the double (its data) lives in the subclass and survives both.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal, Self

DownMode = Literal["503", "refuse"]


@dataclass
class Request:
    method: str
    raw_path: str
    #: path segments, percent-decoded one by one (empty segments dropped: a trailing "/" is ignored)
    segments: list[str]
    query: dict[str, list[str]]
    headers: Mapping[str, str]
    body: bytes

    def arg(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None

    def header(self, name: str) -> str | None:
        for key, value in self.headers.items():
            if key.lower() == name.lower():
                return value
        return None


@dataclass
class Reply:
    status: int
    #: a JSON-serialisable object, raw bytes, a str (sent as text/plain) or None (no body)
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


def json_reply(status: int, body: Any, **headers: str) -> Reply:
    return Reply(status, body, dict(headers))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        self.live: set[socket.socket] = set()
        self.live_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.live_lock:
            self.live.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.live_lock:
            self.live.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        with self.live_lock:
            conns = list(self.live)
            self.live.clear()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                conn.close()


class DoubleServer:
    """Base of every contract double: start/stop, URL, request log and fault switches."""

    #: shown in the Server header and thread names
    server_name = "double"

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("contract doubles listen on loopback only")
        self.host = host
        self.port = port
        self.requests: list[tuple[str, str]] = []
        self._log_lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._down: DownMode | None = None
        self._fail_next: list[int] = []
        self._switch_lock = threading.Lock()

    # ----------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> Self:
        if self._server is not None:
            return self
        self._bind()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
            server.drop_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _bind(self) -> None:
        server = _Server((self.host, self.port), self._handler_class())
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"{self.server_name}-{self.port}", daemon=True,
        )
        self._thread.start()

    # ----------------------------------------------------------------- faults
    def set_down(self, down: bool, *, mode: DownMode = "503") -> None:
        """Make the double unavailable (503 for every request, or refused connections) or bring it back."""
        with self._switch_lock:
            if down:
                self._down = mode
                if mode == "refuse" and self._server is not None:
                    self.stop()
            else:
                was = self._down
                self._down = None
                if was == "refuse" and self._server is None:
                    self._bind()

    @property
    def down(self) -> DownMode | None:
        return self._down

    def fail_next(self, count: int = 1, status: int = 503) -> None:
        """Answer the next `count` requests with `status` (and the vendor's error body for it)."""
        with self._switch_lock:
            self._fail_next.extend([status] * count)

    def unavailable_reply(self, status: int) -> Reply:
        """The body a real peer sends when it is up but failing; subclasses override."""
        return json_reply(status, {"message": "Service Unavailable"})

    # ----------------------------------------------------------------- dispatch
    def handle(self, request: Request) -> Reply:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_headers(self) -> dict[str, str]:
        return {}

    def _dispatch(self, request: Request) -> Reply:
        with self._log_lock:
            self.requests.append((request.method, request.raw_path))
        with self._switch_lock:
            injected = self._fail_next.pop(0) if self._fail_next else None
            down = self._down
        if down is not None:
            return self.unavailable_reply(503)
        if injected is not None:
            return self.unavailable_reply(injected)
        return self.handle(request)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = double.server_name
            sys_version = ""

            def setup(self) -> None:
                super().setup()
                # headers and body go out in two writes; without this, delayed ACKs cost ~40 ms a request
                with contextlib.suppress(OSError):
                    self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def _read_body(self) -> bytes:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    chunks = []
                    while True:
                        size_line = self.rfile.readline().split(b";", 1)[0].strip()
                        size = int(size_line or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            break
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    return b"".join(chunks)
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _serve(self) -> None:
                parsed = urllib.parse.urlsplit(self.path)
                segments = [urllib.parse.unquote(s) for s in parsed.path.split("/") if s]
                request = Request(
                    method=self.command,
                    raw_path=self.path,
                    segments=segments,
                    query=urllib.parse.parse_qs(parsed.query, keep_blank_values=True),
                    headers=dict(self.headers.items()),
                    body=self._read_body(),
                )
                try:
                    reply = double._dispatch(request)
                except Exception as exc:  # a bug in the double must not look like a hung peer
                    reply = json_reply(500, {"message": f"double error: {type(exc).__name__}: {exc}"})
                self._write(reply, head=self.command == "HEAD")

            def _write(self, reply: Reply, *, head: bool) -> None:
                headers = {**double.extra_headers(), **reply.headers}
                if reply.body is None or reply.status in (204, 304):
                    payload = b""
                elif isinstance(reply.body, bytes):
                    payload = reply.body
                    headers.setdefault("Content-Type", "application/octet-stream")
                elif isinstance(reply.body, str):
                    payload = reply.body.encode()
                    headers.setdefault("Content-Type", "text/plain; charset=utf-8")
                else:
                    payload = json.dumps(reply.body, separators=(",", ":")).encode()
                    headers.setdefault("Content-Type", "application/json; charset=utf-8")
                self.send_response(reply.status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if payload and not head:
                    self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _serve

            def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
                return

        return Handler
