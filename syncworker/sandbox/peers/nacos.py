"""Nacos 3.1 from the republished module jars (io.github.pig-mesh.nacos:*), auth off and auth on.

No official Nacos server jar is published to the Maven registry; the republished
module jars are, at version 3.1.0-bugfix only ("3.1.0" of nacos-server is not
served). The tools module in deploy/local/peers/nacos/ depends on nacos-server and
nacos-console and adds one launcher class that starts the core, server-web and
console contexts like the upstream bootstrap. `install()` runs Maven once into the
versioned cache dir (launcher jar, lib/ and an ordered classpath.txt); `start()`
runs `java -cp ... syncworker.peers.NacosPeerLauncher` standalone with embedded
Derby in a fresh nacos.home.

Ports. Nacos derives three ports from the main HTTP port P (nacos.server.main.port)
with fixed offsets that 3.1 does not let a server change: gRPC for clients P+1000,
gRPC between servers P+1001, and JRaft P-1000 (opened even in standalone mode). So
the allocator reserves P with all three (`take_offsets`). The console
(nacos.console.port) gets its own port.

Auth on (`NacosAuth`): nacos.core.auth.enabled/admin.enabled/console.enabled, a
random base64 token key of 32 bytes, a random server identity; 3.x creates no user
at first start, so start() sets the admin password through POST /v3/auth/user/admin
(allowed once, while no admin exists) and checks that logging in works.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import secrets
import time
from pathlib import Path

import httpx

from syncworker.sandbox import base, ports

NACOS_VERSION = "3.1.0-bugfix"
CONTEXT_PATH = "/nacos"
ADMIN_USER = "nacos"
#: gRPC (client), gRPC (cluster) and JRaft ports sit at these offsets from the main port
DERIVED_OFFSETS = (1000, 1001, -1000)

MVN_HINT = "install Maven and a JDK 17: apt-get install -y maven openjdk-17-jdk-headless"


def allocate_main_port(alloc: ports.PortAllocator) -> int:
    """A main port P reserved together with P+1000, P+1001 and P-1000 (all below 32000)."""
    try:
        return alloc.take_offsets((0, *DERIVED_OFFSETS))[0]
    except RuntimeError as exc:
        raise base.PeerError(f"nacos: {exc}") from exc


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").exists():
        return str(Path(java_home) / "bin" / "java")
    return base.which("java", MVN_HINT)


class Nacos(base.Peer):
    name = "nacos"
    version = NACOS_VERSION
    #: measured 12-25 s on an idle machine, ~100 s on 2 cores shared with other builds (load ~13)
    start_timeout = 180.0
    auth = False

    # ---- install -----------------------------------------------------------------
    def cache_dir(self) -> Path:
        # nacos and nacos-auth are one install
        return base.cache_root() / f"nacos-{self.version}"

    def tools_fingerprint(self) -> str:
        """A hash of the tools module (pom.xml, src/): a changed module is rebuilt into the same cache dir."""
        tools = base.tools_dir("nacos")
        digest = hashlib.sha256()
        for path in sorted([tools / "pom.xml", *(tools / "src").rglob("*")]):
            if path.is_file():
                digest.update(str(path.relative_to(tools)).encode() + b"\0" + path.read_bytes() + b"\0")
        return digest.hexdigest()

    def installed(self) -> bool:
        stamp = self.cache_dir() / "build" / "tools.sha256"
        try:
            current = stamp.read_text().strip() == self.tools_fingerprint()
        except OSError:
            current = False
        return current and super().installed()

    def _install(self, target: Path) -> None:
        mvn = base.which("mvn", MVN_HINT)
        _java()
        tools = base.tools_dir("nacos")
        build = target / "build"
        base.run_checked(
            [mvn, "-B", "-q", "-f", str(tools / "pom.xml"), f"-Dpeer.out={build}", "package"],
            "nacos: maven build of deploy/local/peers/nacos",
            cwd=tools,
            timeout=3600,
        )
        for needed in (build / "nacos-peer.jar", build / "classpath.txt"):
            if not needed.exists():
                raise base.PeerError(f"nacos: maven build finished without {needed}")
        (build / "tools.sha256").write_text(self.tools_fingerprint())

    def classpath(self) -> str:
        build = self.cache_dir() / "build"
        deps = (build / "classpath.txt").read_text().strip()
        return f"{build / 'nacos-peer.jar'}{os.pathsep}{deps}"

    # ---- start -------------------------------------------------------------------
    def properties(self, main_port: int, console_port: int) -> dict[str, str]:
        props = {
            "nacos.standalone": "true",
            "nacos.deployment.type": "merged",
            "nacos.server.main.port": str(main_port),
            "nacos.server.contextPath": CONTEXT_PATH,
            "nacos.console.port": str(console_port),
            "nacos.inetutils.ip-address": "127.0.0.1",
            "server.address": "127.0.0.1",
            "server.tomcat.accesslog.enabled": "false",
            "nacos.core.auth.enabled": "false",
            "nacos.core.auth.admin.enabled": "false",
            "nacos.core.auth.console.enabled": "false",
            "db.pool.config.connectionTimeout": "60000",
        }
        return props

    def _start(self, alloc: ports.PortAllocator, run_dir: Path, **options: object) -> base.Running:
        main_port = allocate_main_port(alloc)
        console_port = alloc.one()
        home = run_dir / "nacos-home"
        home.mkdir(parents=True, exist_ok=True)
        props = self.properties(main_port, console_port)
        extra_props = options.get("properties") or {}
        if not isinstance(extra_props, dict):
            raise base.PeerError(f"{self.name}: option properties must be a dict of Nacos properties")
        props.update({str(k): str(v) for k, v in extra_props.items()})
        props["nacos.home"] = str(home)
        argv = [
            _java(),
            "-Xms256m",
            "-Xmx768m",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            "-Djava.awt.headless=true",
            "-Dfile.encoding=UTF-8",
            f"-Djava.io.tmpdir={run_dir}",
            *(f"-D{k}={v}" for k, v in props.items()),
            "-cp",
            self.classpath(),
            "syncworker.peers.NacosPeerLauncher",
        ]
        http = f"http://127.0.0.1:{main_port}{CONTEXT_PATH}"
        endpoints = {
            "http": http,
            "grpc_port": str(main_port + 1000),
            "console": f"http://127.0.0.1:{console_port}",
        }
        extra: dict[str, object] = {
            "main_port": main_port,
            "grpc_port": main_port + 1000,
            "grpc_cluster_port": main_port + 1001,
            "raft_port": main_port - 1000,
            "console_port": console_port,
            "auth": self.auth,
            "nacos_home": str(home),
        }
        credentials = self.initial_credentials(props)
        return base.spawn(self.name, self.version, argv, run_dir, endpoints,
                          credentials=credentials, extra=extra)

    def initial_credentials(self, props: dict[str, str]) -> dict[str, str]:
        return {}

    def start(self, alloc: ports.PortAllocator, run_dir: Path | None = None, **options: object) -> base.Running:
        """Start, wait until both contexts answer, then finish the set-up through the API.

        Option `properties`: extra Nacos/Spring properties (passed as -D flags), e.g.
        {"nacos.core.api.compatibility.admin.enabled": "true"}.

        Option `health_checks` (default False): Nacos probes every persistent instance
        itself (TCP connect to ip:port every few seconds). Off by default, so that
        instances registered with made-up or non-loopback addresses cause no traffic
        off this machine; pass health_checks=True to keep Nacos's own health checking.
        """
        running = super().start(alloc, run_dir, **options)
        try:
            self.after_ready(running, health_checks=bool(options.get("health_checks", False)))
        except BaseException:
            running.stop()
            raise
        return running

    def after_ready(self, running: base.Running, *, health_checks: bool) -> None:
        running.extra["health_checks"] = health_checks
        if not health_checks:
            # The switch entry is "check" (the field it sets is healthCheckEnabled); Nacos answers
            # "ok" to unknown entries too, so read the switches back.
            self.set_switch(running, "check", "false", field="healthCheckEnabled", expect=False)

    def auth_params(self, running: base.Running) -> dict[str, str]:
        return {}

    def set_switch(self, running: base.Running, entry: str, value: str, *, field: str, expect: object) -> None:
        url = f"{running.endpoints['http']}/v3/admin/ns/ops/switches"
        auth = self.auth_params(running)
        resp = httpx.put(url, params={"entry": entry, "value": value, **auth}, timeout=10.0)
        if resp.status_code != 200 or '"code":0' not in resp.text.replace(" ", ""):
            raise base.PeerError(f"{self.name}: setting switch {entry}={value} failed: "
                                 f"{resp.status_code} {resp.text[:300]}; log {running.log_path}")
        seen: object = None
        deadline = time.monotonic() + 15.0
        while time.monotonic() < deadline:
            got = httpx.get(url, params=auth, timeout=10.0)
            with contextlib.suppress(ValueError, KeyError, TypeError):
                seen = got.json()["data"][field]
            if seen == expect:
                return
            time.sleep(0.3)
        raise base.PeerError(f"{self.name}: switch {entry}={value} accepted but {field} is still {seen!r}")

    def ready(self, running: base.Running) -> bool:
        """The naming API and the console (started last) both answer."""
        resp = httpx.get(f"{running.endpoints['http']}/v1/ns/service/list",
                         params={"pageNo": 1, "pageSize": 1}, timeout=3.0)
        if self.auth:
            if resp.status_code not in (200, 401, 403):
                return False
        elif resp.status_code != 200:
            return False
        console = httpx.get(f"{running.endpoints['console']}/", timeout=3.0)
        return console.status_code < 500


class NacosAuth(Nacos):
    name = "nacos-auth"
    auth = True

    def properties(self, main_port: int, console_port: int) -> dict[str, str]:
        props = super().properties(main_port, console_port)
        props.update({
            "nacos.core.auth.enabled": "true",
            "nacos.core.auth.admin.enabled": "true",
            "nacos.core.auth.console.enabled": "true",
            "nacos.core.auth.system.type": "nacos",
            "nacos.core.auth.caching.enabled": "false",
            "nacos.core.auth.plugin.nacos.token.secret.key": base64.b64encode(secrets.token_bytes(32)).decode(),
            "nacos.core.auth.server.identity.key": "syncworker-identity",
            "nacos.core.auth.server.identity.value": secrets.token_hex(16),
        })
        return props

    def initial_credentials(self, props: dict[str, str]) -> dict[str, str]:
        return {
            "username": ADMIN_USER,
            "password": secrets.token_urlsafe(12),
            "identity_key": props["nacos.core.auth.server.identity.key"],
            "identity_value": props["nacos.core.auth.server.identity.value"],
        }

    def after_ready(self, running: base.Running, *, health_checks: bool) -> None:
        self.init_admin(running)
        super().after_ready(running, health_checks=health_checks)

    def auth_params(self, running: base.Running) -> dict[str, str]:
        return {"accessToken": self.login(running)}

    def login(self, running: base.Running) -> str:
        """POST /v1/auth/login with the admin credentials; the accessToken (valid 18000 s)."""
        user, password = running.credentials["username"], running.credentials["password"]
        resp = httpx.post(f"{running.endpoints['http']}/v1/auth/login",
                          data={"username": user, "password": password}, timeout=10.0)
        token = ""
        with contextlib.suppress(ValueError):
            token = str(resp.json().get("accessToken", ""))
        if resp.status_code != 200 or not token:
            raise base.PeerError(f"{self.name}: login as {user} failed: {resp.status_code} {resp.text[:500]}; "
                                 f"log {running.log_path}")
        return token

    def init_admin(self, running: base.Running) -> None:
        """Set the admin password (3.x creates no user at first start), then prove that logging in works."""
        resp = httpx.post(f"{running.endpoints['http']}/v3/auth/user/admin",
                          data={"password": running.credentials["password"]}, timeout=10.0)
        if resp.status_code != 200 or '"code":0' not in resp.text.replace(" ", ""):
            raise base.PeerError(
                f"nacos-auth: POST /v3/auth/user/admin answered {resp.status_code}: {resp.text[:500]}; "
                f"log {running.log_path}"
            )
        self.login(running)


__all__ = ["Nacos", "NacosAuth", "allocate_main_port"]
