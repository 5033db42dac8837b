"""Consul: the real agent, v1.16.4 (the last MPL-2.0 release), built from a Go tools module.

The build module lives in deploy/local/peers/consul (go.mod, go.sum). It is copied
into the peer cache and `go build` runs there, so nothing is written into the
repository. The agent runs in dev mode (one in-memory server that elects itself)
on loopback ports from the allocator; DNS and gRPC listeners are switched off.

As of this writing the Go module proxy refuses the v1.16.4 source archive (403,
"This module version is not available"), so install fails with that message and
the peer tests fail with it; deploy/local/peers/consul/NOTES.md has the details.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx

from syncworker.sandbox import base, ports

CONSUL_VERSION = "1.16.4"
GO_FALLBACK = Path("/usr/local/go/bin/go")


def _go() -> str:
    found = shutil.which("go")
    if found:
        return found
    if GO_FALLBACK.is_file():
        return str(GO_FALLBACK)
    raise base.PeerError("go not found on PATH or at /usr/local/go/bin/go; install Go 1.24 or newer")


class Consul(base.Peer):
    name = "consul"
    version = CONSUL_VERSION
    start_timeout = 60.0

    def binary(self) -> Path:
        return self.cache_dir() / "consul"

    def _install(self, target: Path) -> None:
        go = _go()
        source = base.tools_dir(self.name)
        build = target / "build"
        if build.exists():
            shutil.rmtree(build)
        build.mkdir(parents=True)
        for name in ("go.mod", "go.sum"):
            if (source / name).is_file():
                shutil.copy2(source / name, build / name)
        # -mod=mod lets go record checksums in the cache copy of go.sum, never in the repo.
        env = {"GOFLAGS": "-mod=mod -buildvcs=false", "CGO_ENABLED": "0"}
        try:
            base.run_checked([go, "build", "-trimpath", "-o", str(self.binary()),
                              "github.com/hashicorp/consul"], f"consul {self.version}: go build",
                             cwd=build, env=env, timeout=3600)
        except base.PeerError as exc:
            raise base.PeerError(f"{exc}\n(see deploy/local/peers/consul/NOTES.md)") from exc
        shutil.rmtree(build, ignore_errors=True)
        if not self.binary().is_file():
            raise base.PeerError(f"consul: go build finished but {self.binary()} is missing")

    def _start(self, alloc: ports.PortAllocator, run_dir: Path, **options: object) -> base.Running:
        http_port, serf_lan, serf_wan, server = (alloc.one() for _ in range(4))
        data_dir = run_dir / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            str(self.binary()), "agent", "-dev",
            "-node", "syncworker-peer",
            "-bind", "127.0.0.1", "-client", "127.0.0.1",
            "-data-dir", str(data_dir),
            "-http-port", str(http_port),
            "-serf-lan-port", str(serf_lan),
            "-serf-wan-port", str(serf_wan),
            "-server-port", str(server),
            # not needed by the tests: -1 switches a listener off
            "-dns-port", "-1",
            "-grpc-port", "-1",
            "-grpc-tls-port", "-1",
            "-hcl", "disable_update_check = true",
        ]
        ports_used = {"http": http_port, "serf_lan": serf_lan, "serf_wan": serf_wan, "server": server}
        return base.spawn(self.name, self.version, argv, run_dir,
                          {"http": f"http://127.0.0.1:{http_port}"}, extra={"ports": ports_used})

    def ready(self, running: base.Running) -> bool:
        resp = httpx.get(running.endpoints["http"] + "/v1/status/leader", timeout=2.0)
        return resp.status_code == 200 and bool(resp.json())
