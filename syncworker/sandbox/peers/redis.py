"""Redis from Debian's redis-server package: broker and shared store for cluster mode."""

from __future__ import annotations

import socket
from pathlib import Path

from syncworker.sandbox import base, ports


class Redis(base.Peer):
    name = "redis"
    version = "debian"
    start_timeout = 20.0

    def _install(self, target: Path) -> None:
        base.which("redis-server", "install it with: apt-get install -y redis-server")

    def _start(self, alloc: ports.PortAllocator, run_dir: Path, **options: object) -> base.Running:
        binary = base.which("redis-server", "install it with: apt-get install -y redis-server")
        port = alloc.one()
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(run_dir)]
        return base.spawn(self.name, self.version, argv, run_dir,
                          {"redis": f"redis://127.0.0.1:{port}/0"}, extra={"port": port})

    def ready(self, running: base.Running) -> bool:
        port = int(running.extra["port"])  # type: ignore[arg-type]
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
