"""Free loopback ports for peers, never the same one twice.

Peers have clashing defaults (8848 for Nacos and Polaris's Nacos listener, 8761
for Eureka and Polaris, 8080 for Nacos's console and ZooKeeper's admin page), so
no peer ever runs on its default port: every port comes from here. A port is
handed out only when it can be bound on 127.0.0.1 right now and was not handed
out before by this allocator. Ports are drawn at random from a high range (below
the kernel's ephemeral range) so that two allocators in two processes rarely
meet; a reservation file per port makes that "never" across processes too.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
from pathlib import Path

LOW, HIGH = 20000, 32000


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class PortAllocator:
    def __init__(self, reservations: Path | None = None) -> None:
        self._given: set[int] = set()
        self._dir = reservations or Path(os.environ.get("SYNCWORKER_PORT_DIR", "/tmp/syncworker-ports"))
        self._dir.mkdir(parents=True, exist_ok=True)
        self._rng = random.Random(os.getpid() ^ id(self))

    def _reserve(self, port: int) -> bool:
        path = self._dir / str(port)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = int(path.read_text() or "0")
            except (OSError, ValueError):
                owner = 0
            if owner and _pid_alive(owner):
                return False
            with contextlib.suppress(OSError):
                path.unlink()
            return self._reserve(port)
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return True

    def take_offsets(self, offsets: tuple[int, ...]) -> list[int]:
        """Ports p+o for every offset o, all free and all reserved (servers that derive ports from one)."""
        low, high = LOW - min(0, min(offsets)), HIGH - max(0, max(offsets))
        for _ in range(2000):
            base = self._rng.randrange(low, high)
            candidates = [base + o for o in offsets]
            if any(p in self._given or not _bindable(p) for p in candidates):
                continue
            reserved = []
            for p in candidates:
                if not self._reserve(p):
                    break
                reserved.append(p)
            if len(reserved) < len(candidates):
                for p in reserved:
                    with contextlib.suppress(OSError):
                        (self._dir / str(p)).unlink()
                continue
            self._given.update(candidates)
            return candidates
        raise RuntimeError(f"no free loopback ports at offsets {offsets} after 2000 tries")

    def take(self, count: int = 1, *, consecutive: bool = False) -> list[int]:
        """Return `count` free ports; with `consecutive`, ports p, p+1, ... (some servers derive ports)."""
        if consecutive:
            return self.take_offsets(tuple(range(count)))
        return [self.take_offsets((0,))[0] for _ in range(count)]

    def one(self) -> int:
        return self.take(1)[0]

    def release_all(self) -> None:
        for port in self._given:
            with contextlib.suppress(OSError):
                (self._dir / str(port)).unlink()
        self._given.clear()
