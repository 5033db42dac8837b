"""Workers recover by themselves: `syncworker worker` starts its Celery worker again when it dies, and a
cluster whose Redis is restarted (empty: the sandbox Redis has no persistence) comes back with no
process restarted by anyone else, deleting nothing at the destination meanwhile; so does one whose
ZooKeeper is restarted (leadership ends with it and is taken again when it is back).

Celery/kombu 5.7 exits a worker that loses the broker with jobs in flight (see
`syncworker.cluster.supervise`); the Redis test holds a watch duty on a worker, so
at least that one goes through the supervisor's restart.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from syncworker import model
from syncworker.connectors import base, registry
from syncworker.sandbox import base as sandbox
from syncworker.sandbox import catalog

from .conftest import cluster_env, running_cluster, wait_for
from .test_end_to_end import Polaris, config, task

pytestmark = pytest.mark.peers

TAG = uuid.uuid4().hex[:6]
SERVICES = 6
PER_SERVICE = 3
#: seconds Redis stays down: longer than the liveness (3 s) and lease (4 s) TTLs of the test clusters
OUTAGE = 6.0


def _addr(s: int, i: int) -> model.Address:
    return (f"10.60.{s}.{i + 1}", 8080)


def _ping(env: dict[str, str], node: str) -> bool:
    """What the Kubernetes probe asks: does this Celery node answer through the broker?"""
    out = subprocess.run([sys.executable, "-m", "celery", "--broker", env["SYNCWORKER_REDIS_URL"], "inspect", "ping",
                          "--destination", node, "--timeout", "5"], env=env, capture_output=True, timeout=60)
    return out.returncode == 0


def _restarted(proc_log: Path) -> int:
    return proc_log.read_text(errors="replace").count("celery worker exited unexpectedly")


def test_the_supervisor_restarts_a_dead_celery_worker_and_stops_on_sigterm(
        request: pytest.FixtureRequest, redis_url: str, zookeeper: str, tmp_path: Path) -> None:
    with running_cluster(request, cluster_env(redis_url, zookeeper), tmp_path) as cluster:
        proc = cluster.worker("worker-a")
        first = cluster.worker_identity(proc)
        child = int(first.rsplit(":", 1)[1])
        assert child != proc.pid
        os.kill(child, signal.SIGKILL)  # the Celery worker alone dies (not its supervisor)
        t0 = time.monotonic()
        second = wait_for(lambda: (ident := cluster.worker_identity(proc)) != first and ident, 40,
                          what="the supervisor to start the Celery worker again")
        print(f"Celery worker killed; a new one ({second}) live after {time.monotonic() - t0:.1f}s")
        assert proc.alive()
        assert _restarted(proc.log) == 1
        proc.signal(signal.SIGTERM)
        proc.popen.wait(30)
        assert proc.popen.returncode == 0, proc.tail()
        new_child = int(second.rsplit(":", 1)[1])
        wait_for(lambda: not sandbox.pid_alive(new_child), 10, what="the Celery worker to stop with its supervisor")
        assert "Warm shutdown" in proc.log.read_text(errors="replace")


class DestinationWatch:
    """Lists the destination every 0.2 s from a thread of its own, and remembers what each listing lacked."""

    def __init__(self, polaris: Polaris, ns: str, expected: dict[str, list[model.Address]]) -> None:
        self.polaris = polaris
        self.ns = ns
        self.expected = expected
        self.polls: list[tuple[float, dict[str, list[model.Address]]]] = []
        self.errors = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        conn = registry.create(base.Endpoint(name="probe", type="polaris", addresses=(self.polaris.url,),
                                             token=self.polaris.token))
        await conn.open()
        try:
            while not self.stop.is_set():
                seen = {}
                try:
                    for svc in self.expected:
                        got = await conn.list_instances(model.ServiceKey(self.ns, "", svc))
                        seen[svc] = sorted(i.address for i in got.instances)
                    self.polls.append((time.monotonic(), seen))
                except Exception:
                    self.errors += 1
                await asyncio.sleep(0.2)
        finally:
            await conn.close()

    def missing(self) -> list[tuple[float, str, list[model.Address]]]:
        """(when, service, addresses) for every listing that lacked an expected copy."""
        return [(at, svc, sorted(set(want) - set(seen.get(svc, []))))
                for at, seen in self.polls for svc, want in self.expected.items() if set(want) - set(seen.get(svc, []))]


def test_redis_and_zookeeper_restarts_heal_by_themselves_and_delete_nothing(
        request: pytest.FixtureRequest, peers: Any, tmp_path: Path) -> None:
    polaris = Polaris(peers.get("polaris"))
    src, dst = f"rr-src-{TAG}", f"rr-dst-{TAG}"
    expected = {f"svc-{s}": sorted(_addr(s, i) for i in range(PER_SERVICE)) for s in range(SERVICES)}
    for s in range(SERVICES):
        polaris.register(src, f"svc-{s}", *(_addr(s, i) for i in range(PER_SERVICE)))
    redis: sandbox.Running = peers.fresh("redis")  # this test's own: the session's Redis stays up
    zk: sandbox.Running = peers.fresh("zookeeper")  # likewise
    try:
        env = cluster_env(redis.endpoints["redis"], zk.endpoints["zookeeper"])
        with running_cluster(request, env, tmp_path) as cluster:
            scheduler = cluster.scheduler()
            workers = {n: cluster.worker(n) for n in ("worker-a", "worker-b")}
            wait_for(lambda: len(cluster.worker_identities(workers)) == 2 and cluster.store.leader(), 60,
                     what="a leader and two live workers")
            (tmp_path / "rr.json").write_text(json.dumps(config(task("rr", polaris, src, dst))))
            pushed = cluster.cli("config", "push", str(tmp_path / "rr.json"))
            assert pushed.returncode == 0, pushed.stderr
            wait_for(lambda: all(polaris.addresses(dst, s) == w for s, w in expected.items()), 60, every=0.3,
                     what="the initial sync")
            wait_for(lambda: cluster.store.lease("watch:rr"), 20, what="a worker to hold the watch duty")
            before = cluster.worker_identities(workers)

            watch = DestinationWatch(polaris, dst, expected)
            watch.thread.start()
            wait_for(lambda: len(watch.polls) >= 3, 10, what="the destination watch to run")
            redis.kill()
            down = time.monotonic()
            time.sleep(OUTAGE)
            redis.restart()
            catalog.get("redis").wait_ready(redis)
            up = time.monotonic()
            polls_during_outage = sum(1 for at, _ in watch.polls if down <= at <= up)

            # the leader and both workers come back on their own (the store was emptied: they say so again)
            wait_for(lambda: cluster.store.leader() and cluster.store.applied_version() > 0, 60,
                     what="the leader to lead and publish its config again")
            leader_back = time.monotonic() - up
            after = wait_for(lambda: (ids := cluster.worker_identities(workers)) and len(ids) == 2 and ids, 90,
                             every=0.2, what="both workers to be live again")
            workers_back = time.monotonic() - up
            wait_for(lambda: cluster.store.lease("watch:rr"), 60, what="the watch duty to be held again")
            duty_back = time.monotonic() - up
            # each Celery worker consumes from the broker again (its node answers a ping through Redis)
            for name in workers:
                wait_for(lambda name=name: _ping(env, f"{name}@{socket.gethostname()}"), 60, every=1.0,
                         what=f"{name}'s Celery node to answer a ping")
            consuming = time.monotonic() - up

            # a change at the source reaches the destination
            t0 = time.monotonic()
            polaris.register(src, "svc-0", ("10.60.9.9", 8080))
            wait_for(lambda: ("10.60.9.9", 8080) in polaris.addresses(dst, "svc-0"), 60, every=0.2,
                     what="a change made after the restart to reach the destination")
            change = time.monotonic() - t0

            # then ZooKeeper: leadership ends with it, comes back after it, and the sync goes on
            zk.kill()
            zk_down = time.monotonic()
            wait_for(lambda: not cluster.store.leader(), 30, what="leadership to end with ZooKeeper")
            time.sleep(2.0)
            zk.restart()
            catalog.get("zookeeper").wait_ready(zk)
            zk_up = time.monotonic()
            wait_for(lambda: cluster.store.leader(), 60, every=0.1, what="a leader again after ZooKeeper restarted")
            zk_leader_back = time.monotonic() - zk_up
            polaris.register(src, "svc-1", ("10.60.9.10", 8080))
            wait_for(lambda: ("10.60.9.10", 8080) in polaris.addresses(dst, "svc-1"), 60, every=0.2,
                     what="a change made after the ZooKeeper restart to reach the destination")
            zk_polls = sum(1 for at, _ in watch.polls if zk_down <= at <= zk_up)
            watch.stop.set()
            watch.thread.join(10)
            print(f"ZooKeeper down {zk_up - zk_down:.1f}s: a leader again {zk_leader_back:.1f}s after its restart; "
                  f"destination listed {zk_polls} times meanwhile")

            restarts = {n: _restarted(p.log) for n, p in workers.items()}
            print(f"Redis down {OUTAGE:.0f}s: leader back {leader_back:.1f}s after the restart, both workers live "
                  f"{workers_back:.1f}s after, watch duty held {duty_back:.1f}s after, both Celery nodes answer pings "
                  f"{consuming:.1f}s after; a change synced in "
                  f"{change:.2f}s. Celery workers started again by their supervisors: {restarts}; identities "
                  f"before {sorted(before.values())} -> {after}. Destination listed {len(watch.polls)} times "
                  f"({polls_during_outage} during the outage, {watch.errors} failed reads)")
            # nothing restarted by the test: the very processes it started are the ones running
            assert scheduler.alive() and all(p.alive() for p in workers.values())
            # nothing deleted at the destination, at any point
            assert polls_during_outage >= 5 and zk_polls >= 5
            assert watch.missing() == []
            final = {s: polaris.addresses(dst, s) for s in expected}
            assert final == {**expected, "svc-0": sorted([*expected["svc-0"], ("10.60.9.9", 8080)]),
                             "svc-1": sorted([*expected["svc-1"], ("10.60.9.10", 8080)])}
    finally:
        redis.stop()
        zk.stop()
