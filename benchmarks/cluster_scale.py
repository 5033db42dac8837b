"""Cluster mode at scale: the initial full sync Nacos -> Polaris through 1, 2 and 4 workers.

    python -m benchmarks.cluster_scale [--services 1000] [--instances 10] [--workers 1,2,4] [--concurrency 8]

The same shape as `benchmarks.full_sync` (the embedded engine's benchmark): S
services x N native instances registered in Nacos (namespace public), one task
syncing `public/*` into the Polaris namespace `bench-engine`, watch and a 600 s
pull. Nacos, Redis and ZooKeeper are started once; every worker count gets an
empty Polaris of its own (Polaris slows down as its store fills, so a run must not
write into a store an earlier run filled) and a cluster of its own: one
scheduler and W `syncworker worker` processes (`--concurrency`, 8 by default).

Timed from `syncworker config push` until the store shows every unit in sync
(`sync_s`, polled every 0.5 s, every 1 s above 200 services; `last_run_end_s` is the end of the last reconcile
that converged, from the runs stream). Per worker: reconciles run, their share of
all runs, and distinct units run (as `syncworker status` shows them). Prints a
JSON summary and appends it to benchmarks/results.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.full_sync import records
from scheduler import status as status_mod
from syncworker import model
from syncworker.cluster import store as store_mod
from syncworker.sandbox import base as sandbox_base

REPO = Path(__file__).resolve().parents[1]


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


class Cluster:
    """One scheduler and W workers with a prefix of their own; every process is killed at the end."""

    def __init__(self, redis_url: str, zookeeper: str, logdir: Path) -> None:
        tag = uuid.uuid4().hex[:8]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNCWORKER_", "CELERY_"))}
        self.env.update({"PYTHONPATH": str(REPO), "SYNCWORKER_REDIS_URL": redis_url,
                         "SYNCWORKER_REDIS_PREFIX": f"bs{tag}", "SYNCWORKER_ZOOKEEPER": zookeeper,
                         "SYNCWORKER_ZK_ROOT": f"/bench-scale/{tag}", "SYNCWORKER_CONFIG_PROVIDER": "redis",
                         "SYNCWORKER_RELOAD_INTERVAL": "0.5", "SYNCWORKER_LOG_LEVEL": "WARNING"})
        self.logdir = logdir
        logdir.mkdir(parents=True)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.store = store_mod.Store.from_url(redis_url, self.env["SYNCWORKER_REDIS_PREFIX"])

    def start(self, name: str, *args: str) -> None:
        with (self.logdir / f"{name}.log").open("ab") as fh:
            self.procs.append(subprocess.Popen([sys.executable, "-m", "syncworker.cli", *args], cwd=REPO,
                                               env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, start_new_session=True))

    def push(self, config: dict[str, Any]) -> None:
        path = self.logdir / "config.json"
        path.write_text(json.dumps(config))
        out = subprocess.run([sys.executable, "-m", "syncworker.cli", "config", "push", str(path)], cwd=REPO,
                             env=self.env, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(out.stderr)

    def name_of(self, identity: str) -> str:
        """worker-i for the Celery worker that the i-th `syncworker worker` supervises (else its identity)."""
        info = self.store.members().get(identity, {})
        names = {p.pid: f"worker-{i}" for i, p in enumerate(self.procs[1:])}
        return names.get(info.get("supervisor"), identity)  # type: ignore[arg-type]

    def workers(self) -> set[str]:
        return {k for k, v in self.store.members().items() if v.get("role") == "worker"}

    def stop(self) -> None:
        for proc in self.procs:
            sandbox_base.stop_group(proc.pid, 15.0)
            proc.wait(5)
        self.store.flush()


def wait(check: Any, timeout: float, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"not within {timeout:.0f}s")


def run_once(args: argparse.Namespace, workers: int, nacos_ep: dict[str, Any], redis_url: str, zookeeper: str,
             pool: Any, root: Path) -> dict[str, Any]:
    polaris = pool.fresh("polaris")
    polaris_ep = common.endpoint("polaris1", "polaris", polaris)
    cluster = Cluster(redis_url, zookeeper, root / f"workers-{workers}")
    try:
        cluster.start("scheduler", "scheduler")
        for i in range(workers):
            cluster.start(f"worker-{i}", "worker", "--concurrency", str(args.concurrency), "-n", f"bench{i}@%h")
        wait(lambda: len(cluster.workers()) == workers and cluster.store.leader(), 120)
        config = {"tasks": [{"name": "bench-nacos-to-polaris", "source": nacos_ep, "destination": polaris_ep,
                             "match": [{"namespace": "", "service": "*", "dest_namespace": "bench-engine"}]}],
                  "methods": [{"type": "watch"}, {"type": "pull", "interval": "600s"}]}
        load_before = load()
        pushed_at = time.time()
        t0 = time.monotonic()
        cluster.push(config)

        def converged() -> bool:
            rows = [r for r in cluster.store.status_rows() if str(r["service"]).split("/")[-1].startswith("bench-")]
            return len(rows) == args.services and all(
                r["outcome"] == "ok" and int(r["in_sync"]) >= args.instances for r in rows)

        wait(converged, args.timeout, every=0.5 if args.services <= 200 else 1.0)
        took = time.monotonic() - t0
        alive = cluster.workers()
        runs = cluster.store.runs()
        shares = status_mod.work_shares(cluster.store, alive)
        ok_ends = [r["end"] for r in runs if r["outcome"] == "ok"]

        async def sample() -> list[int]:
            conn = common.connector(polaris_ep)
            await conn.open()
            try:
                keys = [model.ServiceKey("bench-engine", "", f"bench-{i:04d}")
                        for i in (0, args.services // 2, args.services - 1)]
                return [len((await conn.list_instances(k)).instances) for k in keys]
            finally:
                await conn.close()

        return {"workers": workers, "concurrency": args.concurrency, "sync_s": round(took, 2),
                "last_run_end_s": round(max(ok_ends) - pushed_at, 2) if ok_ends else None,
                "instances_per_s": round(args.services * args.instances / took, 1),
                "reconcile_runs": len(runs),
                "run_s_median": round(statistics.median(r["end"] - r["start"] for r in runs), 3),
                "per_worker": {cluster.name_of(ident): v for ident, v in shares.items()},
                "sample_counts": asyncio.run(sample()), "load_before": load_before, "load_after": load()}
    finally:
        cluster.stop()
        polaris.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--instances", type=int, default=10)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args()
    pool, peers = common.start_peers(["nacos", "redis", "zookeeper"])
    root = Path(tempfile.mkdtemp(prefix="cluster-scale-"))
    result: dict[str, Any] = {"benchmark": "cluster_scale", "date": datetime.date.today().isoformat(),
                              "machine": platform.platform(), "cpus": os.cpu_count(), "services": args.services,
                              "instances_per_service": args.instances, "logs": str(root)}
    try:
        nacos_ep = common.endpoint("nacos1", "nacos", peers["nacos"])

        async def seed() -> float:
            nacos = common.native_writer(nacos_ep)
            await nacos.open()
            try:
                return await common.write_all(nacos, records(args.services, args.instances, "bench"))
            finally:
                await nacos.close()

        result["seed_nacos_s"] = round(asyncio.run(seed()), 2)
        print(json.dumps({"seeded": args.services * args.instances, "s": result["seed_nacos_s"]}), flush=True)
        result["runs"] = []
        for n in (int(w) for w in args.workers.split(",")):
            one = run_once(args, n, nacos_ep, peers["redis"].endpoints["redis"],
                           peers["zookeeper"].endpoints["zookeeper"], pool, root)
            print(json.dumps(one), flush=True)
            result["runs"].append(one)
    finally:
        pool.stop_all()
    common.report(result)


if __name__ == "__main__":
    common.exit_on_sigterm()
    main()
