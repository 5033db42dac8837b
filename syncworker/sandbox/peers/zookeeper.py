"""ZooKeeper from Debian's zookeeper package: a real registry for the ZooKeeper connector.

The JVM is started directly (the same main class and jar that `zkServer.sh
start-foreground` uses) with a `zoo.cfg` written into the run directory: data in
the run directory, the client port from the allocator, the admin web server
(default 8080) off, and the four-letter words `ruok`, `srvr`, `stat`, `mntr`
allowed so that readiness is probed with `srvr`. slf4j-simple sends the server
log to stderr, hence into the run directory's log file.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

from syncworker.sandbox import base, ports

JAVA_DIR = Path("/usr/share/java")
MAIN_CLASS = "org.apache.zookeeper.server.quorum.QuorumPeerMain"
HINT = "install it with: apt-get install -y zookeeper"


def debian_version() -> str:
    """The version of the installed zookeeper jar (Debian names it zookeeper-X.Y.Z.jar)."""
    for jar in sorted(JAVA_DIR.glob("zookeeper-[0-9]*.jar")):
        match = re.fullmatch(r"zookeeper-(\d+\.\d+\.\d+)\.jar", jar.name)
        if match:
            return match.group(1)
    return "debian"


def four_letter_word(port: int, word: str, timeout: float = 2.0) -> str:
    """Send one four-letter command to 127.0.0.1:port and return the whole reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(word.encode())
        chunks = []
        while True:
            data = sock.recv(4096)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


class ZooKeeper(base.Peer):
    name = "zookeeper"
    version = "debian"
    start_timeout = 60.0

    def __init__(self) -> None:
        self.version = debian_version()

    def _classpath(self) -> str:
        jar = JAVA_DIR / "zookeeper.jar"  # its manifest Class-Path names the other jars
        logger = JAVA_DIR / "slf4j-simple.jar"
        if not jar.exists():
            raise base.PeerError(f"{jar} not found; {HINT}")
        return f"{jar}:{logger}" if logger.exists() else str(jar)

    def _install(self, target: Path) -> None:
        base.which("java", HINT)
        self._classpath()

    def _start(self, alloc: ports.PortAllocator, run_dir: Path, **options: object) -> base.Running:
        java = base.which("java", HINT)
        port = alloc.one()
        data_dir = run_dir / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        cfg = run_dir / "zoo.cfg"
        cfg.write_text(
            "\n".join(
                [
                    "tickTime=2000",
                    f"dataDir={data_dir}",
                    f"clientPort={port}",
                    "clientPortAddress=127.0.0.1",
                    "maxClientCnxns=0",
                    "admin.enableServer=false",
                    "4lw.commands.whitelist=ruok,srvr,stat,mntr",
                    "",
                ]
            )
        )
        argv = [
            java,
            "-Xms64m",
            "-Xmx256m",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            "-Djava.net.preferIPv4Stack=true",
            "-Dzookeeper.jmx.log4j.disable=true",
            "-Dorg.slf4j.simpleLogger.defaultLogLevel=info",
            "-Dorg.slf4j.simpleLogger.showDateTime=true",
            f"-Dzookeeper.log.dir={run_dir}",
            "-cp",
            self._classpath(),
            MAIN_CLASS,
            str(cfg),
        ]
        return base.spawn(
            self.name,
            self.version,
            argv,
            run_dir,
            {"zookeeper": f"127.0.0.1:{port}"},
            extra={"port": port, "config": str(cfg), "data_dir": str(data_dir)},
        )

    def ready(self, running: base.Running) -> bool:
        # `srvr` answers "not currently serving requests" until the server is up.
        reply = four_letter_word(int(running.extra["port"]), "srvr")  # type: ignore[arg-type]
        return "Zookeeper version" in reply and "Mode:" in reply
