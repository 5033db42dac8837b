"""Benchmark 1 and 3: initial full sync Nacos -> Polaris, against the raw write limit.

    python -m benchmarks.full_sync [--services 1000] [--instances 10] [--repeat 3]

1. Starts a real Nacos from the sandbox and registers S services x N native
   instances in it.
2. The limit: writes the same records (as copies, marks included) straight into
   a second, empty Polaris through the same connector and the same OpenAPI, with
   no engine (no reads, no planning), 16 services at a time (the engine's default
   concurrency). Each measurement gets an empty Polaris, since Polaris's writes and
   reads slow down as its store grows.
3. The engine: `syncworker run` in a child process syncs namespace public `*`
   into Polaris namespace `bench-engine` of another empty Polaris; the wall time runs from the spawn of
   the child to the first /status poll (every 0.5 s) that shows every unit converged.
4. CPU seconds and peak RSS of that child during the sync (and, in the last run,
   at rest for 30 s afterwards).
Steps 2 and 3 run `--repeat` times, alternating, each into a Polaris started empty for it:
the raw write alone varies by a third between runs on a shared 2-core machine, so the
summary gives every pair and the median of their ratios. Prints a JSON line per pair and
a JSON summary (appended to benchmarks/results.jsonl).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common
from syncworker import marks, model
from syncworker.sandbox import harness


def records(services: int, instances: int, prefix: str) -> dict[model.ServiceKey, list[model.Instance]]:
    out = {}
    for i in range(services):
        svc = model.ServiceKey("", "", f"{prefix}-{i:04d}")
        out[svc] = [model.Instance(host=f"127.1.{i // 250}.{i % 250 + 1}", port=20000 + j, weight=1.0,
                                   metadata={"version": "1.0.0", "idx": str(j)}) for j in range(instances)]
    return out


def as_copies(recs: dict[model.ServiceKey, list[model.Instance]], ns: str, task: str, origin: str, conn
              ) -> dict[model.ServiceKey, list[model.Instance]]:  # type: ignore[no-untyped-def]
    return {model.ServiceKey(ns, s.group, s.name): [conn.representable(marks.stamp(i, task, origin)) for i in insts]
            for s, insts in recs.items()}


async def main(services: int, instances: int, rest: float, repeat: int) -> dict[str, object]:
    load_at_start = os.getloadavg()[0]
    pool, peers = common.start_peers(["nacos"])
    try:
        nacos_ep = common.endpoint("nacos1", "nacos", peers["nacos"])
        nacos = common.native_writer(nacos_ep)
        await nacos.open()
        recs = records(services, instances, "bench")
        seed = await common.write_all(nacos, recs)
        await nacos.close()
        runs = []
        for rep in range(repeat):
            # the last run also measures the engine at rest afterwards
            runs.append(await one_pair(pool, nacos_ep, recs, services, instances, rest if rep == repeat - 1 else 0.0))
            print(json.dumps({"run": rep + 1, **runs[-1]}), flush=True)
    finally:
        pool.stop_all()
    ratios = [r["ratio_engine_to_raw"] for r in runs if r["ratio_engine_to_raw"] is not None]
    last = runs[-1]
    return {
        "benchmark": "full_sync", "date": time.strftime("%Y-%m-%d"), "machine": platform.platform(),
        "cpus": os.cpu_count(), "load_average_at_start": load_at_start, "services": services,
        "instances_per_service": instances, "seed_nacos_s": round(seed, 2), "repeat": repeat,
        "ratio_engine_to_raw_median": statistics.median(ratios) if len(ratios) == repeat else None,
        "ratios": [r["ratio_engine_to_raw"] for r in runs],
        "raw_polaris_write_s": [r["raw_polaris_write_s"] for r in runs],
        "engine_full_sync_s": [r["engine_full_sync_s"] for r in runs],
        "engine_cpu_s_during_sync": [r["engine_cpu_s_during_sync"] for r in runs],
        "engine_peak_rss_mb": max(r["engine_peak_rss_mb"] for r in runs),
        "engine_cpu_s_at_rest": last["engine_cpu_s_at_rest"], "rest_window_s": rest,
        "engine_rss_at_rest_mb": last["engine_rss_at_rest_mb"],
        "synced": [r["synced"] for r in runs], "sample_counts": [r["sample_counts"] for r in runs],
        "engine_warnings": sum(r["engine_warnings"] for r in runs),
        "first_warning": next((r["first_warning"] for r in runs if r["first_warning"]), ""),
    }


async def one_pair(pool: harness.PeerPool, nacos_ep: dict[str, Any], recs: dict[model.ServiceKey, list[model.Instance]],
                   services: int, instances: int, rest: float) -> dict[str, Any]:
    """One raw write and one engine sync, each into an empty Polaris of its own.

    Polaris slows down as its store grows, so neither measurement may write into a store the
    other (or an earlier run) filled.
    """
    raw_peer = pool.fresh("polaris")
    try:
        raw_conn = common.connector(common.endpoint("polaris-raw", "polaris", raw_peer))
        await raw_conn.open()
        raw = await common.write_all(raw_conn, as_copies(recs, "bench-raw", "bench-raw", "nacos1", raw_conn))
        await raw_conn.close()
    finally:
        raw_peer.stop()
    engine_peer = pool.fresh("polaris")
    try:
        polaris_ep = common.endpoint("polaris1", "polaris", engine_peer)
        config = {
            "tasks": [{"name": "bench-nacos-to-polaris", "source": nacos_ep, "destination": polaris_ep,
                       "match": [{"namespace": "", "service": "*", "dest_namespace": "bench-engine"}]}],
            "methods": [{"type": "watch", "enable": True}, {"type": "pull", "enable": True, "interval": "600s"}],
        }
        cpu_rest, mem_rest = 0.0, {}
        with tempfile.TemporaryDirectory(prefix="bench-full-") as tmp:
            child = common.ChildRun(config, Path(tmp), pool.alloc.one())
            want = services * instances
            synced = 0
            wall = None
            deadline = time.perf_counter() + 1800
            try:
                while time.perf_counter() < deadline:
                    rows = child.status() or []
                    bench_rows = [r for r in rows if str(r["service"]).split("/")[-1].startswith("bench-")]
                    synced = sum(int(r["in_sync"]) for r in bench_rows)
                    if synced >= want and all(r["outcome"] == "ok" for r in bench_rows):
                        wall = time.perf_counter() - child.started
                        break
                    # every 0.5 s: each poll makes the engine render (and this process parse) a status row
                    # per unit, which at 10 Hz took a sizeable share of the 2 cores the peers need; the
                    # coarser grain can only add to the engine's time (up to 0.5 s), never take from it
                    await asyncio.sleep(0.5)
                cpu_sync = child.cpu_seconds()
                mem_sync = child.memory()
                if rest:
                    await asyncio.sleep(rest)
                    cpu_rest = child.cpu_seconds() - cpu_sync
                    mem_rest = child.memory()
            finally:
                child.stop()
                warnings = [ln for ln in (Path(tmp) / "syncworker.log").read_text().splitlines() if "WARNING" in ln]
        # the copies really are at the destination
        polaris = common.connector(polaris_ep)
        await polaris.open()
        sample = [model.ServiceKey("bench-engine", "", f"bench-{i:04d}") for i in (0, services // 2, services - 1)]
        counts = [len((await polaris.list_instances(s)).instances) for s in sample]
        await polaris.close()
    finally:
        engine_peer.stop()
    return {
        "raw_polaris_write_s": round(raw, 2), "engine_full_sync_s": round(wall, 2) if wall else None,
        "synced": synced, "ratio_engine_to_raw": round(wall / raw, 2) if wall else None,
        "engine_cpu_s_during_sync": round(cpu_sync, 2), "engine_peak_rss_mb": round(mem_sync.get("VmHWM", 0), 1),
        "engine_cpu_s_at_rest": round(cpu_rest, 2) if rest else None,
        "engine_rss_at_rest_mb": round(mem_rest.get("VmRSS", 0), 1) if rest else None, "sample_counts": counts,
        "engine_warnings": len(warnings), "first_warning": warnings[0][:300] if warnings else "",
    }


if __name__ == "__main__":
    common.exit_on_sigterm()
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--instances", type=int, default=10)
    ap.add_argument("--rest", type=float, default=30.0)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    result = asyncio.run(main(args.services, args.instances, args.rest, args.repeat))
    common.report(result)
