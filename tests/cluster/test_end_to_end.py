"""Cluster mode end to end: a scheduler and three worker processes sync a real Polaris into itself.

The task copies every service of one namespace into another (`dest_namespace`),
so one Polaris is both source and destination. The tests share one cluster and
run in order: initial sync with one of three workers killed (SIGKILL) mid-sync
(exactly the expected instances at the end, and each worker's share of the
units printed), a change carried by the watch duty (pull is 5 minutes away), the
watch duty's holder killed (another worker holds it within the lease TTL plus
the leader's sweep period, and changes flow again), config pushes (applied
within 5 s; a bad one refused with the old one kept; a removed task cleaned up),
and the status surfaces.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import re
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scheduler import leader as leader_mod
from syncworker import marks, model
from syncworker.connectors import base, registry
from syncworker.reconcile import planner
from syncworker.sandbox import base as sandbox

from .conftest import Cluster, cluster_env, running_cluster, wait_for

pytestmark = pytest.mark.peers

TAG = uuid.uuid4().hex[:6]
SRC, DST = f"cl-src-{TAG}", f"cl-dst-{TAG}"
SRC2, DST2 = f"cl-src2-{TAG}", f"cl-dst2-{TAG}"
SERVICES = 30
PER_SERVICE = 4
#: writes per second for the whole cluster: the initial sync takes a few seconds, time to kill a worker
RATE = 30
WORKERS = ("worker-a", "worker-b", "worker-c")
#: SYNCWORKER_LEASE_TTL of the test clusters (conftest.cluster_env)
LEASE_TTL = 4.0


def addr(s: int, i: int) -> model.Address:
    return (f"10.{s // 250}.{s % 250}.{i + 1}", 8080)


class Polaris:
    """Direct access to the Polaris under test, as its native applications and an operator use it."""

    def __init__(self, running: sandbox.Running) -> None:
        self.url = running.endpoints["http"]
        self.token = running.credentials.get("token", "")

    def endpoint(self, name: str) -> dict[str, Any]:
        return {"name": name, "type": "polaris", "addresses": [self.url], "token": self.token}

    def _run(self, job: Any) -> Any:
        async def go() -> Any:
            conn = registry.create(base.Endpoint(name="test", type="polaris", addresses=(self.url,),
                                                 token=self.token))
            await conn.open()
            try:
                return await job(conn)
            finally:
                await conn.close()

        return asyncio.run(go())

    def register(self, ns: str, svc: str, *addresses: model.Address) -> None:
        creates = tuple(model.Instance(h, p) for h, p in addresses)

        async def job(conn: base.Connector) -> None:
            out = await conn.apply(model.ServiceKey(ns, "", svc), planner.Plan(creates=creates),
                                   base.ApplyContext(task="natives"))
            assert all(o.ok for o in out), out

        self._run(job)

    def deregister(self, ns: str, svc: str, address: model.Address) -> None:
        async def job(conn: base.Connector) -> None:
            key = model.ServiceKey(ns, "", svc)
            gone = tuple(i for i in (await conn.list_instances(key)).instances if i.address == address)
            out = await conn.apply(key, planner.Plan(deletes=gone), base.ApplyContext(task="natives"))
            assert gone and all(o.ok for o in out), out

        self._run(job)

    def listing(self, ns: str, svc: str) -> list[model.Instance]:
        async def job(conn: base.Connector) -> list[model.Instance]:
            return list((await conn.list_instances(model.ServiceKey(ns, "", svc))).instances)

        result: list[model.Instance] = self._run(job)
        return result

    def addresses(self, ns: str, svc: str) -> list[model.Address]:
        return sorted(i.address for i in self.listing(ns, svc))


def task(name: str, polaris: Polaris, src: str, dst: str, service: str = "*", **extra: Any) -> dict[str, Any]:
    return {"name": name, "source": polaris.endpoint("pol-src"), "destination": polaris.endpoint("pol-dst"),
            "match": [{"namespace": src, "service": service, "dest_namespace": dst}], **extra}


def config(*tasks: dict[str, Any]) -> dict[str, Any]:
    return {"tasks": list(tasks), "methods": [{"type": "watch"}, {"type": "pull", "interval": "300s"}]}


class E2E:
    def __init__(self, cluster: Cluster, polaris: Polaris, tmp: Path) -> None:
        self.cluster = cluster
        self.polaris = polaris
        self.tmp = tmp
        self.expected: dict[str, list[model.Address]] = {
            f"svc-{s}": sorted(addr(s, i) for i in range(PER_SERVICE)) for s in range(SERVICES)}
        self.workers = {name: cluster.worker(name) for name in WORKERS}

    def push(self, cfg: dict[str, Any], name: str) -> Any:
        path = self.tmp / name
        path.write_text(json.dumps(cfg, indent=2))
        return self.cluster.cli("config", "push", str(path))

    def main_task(self) -> dict[str, Any]:
        return task("cl-main", self.polaris, SRC, DST, rate_limit=RATE)

    def converged(self) -> bool:
        return all(self.polaris.addresses(DST, svc) == want for svc, want in self.expected.items())


@pytest.fixture(scope="module")
def e2e(request: pytest.FixtureRequest, peers: Any, redis_url: str, zookeeper: str,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2E]:
    polaris = Polaris(peers.get("polaris"))
    for s in range(SERVICES):
        polaris.register(SRC, f"svc-{s}", *(addr(s, i) for i in range(PER_SERVICE)))
    polaris.register(SRC2, "svc-x", ("10.9.0.1", 9000), ("10.9.0.2", 9000))
    tmp = tmp_path_factory.mktemp("e2e")
    with running_cluster(request, cluster_env(redis_url, zookeeper), tmp) as cluster:
        cluster.scheduler("scheduler", "--status-port", "0")
        env = E2E(cluster, polaris, tmp)
        wait_for(lambda: len(cluster.workers_alive()) == len(WORKERS) and cluster.store.leader(), 60,
                 what="a leader and three live workers")
        yield env


def test_sync_completes_exactly_after_a_worker_is_killed_mid_sync(e2e: E2E) -> None:
    st = e2e.cluster.store
    ids = {name: e2e.cluster.worker_identity(proc) for name, proc in e2e.workers.items()}
    victim = e2e.workers["worker-a"]
    victim_id = ids["worker-a"]
    t0 = time.monotonic()
    pushed = e2e.push(config(e2e.main_task()), "main.json")
    assert pushed.returncode == 0, pushed.stderr
    # kill worker-a (supervisor and Celery worker) in the middle of reconciles: it finished some, holds others
    wait_for(lambda: any(r["worker"] == victim_id for r in st.running().values())
             and any(r["worker"] == victim_id for r in st.runs()), 30,
             every=0.01, what="worker-a to have run a unit and to be reconciling another")
    done_before = len({r["unit"] for r in st.runs() if r["outcome"] == "ok"})
    victim.kill()
    killed_at = time.monotonic() - t0
    assert done_before < SERVICES, "the sync finished before the kill; slow it down (RATE)"
    wait_for(e2e.converged, 90, every=0.5, what="every destination service to hold the expected copies")
    total = time.monotonic() - t0
    print(f"initial sync of {SERVICES * PER_SERVICE} instances with {len(WORKERS)} workers: worker-a killed at "
          f"{killed_at:.1f}s ({done_before} units done), converged at {total:.1f}s")
    # exactly the expected instances, every one a copy owned by the task
    for svc, want in e2e.expected.items():
        listing = e2e.polaris.listing(DST, svc)
        assert sorted(i.address for i in listing) == want, svc
        for inst in listing:
            assert marks.owned_by(inst, "cl-main", "pol-src"), inst
    # a unit never ran on two workers at once
    by_unit: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for run in st.runs():
        by_unit[run["unit"]].append(run)
    for unit, runs in by_unit.items():
        runs.sort(key=lambda r: r["start"])
        for before, after in itertools.pairwise(runs):
            assert after["start"] >= before["end"], (unit, before, after)
    # every one of the three workers took a share of the units (as `syncworker status --json` reports it)
    shown = e2e.cluster.cli("status", "--json")
    assert shown.returncode == 0, shown.stderr
    work = json.loads(shown.stdout)["cluster"]["work"]
    print("share of the initial sync per worker: " + ", ".join(
        f"{name} {work.get(ident, {}).get('units', 0)} units / {work.get(ident, {}).get('runs', 0)} runs "
        f"({work.get(ident, {}).get('share', 0.0)}%)" for name, ident in ids.items()))
    for name, ident in ids.items():
        assert work.get(ident, {}).get("units", 0) >= 1, (name, work)
    assert work[victim_id]["alive"] is False
    assert sum(w["runs"] for w in work.values()) == len(st.runs())
    e2e.workers["worker-d"] = e2e.cluster.worker("worker-d")  # back to three workers
    e2e.cluster.worker_identity(e2e.workers["worker-d"])


def _watch_holder(st: Any) -> str:
    return str(wait_for(lambda: (lease := st.lease("watch:cl-main")) and lease["owner"], 20,
                        what="a worker to hold the watch duty"))


def _change_propagates(e2e: E2E, svc: int, add: model.Address, remove: model.Address, limit: float) -> float:
    t0 = time.monotonic()
    e2e.polaris.register(SRC, f"svc-{svc}", add)
    e2e.polaris.deregister(SRC, f"svc-{svc + 1}", remove)
    e2e.expected[f"svc-{svc}"] = sorted([*e2e.expected[f"svc-{svc}"], add])
    e2e.expected[f"svc-{svc + 1}"] = [a for a in e2e.expected[f"svc-{svc + 1}"] if a != remove]
    wait_for(lambda: e2e.polaris.addresses(DST, f"svc-{svc}") == e2e.expected[f"svc-{svc}"]
             and e2e.polaris.addresses(DST, f"svc-{svc + 1}") == e2e.expected[f"svc-{svc + 1}"], limit * 2,
             every=0.1, what="the change to reach the destination")
    return time.monotonic() - t0


def test_a_change_propagates_through_the_watch_duty(e2e: E2E) -> None:
    holder = _watch_holder(e2e.cluster.store)
    assert holder in e2e.cluster.workers_alive()
    latency = _change_propagates(e2e, 0, ("10.7.7.7", 8080), addr(1, 0), 5.0)
    print(f"watch duty on {holder}: change propagated in {latency:.2f}s")
    assert latency < 5.0


def test_the_watch_duty_moves_when_its_worker_is_killed(e2e: E2E) -> None:
    st = e2e.cluster.store
    holder = _watch_holder(st)
    names = e2e.cluster.worker_identities(e2e.workers)
    victim = e2e.workers[names[holder]]
    t0 = time.monotonic()
    victim.kill()
    limit = LEASE_TTL + leader_mod.SWEEP_EVERY
    second = wait_for(lambda: (lease := st.lease("watch:cl-main")) and lease["owner"] != holder and lease["owner"],
                      limit + 10, every=0.05, what="another worker to hold the watch duty")
    moved = time.monotonic() - t0
    print(f"watch duty moved from {names[holder]} to {names.get(second, second)} {moved:.2f}s after kill -9 "
          f"(limit: lease TTL {LEASE_TTL:.0f}s + sweep period {leader_mod.SWEEP_EVERY:.0f}s)")
    assert moved < limit
    assert second in e2e.cluster.workers_alive()
    latency = _change_propagates(e2e, 2, ("10.7.7.8", 8080), addr(3, 0), 5.0)
    print(f"then a change propagated through the new holder in {latency:.2f}s")
    assert latency < 5.0
    assert e2e.converged()
    e2e.workers["worker-e"] = e2e.cluster.worker("worker-e")  # back to three workers
    e2e.cluster.worker_identity(e2e.workers["worker-e"])


def test_config_push_takes_effect_within_5s_and_a_bad_one_is_refused(e2e: E2E) -> None:
    st = e2e.cluster.store
    second = task("cl-second", e2e.polaris, SRC2, DST2, service="svc-x")
    t0 = time.monotonic()
    assert e2e.push(config(e2e.main_task(), second), "two.json").returncode == 0
    wait_for(lambda: e2e.polaris.addresses(DST2, "svc-x") == [("10.9.0.1", 9000), ("10.9.0.2", 9000)], 10,
             every=0.1, what="the pushed task's copies")
    applied_in = time.monotonic() - t0
    print(f"pushed config applied and synced in {applied_in:.2f}s")
    assert applied_in < 5.0

    pushed, applied = st.pushed_version(), st.applied_version()
    bad = config(e2e.main_task(), {**second, "destination": {"name": "x", "type": "nope", "addresses": []}},
                 {"name": "cl-main", "source": {}, "match": []})
    refused = e2e.push(bad, "bad.json")
    assert refused.returncode == 2
    for where in ("tasks[1].destination.type", "tasks[1].destination.addresses", "tasks[2].name",
                  "tasks[2].destination", "tasks[2].match"):
        assert where in refused.stderr, refused.stderr
    assert (st.pushed_version(), st.applied_version()) == (pushed, applied)
    # the old config is still in force
    e2e.polaris.register(SRC2, "svc-x", ("10.9.0.3", 9000))
    wait_for(lambda: ("10.9.0.3", 9000) in e2e.polaris.addresses(DST2, "svc-x"), 10, every=0.1,
             what="the kept config to keep syncing")

    # removing a task deletes the copies it owned, and only those
    t1 = time.monotonic()
    assert e2e.push(config(e2e.main_task()), "main-again.json").returncode == 0
    wait_for(lambda: e2e.polaris.addresses(DST2, "svc-x") == [], 10, every=0.1, what="the removed task's cleanup")
    print(f"removed task cleaned up in {time.monotonic() - t1:.2f}s")
    assert e2e.polaris.addresses(SRC2, "svc-x") == [("10.9.0.1", 9000), ("10.9.0.2", 9000), ("10.9.0.3", 9000)]
    assert e2e.converged()


def test_status_surfaces_read_the_store(e2e: E2E) -> None:
    cli = e2e.cluster.cli("status", "--json")
    assert cli.returncode == 0, cli.stderr
    data = json.loads(cli.stdout)
    assert data["cluster"]["leader"] == e2e.cluster.store.leader()
    assert len(data["cluster"]["workers"]) == 3
    # per worker: runs and units, for the live ones in the table too
    work = data["cluster"]["work"]
    assert sum(w["runs"] for w in work.values()) == len(e2e.cluster.store.runs())
    for ident, about in data["cluster"]["workers"].items():
        assert about["runs"] == work.get(ident, {}).get("runs", 0), (ident, about, work)
    units = {r["unit"]: r for r in data["units"]}
    assert len(units) == SERVICES
    assert all(r["outcome"] == "ok" and r["in_sync"] == len(e2e.expected[r["service"].split("/")[1]])
               for r in units.values()), units
    table = e2e.cluster.cli("status")
    assert table.returncode == 0, table.stderr
    assert table.stdout.count("runs=") == 3, table.stdout
    log = next(p for p in e2e.cluster.procs if p.name == "scheduler").log.read_text()
    url = re.search(r'url="(http://127\.0\.0\.1:\d+)/status"', log)
    assert url, log[-2000:]
    metrics = urllib.request.urlopen(url.group(1) + "/metrics", timeout=5).read().decode()
    assert f'syncworker_leader_info{{identity="{e2e.cluster.store.leader()}"}} 1.0' in metrics
    assert "syncworker_is_leader 1.0" in metrics
    assert 'syncworker_duty_held{duty="watch:cl-main"' in metrics
    status = json.loads(urllib.request.urlopen(url.group(1) + "/status", timeout=5).read())
    assert len(status) == SERVICES
