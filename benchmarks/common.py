"""Shared pieces of the benchmarks: real peers, connectors, a `syncworker run` child process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import httpx

from syncworker import model
from syncworker.connectors import base, registry
from syncworker.reconcile import planner
from syncworker.sandbox import base as sandbox_base
from syncworker.sandbox import harness

CLK_TCK = os.sysconf("SC_CLK_TCK")



def exit_on_sigterm() -> None:
    """Make SIGTERM (a timeout, a kill) run the `finally` blocks that stop the started servers."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def report(result: dict[str, Any]) -> None:
    """Print a benchmark's JSON summary and append it to benchmarks/results.jsonl."""
    print(json.dumps(result, indent=2))
    with Path(__file__).with_name("results.jsonl").open("a") as fh:
        fh.write(json.dumps(result) + "\n")


def endpoint(name: str, type_: str, running: sandbox_base.Running) -> dict[str, Any]:
    ep: dict[str, Any] = {"name": name, "type": type_, "addresses": [running.endpoints["http"]]}
    creds = running.credentials
    if "token" in creds:
        ep["token"] = creds["token"]
    if "username" in creds:
        ep["user"], ep["password"] = creds["username"], creds["password"]
    return ep


def connector(ep: dict[str, Any], **options: Any) -> base.Connector:
    return registry.create(base.Endpoint(name=ep["name"], type=ep["type"], addresses=tuple(ep["addresses"]),
                                         token=ep.get("token", ""), user=ep.get("user", ""),
                                         password=ep.get("password", ""), options=options))


def native_writer(ep: dict[str, Any]) -> base.Connector:
    """A connector that writes natives as an application would keep them: Nacos natives are
    persistent here, since nothing heartbeats for them during a benchmark."""
    return connector(ep, copies="persistent") if ep["type"] == "nacos" else connector(ep)


async def bounded(jobs: Iterable[Callable[[], Awaitable[Any]]], concurrency: int) -> list[Any]:
    sem = asyncio.Semaphore(concurrency)

    async def one(job: Callable[[], Awaitable[Any]]) -> Any:
        async with sem:
            return await job()

    return await asyncio.gather(*(one(j) for j in jobs))


async def write_all(conn: base.Connector, records: dict[model.ServiceKey, list[model.Instance]],
                    concurrency: int = 16) -> float:
    """Create every record through the connector, `concurrency` services at a time; seconds taken."""
    ctx = base.ApplyContext(task="bench")
    t0 = time.perf_counter()

    def job(svc: model.ServiceKey, insts: list[model.Instance]) -> Callable[[], Awaitable[Any]]:
        async def go() -> None:
            outcomes = await conn.apply(svc, planner.Plan(creates=tuple(insts)), ctx)
            bad = [o for o in outcomes if not o.ok]
            if bad:
                raise RuntimeError(f"write to {svc} failed: {bad[0].error}")
        return go

    await bounded([job(s, i) for s, i in records.items()], concurrency)
    return time.perf_counter() - t0


class ChildRun:
    """`syncworker run -c CONFIG` in a child process, with its /status endpoint and /proc figures."""

    def __init__(self, config: dict[str, Any], workdir: Path, status_port: int) -> None:
        self.config_path = workdir / "bench-config.json"
        self.config_path.write_text(json.dumps(config, indent=1))
        self.port = status_port
        env = dict(os.environ, SYNCWORKER_STATUS_PORT=str(status_port), SYNCWORKER_LOG_LEVEL="WARNING",
                   SYNCWORKER_REPORT_FILE=str(workdir / "report.jsonl"))
        self.log = open(workdir / "syncworker.log", "wb")  # noqa: SIM115 - closed in stop()
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "syncworker.cli", "run", "-c", str(self.config_path),
                                      "--no-live"], stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     cwd=str(workdir))

    def status(self) -> list[dict[str, Any]] | None:
        try:
            resp = httpx.get(f"http://127.0.0.1:{self.port}/status", timeout=2)
            rows: list[dict[str, Any]] = resp.json()
            return rows
        except (httpx.HTTPError, ValueError):
            return None

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def memory(self) -> dict[str, float]:
        out = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) / 1024
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def start_peers(names: list[str]) -> tuple[harness.PeerPool, dict[str, sandbox_base.Running]]:
    pool = harness.PeerPool()
    return pool, {n: pool.get(n) for n in names}


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]
