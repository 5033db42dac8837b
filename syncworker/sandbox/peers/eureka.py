"""Eureka: the real Spring Cloud Netflix Eureka server, built from a tiny Spring Boot app.

The build module lives in deploy/local/peers/eureka (pom.xml and src/). It is copied
into the peer cache and built there with Maven, so no build output lands in the
repository; the cache directory is keyed by the Spring Cloud release and by a hash of
the module's files, so an edited pom or source builds afresh.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from syncworker.sandbox import base, ports

SPRING_CLOUD = "2025.1.4"
SPRING_BOOT = "4.0.7"
JAR_NAME = "eureka-peer.jar"


def _module_files(root: Path) -> list[Path]:
    return sorted(p for p in [root / "pom.xml", *(root / "src").rglob("*")] if p.is_file())


def module_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in _module_files(root):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


class Eureka(base.Peer):
    name = "eureka"
    version = f"{SPRING_CLOUD}-boot{SPRING_BOOT}"
    start_timeout = 120.0
    #: heap for the server; Eureka holds a handful of test instances
    max_heap = "256m"

    def cache_dir(self) -> Path:
        return base.cache_root() / f"{self.name}-{self.version}-{module_hash(base.tools_dir(self.name))}"

    def _install(self, target: Path) -> None:
        mvn = base.which("mvn", "install it with: apt-get install -y maven")
        base.which("java", "install a JDK 17 or newer")
        source = base.tools_dir(self.name)
        build = target / "build"
        if build.exists():
            shutil.rmtree(build)
        build.mkdir(parents=True)
        shutil.copy2(source / "pom.xml", build / "pom.xml")
        shutil.copytree(source / "src", build / "src")
        base.run_checked([mvn, "-B", "-q", "-DskipTests", "package"], "eureka: maven build",
                         cwd=build, timeout=1800)
        jar = build / "target" / JAR_NAME
        if not jar.is_file():
            raise base.PeerError(f"eureka: maven build finished but {jar} is missing")
        shutil.copy2(jar, target / JAR_NAME)
        shutil.rmtree(build, ignore_errors=True)

    def _start(self, alloc: ports.PortAllocator, run_dir: Path, **options: object) -> base.Running:
        java = base.which("java", "install a JDK 17 or newer")
        port = alloc.one()
        argv = [
            java, "-Xms64m", f"-Xmx{self.max_heap}", "-XX:TieredStopAtLevel=1",
            "-Djava.io.tmpdir=" + str(run_dir),
            "-jar", str(self.cache_dir() / JAR_NAME),
            f"--server.port={port}",
            "--spring.main.banner-mode=off",
        ]
        url = f"http://127.0.0.1:{port}/eureka"
        return base.spawn(self.name, self.version, argv, run_dir, {"eureka": url},
                          extra={"port": port})

    def ready(self, running: base.Running) -> bool:
        return base.http_ok(running.endpoints["eureka"] + "/apps",
                            headers={"Accept": "application/json"},
                            accept=lambda resp: resp.status_code == 200)
