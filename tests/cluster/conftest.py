"""Cluster tests: real Redis, ZooKeeper and Polaris from the sandbox; real scheduler and worker processes.

Workers are `syncworker worker` supervisors: the Celery worker (whose identity is
host:pid in the store) is their child; `Cluster.worker_identity` finds it.
Every test gets its own key prefix in Redis (which is also its Celery queue) and
its own ZooKeeper root, so tests never see each other's state. Processes are
started with `python -m syncworker.cli ...` in their own process group, and every
one of them is killed (SIGKILL to the group) when the test ends, pass or fail;
a failing test prints the tail of every process log.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from syncworker.cluster import store as store_mod
from syncworker.sandbox import base as sandbox

REPO = Path(__file__).resolve().parents[2]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(scope="session")
def redis_url(peers: Any) -> str:
    running: sandbox.Running = peers.get("redis")
    return running.endpoints["redis"]


@pytest.fixture(scope="session")
def zookeeper(peers: Any) -> str:
    running: sandbox.Running = peers.get("zookeeper")
    return running.endpoints["zookeeper"]


class Proc:
    def __init__(self, name: str, popen: subprocess.Popen[bytes], log: Path) -> None:
        self.name = name
        self.popen = popen
        self.log = log

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def kill(self) -> None:
        """SIGKILL to the whole process group (a machine or pod that vanishes)."""
        self.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


class Cluster:
    """Starts `syncworker` processes with one cluster's environment; kills them all at the end."""

    def __init__(self, env: dict[str, str], logdir: Path) -> None:
        self.env = env
        self.logdir = logdir
        self.procs: list[Proc] = []
        self.prefix = env["SYNCWORKER_REDIS_PREFIX"]
        self.store = store_mod.Store.from_url(env["SYNCWORKER_REDIS_URL"], self.prefix)

    def start(self, name: str, *args: str, **env: str) -> Proc:
        log = self.logdir / f"{name}.log"
        fh = log.open("ab")
        popen = subprocess.Popen([sys.executable, "-m", "syncworker.cli", *args], cwd=REPO,
                                 env={**self.env, **env}, stdout=fh, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        fh.close()
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def scheduler(self, name: str = "scheduler", *args: str) -> Proc:
        return self.start(name, "scheduler", *args)

    def worker(self, name: str, concurrency: int = 4) -> Proc:
        return self.start(name, "worker", "--concurrency", str(concurrency), "-n", f"{name}@%h")

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "syncworker.cli", *args], cwd=REPO, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def identity(self, proc: Proc) -> str:
        """A scheduler's identity (host:pid of the process started)."""
        return f"{os.uname().nodename}:{proc.pid}"

    def worker_identity(self, proc: Proc, timeout: float = 40) -> str:
        """The identity of the live Celery worker that `syncworker worker` `proc` supervises (host:pid of its
        child, which changes when the supervisor starts the child again)."""
        return str(wait_for(lambda: next((k for k, v in self.store.members().items()
                                          if v.get("role") == "worker" and v.get("supervisor") == proc.pid), None),
                            timeout, what=f"{proc.name} to be a live worker"))

    def worker_identities(self, procs: dict[str, Proc]) -> dict[str, str]:
        """{identity: name} of the live workers these supervisors run now."""
        by_pid = {p.pid: name for name, p in procs.items()}
        return {k: by_pid[v["supervisor"]] for k, v in self.store.members().items()
                if v.get("role") == "worker" and v.get("supervisor") in by_pid}

    def workers_alive(self) -> set[str]:
        return {k for k, v in self.store.members().items() if v.get("role") == "worker"}

    def stop_all(self) -> None:
        for proc in self.procs:
            proc.kill()

    def logs(self) -> str:
        parts = [f"----- {p.name} (pid {p.pid}, {'alive' if p.alive() else 'exited'}) -----\n{p.tail()}"
                 for p in self.procs]
        return "\n".join([f"process logs in {self.logdir}", *parts])


def cluster_env(redis_url: str, zookeeper: str, **extra: str) -> dict[str, str]:
    tag = uuid.uuid4().hex[:10]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNCWORKER_", "POLARIS_SYNC_", "CELERY_"))}
    env.update({
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")])),
        "SYNCWORKER_REDIS_URL": redis_url,
        "SYNCWORKER_REDIS_PREFIX": f"t{tag}",
        "SYNCWORKER_ZOOKEEPER": zookeeper,
        "SYNCWORKER_ZK_ROOT": f"/syncworker-test/{tag}",
        "SYNCWORKER_ZK_SESSION_TIMEOUT": "4",
        "SYNCWORKER_CONFIG_PROVIDER": "redis",
        "SYNCWORKER_LOCK_TTL": "6",
        "SYNCWORKER_LEASE_TTL": "4",
        "SYNCWORKER_ALIVE_TTL": "3",
        "SYNCWORKER_DISCOVER_INTERVAL": "2",
        "SYNCWORKER_RELOAD_INTERVAL": "0.5",
        "SYNCWORKER_QUEUE_TIMEOUT": "60",
        "SYNCWORKER_LOG_LEVEL": "INFO",
        **extra,
    })
    return env


@contextlib.contextmanager
def running_cluster(request: pytest.FixtureRequest, env: dict[str, str], logdir: Path) -> Iterator[Cluster]:
    """A cluster whose processes all die at the end; their logs are printed when a test failed."""
    cluster = Cluster(env, logdir)
    failed_before = request.session.testsfailed
    try:
        yield cluster
    finally:
        cluster.stop_all()
        failed = request.session.testsfailed > failed_before or any(
            getattr(getattr(request.node, f"rep_{w}", None), "failed", False) for w in ("setup", "call"))
        if failed or request.config.getoption("verbose") > 1:
            print(cluster.logs())
        cluster.store.flush()


@pytest.fixture
def cluster(request: pytest.FixtureRequest, redis_url: str, zookeeper: str, tmp_path: Path) -> Iterator[Cluster]:
    with running_cluster(request, cluster_env(redis_url, zookeeper), tmp_path) as c:
        yield c


def wait_for(check: Callable[[], Any], timeout: float, every: float = 0.05, what: str = "condition") -> Any:
    """Poll until `check()` is truthy; return its value, or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(every)
