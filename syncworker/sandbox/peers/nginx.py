"""Nginx from Debian's nginx package: a real gateway whose upstreams the product rewrites.

One non-daemon master (`nginx -p RUN_DIR -c nginx.conf -e logs/error.log -g 'daemon
off;'`) is the process-group leader; its workers are forked into the same group,
so `Running.stop` ends them all. Everything nginx writes (pid, error and access
logs, client body / proxy / fastcgi / uwsgi / scgi temp files) stays in the run
directory, and the one listener is on a port from the allocator.

How later code feeds it:

* `Running.extra["upstreams_path"]` (RUN_DIR/upstreams.conf) is included inside
  `http {}` of the main config: write `upstream` and `server` blocks there.
* `Running.extra["conf_path"]` is the main config and `extra["prefix"]` its prefix.
* `Nginx.apply_upstreams(running, text)` writes that file atomically, checks the
  whole config with `nginx -t`, restores the previous file if the check fails,
  and otherwise runs `nginx -s reload` and waits until a new generation of
  workers is up. `Nginx.reload(running)` does the check and reload alone.

The main server block answers `GET /__sandbox/ready` with 200 (the readiness
probe) and 404 otherwise.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx

from syncworker.sandbox import base, ports

HINT = "install it with: apt-get install -y nginx"
READY_PATH = "/__sandbox/ready"


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if not found:
        raise base.PeerError(f"nginx not found on PATH or in /usr/sbin; {HINT}")
    return found


def nginx_version() -> str:
    try:
        out = subprocess.run([nginx_binary(), "-v"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired, base.PeerError):
        return "debian"
    match = re.search(r"nginx/(\S+)", out.stderr + out.stdout)
    return match.group(1) if match else "debian"


def _quote(path: Path) -> str:
    return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _worker_pids(master: int) -> set[int]:
    """Live children of the nginx master (its workers)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == master and fields[0] != "Z":
            found.add(int(entry.name))
    return found


class Nginx(base.Peer):
    name = "nginx"
    version = "debian"
    start_timeout = 20.0

    def __init__(self) -> None:
        self.version = nginx_version()

    def _install(self, target: Path) -> None:
        nginx_binary()

    def _config(self, run_dir: Path, port: int) -> str:
        logs = run_dir / "logs"
        temp = run_dir / "temp"
        # A root master drops its workers to `nobody`, who cannot enter a run dir under
        # /root; keep the workers as the current user (the directive is ignored otherwise).
        user = f"user {getpass.getuser()};\n" if os.geteuid() == 0 else ""
        return f"""# written by the syncworker sandbox; upstreams live in upstreams.conf
{user}worker_processes 1;
pid {_quote(run_dir / "nginx.pid")};
error_log {_quote(logs / "error.log")} info;

events {{
    worker_connections 256;
}}

http {{
    access_log {_quote(logs / "access.log")};
    client_body_temp_path {_quote(temp / "client_body")};
    proxy_temp_path {_quote(temp / "proxy")};
    fastcgi_temp_path {_quote(temp / "fastcgi")};
    uwsgi_temp_path {_quote(temp / "uwsgi")};
    scgi_temp_path {_quote(temp / "scgi")};
    default_type application/octet-stream;

    include {_quote(run_dir / "upstreams.conf")};

    server {{
        listen 127.0.0.1:{port} default_server;
        server_name _;
        location = {READY_PATH} {{
            default_type text/plain;
            return 200 "ok\\n";
        }}
        location / {{
            return 404;
        }}
    }}
}}
"""

    def _start(self, alloc: ports.PortAllocator, run_dir: Path, **options: object) -> base.Running:
        binary = nginx_binary()
        port = alloc.one()
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        (run_dir / "temp").mkdir(parents=True, exist_ok=True)
        conf = run_dir / "nginx.conf"
        upstreams = run_dir / "upstreams.conf"
        upstreams.write_text("# upstream and server blocks, included inside http {}\n")
        conf.write_text(self._config(run_dir, port))
        argv = [binary, "-p", f"{run_dir}/", "-c", str(conf), "-e", str(run_dir / "logs" / "error.log"),
                "-g", "daemon off;"]
        return base.spawn(
            self.name,
            self.version,
            argv,
            run_dir,
            {"http": f"http://127.0.0.1:{port}"},
            extra={
                "port": port,
                "prefix": f"{run_dir}/",
                "conf_path": str(conf),
                "upstreams_path": str(upstreams),
                "error_log": str(run_dir / "logs" / "error.log"),
                "access_log": str(run_dir / "logs" / "access.log"),
            },
        )

    def ready(self, running: base.Running) -> bool:
        resp = httpx.get(f"{running.endpoints['http']}{READY_PATH}", timeout=2.0)
        return resp.status_code == 200

    # ---- feeding it ------------------------------------------------------------------
    def _ctl(self, running: base.Running, *args: str) -> list[str]:
        return [nginx_binary(), "-p", str(running.extra["prefix"]), "-c", str(running.extra["conf_path"]),
                "-e", str(running.extra["error_log"]), *args]

    def check(self, running: base.Running) -> None:
        """`nginx -t` on the run's config; PeerError with nginx's words when it is invalid."""
        base.run_checked(self._ctl(running, "-t", "-q"), "nginx config check", timeout=30)

    def reload(self, running: base.Running, timeout: float = 10.0) -> None:
        """Check the config, `nginx -s reload`, and wait until a new worker generation serves."""
        self.check(running)
        self._signal_reload(running, timeout)

    def _signal_reload(self, running: base.Running, timeout: float) -> None:
        before = _worker_pids(running.pid)
        base.run_checked(self._ctl(running, "-s", "reload"), "nginx reload", timeout=30)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _worker_pids(running.pid) - before:
                return
            time.sleep(0.05)
        raise base.PeerError(f"nginx did not start new workers within {timeout:.0f}s after reload; "
                             f"log {running.extra['error_log']}")

    def apply_upstreams(self, running: base.Running, text: str, timeout: float = 10.0) -> None:
        """Replace upstreams.conf atomically, check, reload; put the old file back if the check fails."""
        path = Path(str(running.extra["upstreams_path"]))
        previous = path.read_text() if path.exists() else ""
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        try:
            self.check(running)
        except base.PeerError:
            tmp.write_text(previous)
            os.replace(tmp, path)
            raise
        self._signal_reload(running, timeout)
