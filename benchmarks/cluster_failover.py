"""Cluster mode under failure and at scale: leader failovers, Redis and ZooKeeper restarts, 1/2/4 workers.

    python -m benchmarks.cluster_failover [--kills 10] [--services 100] [--instances 5]
                                          [--workers 1,2,4] [--only failover,scale,redis,zk]

Real Polaris from the sandbox is source and destination (two namespaces). Redis
and ZooKeeper are started here on fixed ports, so that they can be restarted in
place. Schedulers and workers are `python -m syncworker.cli` processes.

- failover: 3 schedulers; the leader is killed (SIGKILL) `--kills` times, a new
  standby started each time; seconds from the kill until another leads.
- scale: S services x N instances synced with 1, 2, 4 workers (concurrency 8
  each); seconds from `config push` until every unit is in sync. (The
  1,000-service Nacos -> Polaris run is `benchmarks.cluster_scale`.)
- redis: Redis is killed and restarted empty (no persistence) under a running
  cluster; seconds until a source change made after the restart reaches the
  destination (the leader publishes its config again, duties are re-dispatched),
  with no process restarted by the benchmark (`syncworker worker` restarts its
  Celery worker when Celery exits; the restarts are counted from its log).
- zk: ZooKeeper is killed: seconds until no scheduler leads (dispatching stops);
  restarted on its data: seconds until one leads again, and until a change syncs.

Prints a JSON summary and appends it to benchmarks/results.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import common
from syncworker import model
from syncworker.cluster import store as store_mod
from syncworker.sandbox import base as sandbox_base
from syncworker.sandbox import catalog, ports

REPO = Path(__file__).resolve().parents[1]


class FixedPort:
    """An allocator that always hands out the same port (restarts in place)."""

    def __init__(self, port: int) -> None:
        self.port = port

    def one(self) -> int:
        return self.port


class Restartable:
    """Redis or ZooKeeper on a fixed port and run directory."""

    def __init__(self, name: str, port: int, root: Path) -> None:
        self.peer = catalog.get(name)
        self.port = port
        self.run_dir = root / name
        self.running: sandbox_base.Running | None = None

    def start(self) -> sandbox_base.Running:
        self.running = self.peer.start(FixedPort(self.port), self.run_dir)  # type: ignore[arg-type]
        return self.running

    def kill(self) -> None:
        if self.running is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.running.pid, signal.SIGKILL)
            self.running.stop(5)
            self.running = None


class Procs:
    def __init__(self, env: dict[str, str], logdir: Path) -> None:
        self.env = env
        self.logdir = logdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.store = store_mod.Store.from_url(env["SYNCWORKER_REDIS_URL"], env["SYNCWORKER_REDIS_PREFIX"])

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        with (self.logdir / f"{name}.log").open("ab") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "syncworker.cli", *args], cwd=REPO, env=self.env,
                                    stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.procs[name] = proc
        return proc

    def identity(self, name: str) -> str:
        return f"{os.uname().nodename}:{self.procs[name].pid}"

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def push(self, config: dict[str, Any]) -> None:
        path = self.logdir / f"config-{uuid.uuid4().hex[:6]}.json"
        path.write_text(json.dumps(config))
        out = subprocess.run([sys.executable, "-m", "syncworker.cli", "config", "push", str(path)], cwd=REPO,
                             env=self.env, capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(out.stderr)

    def exited(self) -> list[str]:
        return [name for name, proc in self.procs.items() if proc.poll() is not None]

    def celery_restarts(self) -> dict[str, int]:
        """Celery workers that `syncworker worker` started again (it logs each restart)."""
        return {name: (self.logdir / f"{name}.log").read_text(errors="replace").count(
                    "celery worker exited unexpectedly") for name in self.procs if name.startswith("worker")}

    def stop_all(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is None:
                self.kill(name)


def wait(check: Callable[[], Any], timeout: float, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            value = check()
            if value:
                return value
        time.sleep(every)
    raise TimeoutError(f"not within {timeout}s")


def env_for(redis_port: int, zk_port: int, **extra: str) -> dict[str, str]:
    tag = uuid.uuid4().hex[:8]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNCWORKER_", "CELERY_"))}
    env.update({"PYTHONPATH": str(REPO), "SYNCWORKER_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
                "SYNCWORKER_REDIS_PREFIX": f"b{tag}", "SYNCWORKER_ZOOKEEPER": f"127.0.0.1:{zk_port}",
                "SYNCWORKER_ZK_ROOT": f"/bench/{tag}", "SYNCWORKER_ZK_SESSION_TIMEOUT": "4",
                "SYNCWORKER_CONFIG_PROVIDER": "redis", "SYNCWORKER_LOCK_TTL": "6", "SYNCWORKER_LEASE_TTL": "4",
                "SYNCWORKER_ALIVE_TTL": "3", "SYNCWORKER_RELOAD_INTERVAL": "0.5", "SYNCWORKER_LOG_LEVEL": "INFO",
                "SYNCWORKER_QUEUE_TIMEOUT": "60", **extra})
    return env


class Bench:
    def __init__(self, args: argparse.Namespace, root: Path, polaris: sandbox_base.Running, redis: Restartable,
                 zk: Restartable) -> None:
        self.args = args
        self.root = root
        self.polaris_ep = common.endpoint("pol-src", "polaris", polaris)
        self.redis = redis
        self.zk = zk
        self.src = f"bench-src-{uuid.uuid4().hex[:6]}"
        self.seeded = False

    def procs(self, name: str) -> Procs:
        logdir = self.root / name
        logdir.mkdir()
        return Procs(env_for(self.redis.port, self.zk.port), logdir)

    def task(self, dst: str, services: str = "*") -> dict[str, Any]:
        return {"tasks": [{"name": "bench", "source": self.polaris_ep,
                           "destination": {**self.polaris_ep, "name": "pol-dst"},
                           "match": [{"namespace": self.src, "service": services, "dest_namespace": dst}]}],
                "methods": [{"type": "watch"}, {"type": "pull", "interval": "300s"}]}

    def seed(self) -> None:
        if self.seeded:
            return
        recs = {model.ServiceKey(self.src, "", f"svc-{s:04d}"): [
            model.Instance(f"127.2.{s // 250}.{s % 250 + 1}", 30000 + i) for i in range(self.args.instances)]
            for s in range(self.args.services)}
        asyncio.run(self._write(recs))
        self.seeded = True

    async def _write(self, recs: dict[model.ServiceKey, list[model.Instance]]) -> None:
        conn = common.connector(self.polaris_ep)
        await conn.open()
        try:
            await common.write_all(conn, recs)
        finally:
            await conn.close()

    def listing(self, ns: str, svc: str) -> list[model.Address]:
        async def go() -> list[model.Address]:
            conn = common.connector(self.polaris_ep)
            await conn.open()
            try:
                return sorted(i.address for i in (await conn.list_instances(model.ServiceKey(ns, "", svc))).instances)
            finally:
                await conn.close()

        return asyncio.run(go())

    def change_and_wait(self, dst: str, timeout: float = 120) -> float:
        """Register one more instance of svc-0000 at the source; seconds until the copy exists."""
        extra = (f"127.3.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250 + 1}", 31000)

        async def add() -> None:
            conn = common.connector(self.polaris_ep)
            await conn.open()
            try:
                await common.write_all(conn, {model.ServiceKey(self.src, "", "svc-0000"): [model.Instance(*extra)]})
            finally:
                await conn.close()

        t0 = time.monotonic()
        asyncio.run(add())
        wait(lambda: extra in self.listing(dst, "svc-0000"), timeout, every=0.2)
        return round(time.monotonic() - t0, 2)

    def converged(self, p: Procs) -> bool:
        rows = p.store.status_rows()
        return len(rows) == self.args.services and all(
            r["outcome"] == "ok" and r["in_sync"] >= self.args.instances for r in rows)

    # ---- scenarios -------------------------------------------------------------------------
    def failover(self) -> dict[str, Any]:
        p = self.procs("failover")
        try:
            names = [f"scheduler-{i}" for i in range(3)]
            for n in names:
                p.start(n, "scheduler")
            times = []
            for k in range(self.args.kills):
                leader = wait(lambda: next((n for n in names if p.identity(n) == p.store.leader()), None), 30)
                t0 = time.monotonic()
                p.kill(leader)
                wait(lambda leader=leader: (lead := p.store.leader()) and lead != p.identity(leader)
                     and any(p.identity(n) == lead for n in names if p.procs[n].poll() is None), 30, 0.02)
                times.append(round(time.monotonic() - t0, 2))
                names.remove(leader)
                names.append(f"scheduler-{3 + k}")
                p.start(names[-1], "scheduler")
            return {"kills": len(times), "failover_s": times, "median_s": statistics.median(times),
                    "max_s": max(times)}
        finally:
            p.stop_all()
            p.store.flush()

    def scale(self, workers: int) -> dict[str, Any]:
        self.seed()
        p = self.procs(f"scale-{workers}")
        dst = f"bench-dst-{uuid.uuid4().hex[:6]}"
        try:
            p.start("scheduler", "scheduler")
            for i in range(workers):
                p.start(f"worker-{i}", "worker", "--concurrency", "8", "-n", f"w{i}@%h")
            wait(lambda: len([m for m in p.store.members().values() if m.get("role") == "worker"]) == workers
                 and p.store.leader(), 60)
            t0 = time.monotonic()
            p.push(self.task(dst))
            wait(lambda: self.converged(p), 900, every=0.5)
            took = time.monotonic() - t0
            runs = p.store.runs()
            first = min(r["start"] for r in runs)
            return {"workers": workers, "services": self.args.services, "instances": self.args.instances,
                    "sync_s": round(took, 2), "instances_per_s": round(self.args.services * self.args.instances / took),
                    "reconcile_runs": len(runs),
                    "run_s_median": round(statistics.median(r["end"] - r["start"] for r in runs), 3),
                    "runs_span_s": round(max(r["end"] for r in runs) - first, 2),
                    "runs_per_worker": dict(collections.Counter(r["worker"] for r in runs))}
        finally:
            p.stop_all()
            p.store.flush()

    def _running_cluster(self, name: str, schedulers: int = 1) -> tuple[Procs, str]:
        self.seed()
        p = self.procs(f"chaos-{name}")
        dst = f"bench-{name}-{uuid.uuid4().hex[:6]}"
        for i in range(schedulers):
            p.start(f"scheduler-{i}", "scheduler")
        for i in range(2):
            p.start(f"worker-{i}", "worker", "--concurrency", "8", "-n", f"w{i}@%h")
        wait(lambda: p.store.leader(), 60)
        p.push(self.task(dst, "svc-0000"))
        wait(lambda: len(self.listing(dst, "svc-0000")) >= self.args.instances, 120, every=0.5)
        wait(lambda: p.store.lease("watch:bench"), 60)
        return p, dst

    def redis_restart(self) -> dict[str, Any]:
        p, dst = self._running_cluster("redis")
        try:
            self.redis.kill()
            time.sleep(2)
            t0 = time.monotonic()
            self.redis.start()
            restarted = round(time.monotonic() - t0, 2)
            republished = wait(lambda: p.store.applied_version() > 0, 60)
            config_back = round(time.monotonic() - t0, 2)
            # a Celery worker with jobs in flight exits on a lost broker (Celery/kombu 5.7: "Unrecoverable
            # error"); `syncworker worker` starts it again itself, nothing here restarts any process
            change = self.change_and_wait(dst)
            return {"redis_start_s": restarted, "config_republished_after_s": config_back if republished else None,
                    "change_synced_after_restart_s": change, "processes_exited": p.exited(),
                    "celery_workers_restarted_by_syncworker_worker": p.celery_restarts()}
        finally:
            p.stop_all()
            with contextlib.suppress(Exception):
                p.store.flush()

    def zk_restart(self) -> dict[str, Any]:
        p, dst = self._running_cluster("zk", schedulers=2)
        try:
            t0 = time.monotonic()
            self.zk.kill()
            wait(lambda: not any(m.get("leading") for m in p.store.members().values()
                                 if m.get("role") == "scheduler"), 30, 0.05)
            no_leader = round(time.monotonic() - t0, 2)
            time.sleep(3)
            t1 = time.monotonic()
            self.zk.start()
            wait(lambda: any(m.get("leading") for m in p.store.members().values() if m.get("role") == "scheduler"),
                 60, 0.05)
            leads_again = round(time.monotonic() - t1, 2)
            change = self.change_and_wait(dst)
            return {"leadership_dropped_after_kill_s": no_leader, "leader_again_after_restart_s": leads_again,
                    "change_synced_after_restart_s": change}
        finally:
            p.stop_all()
            p.store.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--services", type=int, default=100)
    ap.add_argument("--instances", type=int, default=5)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--only", default="failover,scale,redis,zk")
    args = ap.parse_args()
    only = set(args.only.split(","))
    pool, peers = common.start_peers(["polaris"])
    alloc = ports.PortAllocator()
    root = Path(tempfile.mkdtemp(prefix="cluster-bench-"))
    redis = Restartable("redis", alloc.one(), root)
    zk = Restartable("zookeeper", alloc.one(), root)
    result: dict[str, Any] = {"benchmark": "cluster_failover", "date": datetime.date.today().isoformat(),
                              "machine": platform.platform(), "cpus": os.cpu_count(), "logs": str(root)}
    try:
        redis.start()
        zk.start()
        bench = Bench(args, root, peers["polaris"], redis, zk)
        if "failover" in only:
            result["leader_failover"] = bench.failover()
            print(json.dumps(result["leader_failover"]), flush=True)
        if "scale" in only:
            result["scale"] = [bench.scale(int(n)) for n in args.workers.split(",")]
            print(json.dumps(result["scale"]), flush=True)
        if "redis" in only:
            result["redis_restart"] = bench.redis_restart()
            print(json.dumps(result["redis_restart"]), flush=True)
        if "zk" in only:
            result["zk_restart"] = bench.zk_restart()
            print(json.dumps(result["zk_restart"]), flush=True)
    finally:
        redis.kill()
        zk.kill()
        pool.stop_all()
        alloc.release_all()
    common.report(result)


if __name__ == "__main__":
    common.exit_on_sigterm()
    main()
