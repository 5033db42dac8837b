"""The scheduler's status endpoint: the embedded `/status`, `/metrics`, `/healthz`, served from the store.

Any scheduler serves it, leader or standby, since everything comes from Redis.
`/metrics` adds the cluster's own gauges to the per-unit ones (the leader's
identity as a label, live workers, held duties, queued and running units), and
`/cluster` answers the same facts as JSON (what `syncworker status` prints), with
each worker's share of the work: reconciles run, their share of all runs, and
distinct units run, from the finished-runs stream (gone workers included).
"""

from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from syncworker.cluster import store as store_mod
from syncworker.runtime import status_http


def work_shares(st: store_mod.Store, alive: Iterable[str] = ()) -> dict[str, dict[str, object]]:
    """Per worker, from the finished-runs stream (the last `RUNS_KEPT` runs): reconciles run, the share of all
    runs (%), distinct units run, and whether the worker is alive now; gone workers included."""
    runs: collections.Counter[str] = collections.Counter()
    units: dict[str, set[str]] = collections.defaultdict(set)
    for run in st.runs():
        runs[run["worker"]] += 1
        units[run["worker"]].add(run["unit"])
    total = sum(runs.values())
    live = set(alive)
    return {w: {"runs": n, "share": round(100.0 * n / total, 1), "units": len(units[w]), "alive": w in live}
            for w, n in sorted(runs.items())}


def cluster_info(st: store_mod.Store, work: bool = True) -> dict[str, object]:
    """The cluster's facts; with `work`, each worker's runs and units too (reads the runs stream)."""
    members = st.members()
    workers = {k: v for k, v in sorted(members.items()) if v.get("role") == "worker"}
    info: dict[str, object] = {
        "leader": st.leader() or "",
        "applied_version": st.applied_version(),
        "pushed_version": st.pushed_version(),
        "workers": workers,
        "schedulers": {k: v for k, v in sorted(members.items()) if v.get("role") == "scheduler"},
        "duties": dict(sorted(st.leases().items())),
        "queued": len(st.queued()),
        "running": len(st.running()),
    }
    if work:
        shares = work_shares(st, workers)
        info["work"] = shares
        for ident, about in workers.items():  # `syncworker status` shows these in each worker's row
            mine = shares.get(ident, {"runs": 0, "share": 0.0, "units": 0})
            about.update(runs=mine["runs"], units=mine["units"], share=f"{mine['share']}%")
    return info


def cluster_metrics(info: dict[str, object], leading: bool) -> bytes:
    reg = CollectorRegistry()
    Gauge("syncworker_leader_info", "the scheduler that leads (by identity host:pid)", ["identity"],
          registry=reg).labels(str(info["leader"])).set(1 if info["leader"] else 0)
    Gauge("syncworker_is_leader", "1 when this scheduler leads", registry=reg).set(1 if leading else 0)
    Gauge("syncworker_cluster_workers", "live workers", registry=reg).set(len(info["workers"]))  # type: ignore[arg-type]
    Gauge("syncworker_cluster_schedulers", "live schedulers", registry=reg).set(
        len(info["schedulers"]))  # type: ignore[arg-type]
    held = Gauge("syncworker_duty_held", "a watch or heartbeat duty and the worker holding it",
                 ["duty", "owner"], registry=reg)
    for duty, lease in info["duties"].items():  # type: ignore[attr-defined]
        held.labels(duty, str(lease.get("owner", ""))).set(1)
    Gauge("syncworker_units_queued", "units dispatched and not started", registry=reg).set(
        float(info["queued"]))  # type: ignore[arg-type]
    Gauge("syncworker_units_running", "units being reconciled now", registry=reg).set(
        float(info["running"]))  # type: ignore[arg-type]
    version = Gauge("syncworker_config_version", "version of the config pushed to Redis and applied by the leader",
                    ["kind"], registry=reg)
    version.labels("applied").set(float(info["applied_version"]))  # type: ignore[arg-type]
    version.labels("pushed").set(float(info["pushed_version"]))  # type: ignore[arg-type]
    return generate_latest(reg)


class ClusterStatusServer(status_http.StatusServer):
    """`StatusServer` over the store; `/metrics` and `/cluster` carry the cluster's own facts too."""

    def __init__(self, st: store_mod.Store, leading: Callable[[], bool], host: str = "127.0.0.1",
                 port: int = 0) -> None:
        super().__init__(st.status_rows, host=host, port=port)
        self.store = st
        self.leading = leading

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            path = request.split(b" ", 2)[1].decode(errors="replace").split("?")[0]
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, IndexError, ConnectionError):
            writer.close()
            return
        if path not in ("/metrics", "/cluster"):
            replay = asyncio.StreamReader()
            replay.feed_data(request)
            replay.feed_eof()
            await super()._handle(replay, writer)
            return
        try:
            info = cluster_info(self.store, work=path == "/cluster")
            if path == "/cluster":
                ctype, body = "application/json", json.dumps(info, default=str).encode()
            else:
                ctype = CONTENT_TYPE_LATEST
                body = status_http.metrics_text(self.snapshot()) + cluster_metrics(info, self.leading())
            writer.write(f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
