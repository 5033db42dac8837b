"""Benchmark 2: watch propagation latency, Nacos -> Polaris and Polaris -> Nacos.

    python -m benchmarks.watch_latency [--changes 200] [--services 20]

Starts real Nacos and Polaris, runs `syncworker run` (a child process) with the
two-way tasks of conf/sync-registry.json limited to S services, pull every 600 s
(so only the watch can carry a change in time). Then, alternately on each side,
it makes single-instance changes (a new native instance, or a weight change of
one) and polls the other side every 10 ms until the copy shows the change. The
latency is the time from the write returning to the copy being readable.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import random
import tempfile
import time
from pathlib import Path

from benchmarks import common
from syncworker import marks, model
from syncworker.connectors import base
from syncworker.reconcile import planner


async def wait_copy(conn: base.Connector, svc: model.ServiceKey, inst: model.Instance, timeout: float = 30.0
                    ) -> float | None:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        listing = await conn.list_instances(svc)
        for got in listing.instances:
            if got.address == inst.address and abs(got.weight - inst.weight) < 0.011:
                return time.perf_counter()
        await asyncio.sleep(0.01)
    return None


async def one_change(src: base.Connector, dst: base.Connector, svc: model.ServiceKey, k: int,
                     natives: dict[tuple[str, model.ServiceKey], model.Instance]) -> float | None:
    key = (src.name, svc)
    old = natives.get(key)
    if old is None or random.random() < 0.5:
        inst = model.Instance(host=f"127.2.{k // 250}.{k % 250 + 1}", port=30000 + k, weight=1.0,
                              metadata={"bench": "latency"})
        p = planner.Plan(creates=(src.representable(inst),))
    else:
        inst = old.replace(weight=round(random.choice([0.5, 2.0, 3.0, 1.5]), 2))
        p = planner.Plan(updates=(planner.Update(old=old, new=src.representable(inst)),))
    outcomes = await src.apply(svc, p, base.ApplyContext(task="bench-native"))
    assert all(o.ok for o in outcomes), outcomes
    t0 = time.perf_counter()
    t1 = await wait_copy(dst, svc, src.representable(inst))
    # remember the native as the source stores it (with its id) for a later update; a
    # registry may show a write only after a short delay, so wait for it here, untimed
    for _ in range(300):
        found = [i for i in (await src.list_instances(svc)).instances if i.address == inst.address]
        if found and abs(found[0].weight - inst.weight) < 0.011:
            natives[key] = found[0]
            break
        await asyncio.sleep(0.05)
    return None if t1 is None else t1 - t0


async def main(changes: int, services: int) -> dict[str, object]:
    pool, peers = common.start_peers(["nacos", "polaris"])
    try:
        nacos_ep = common.endpoint("nacos1", "nacos", peers["nacos"])
        polaris_ep = common.endpoint("polaris1", "polaris", peers["polaris"])
        nacos, polaris = common.native_writer(nacos_ep), common.connector(polaris_ep)
        await nacos.open()
        await polaris.open()
        names = [f"lat-{i:03d}" for i in range(services)]
        # every service exists on both sides with one native, so both watches have something to watch
        for i, n in enumerate(names):
            svc = model.ServiceKey("", "", n)
            for conn, octet in ((nacos, 3), (polaris, 4)):
                seed = conn.representable(model.Instance(host=f"127.{octet}.0.{i + 1}", port=8000))
                await conn.apply(svc, planner.Plan(creates=(seed,)), base.ApplyContext(task="bench-native"))
        match = [{"namespace": "", "service": n} for n in names]
        config = {
            "tasks": [
                {"name": "nacos-to-polaris", "source": nacos_ep, "destination": polaris_ep, "match": match},
                {"name": "polaris-to-nacos", "source": polaris_ep, "destination": nacos_ep, "match": match},
            ],
            "methods": [{"type": "watch", "enable": True}, {"type": "pull", "enable": True, "interval": "600s"}],
        }
        results: dict[str, list[float]] = {"nacos_to_polaris": [], "polaris_to_nacos": []}
        missed = {"nacos_to_polaris": 0, "polaris_to_nacos": 0}
        with tempfile.TemporaryDirectory() as tmp:
            child = common.ChildRun(config, Path(tmp), pool.alloc.one())
            try:
                # wait for the first full convergence
                deadline = time.perf_counter() + 120
                while time.perf_counter() < deadline:
                    rows = child.status() or []
                    if len(rows) == 2 * services and all(r["outcome"] == "ok" for r in rows):
                        break
                    await asyncio.sleep(0.2)
                natives: dict[tuple[str, model.ServiceKey], model.Instance] = {}
                for k in range(changes):
                    svc = model.ServiceKey("", "", names[k % services])
                    direction = "nacos_to_polaris" if k % 2 == 0 else "polaris_to_nacos"
                    src, dst = (nacos, polaris) if direction == "nacos_to_polaris" else (polaris, nacos)
                    lat = await one_change(src, dst, svc, k, natives)
                    if lat is None:
                        missed[direction] += 1
                    else:
                        results[direction].append(lat)
            finally:
                child.stop()
        # no copy of a copy anywhere
        loops = 0
        for n in names:
            for conn in (nacos, polaris):
                for inst in (await conn.list_instances(model.ServiceKey("", "", n))).instances:
                    origin = marks.origin(inst.metadata)
                    loops += origin == conn.name
        await nacos.close()
        await polaris.close()
    finally:
        pool.stop_all()
    summary: dict[str, object] = {"benchmark": "watch_latency", "date": time.strftime("%Y-%m-%d"),
                                  "machine": platform.platform(), "changes": changes, "services": services,
                                  "missed": missed, "copies_gone_home": loops}
    for d, vals in results.items():
        if vals:
            summary[d] = {"n": len(vals), "p50_ms": round(common.percentile(vals, 50) * 1000),
                          "p99_ms": round(common.percentile(vals, 99) * 1000),
                          "max_ms": round(max(vals) * 1000)}
    return summary


if __name__ == "__main__":
    common.exit_on_sigterm()
    ap = argparse.ArgumentParser()
    ap.add_argument("--changes", type=int, default=200)
    ap.add_argument("--services", type=int, default=20)
    args = ap.parse_args()
    result = asyncio.run(main(args.changes, args.services))
    common.report(result)
