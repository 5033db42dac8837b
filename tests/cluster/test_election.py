"""Leader election through a real ZooKeeper: failover after kill -9, handover on SIGTERM, no
dispatch once the ZooKeeper session is in doubt, and a leader again after ZooKeeper restarts."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from scheduler import election as election_mod
from syncworker.cluster import dispatch
from syncworker.cluster import store as store_mod
from syncworker.sandbox import base as sandbox
from syncworker.sandbox import catalog

from .conftest import Cluster, cluster_env, running_cluster, wait_for

pytestmark = pytest.mark.peers

#: a standby must lead within this long after the leader is killed (session timeout 4 s)
FAILOVER_LIMIT = 10.0


def _leader_among(cluster: Cluster, procs: dict[str, Any]) -> str | None:
    leader = cluster.store.leader()
    return leader if leader in procs else None


def test_a_standby_leads_within_10s_after_the_leader_is_killed(cluster: Cluster) -> None:
    procs = {}
    for i in range(3):
        proc = cluster.scheduler(f"scheduler-{i}")
        procs[cluster.identity(proc)] = proc
    first = wait_for(lambda: _leader_among(cluster, procs), 30, what="a first leader")
    # exactly one of the three says it leads; the others stand by
    members = wait_for(lambda: (m := cluster.store.members()) and len(m) == 3 and m, 10, what="3 schedulers alive")
    assert sorted(ident for ident, info in members.items() if info.get("leading")) in ([first], [])

    t0 = time.monotonic()
    procs[first].kill()
    second = wait_for(lambda: (lead := _leader_among(cluster, procs)) != first and lead, FAILOVER_LIMIT + 5,
                      what="a new leader")
    failover = time.monotonic() - t0
    print(f"failover after kill -9: {failover:.2f}s")
    assert failover < FAILOVER_LIMIT
    assert procs[second].alive()

    # a leader stopped with SIGTERM resigns: the last standby leads at once, not after a session timeout
    t1 = time.monotonic()
    procs[second].signal(15)
    third = wait_for(lambda: (lead := _leader_among(cluster, procs)) not in (first, second) and lead, 10,
                     what="the last standby to lead")
    handover = time.monotonic() - t1
    print(f"handover after SIGTERM: {handover:.2f}s")
    assert handover < 3.0
    assert procs[third].alive()
    procs[second].popen.wait(15)
    assert procs[second].popen.returncode == 0, procs[second].tail()


class _Recorder:
    """A Celery app stand-in that records what would have been sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def send_task(self, name: str, kwargs: dict[str, Any], **_: Any) -> None:
        self.sent.append((name, kwargs))


def test_losing_zookeeper_stops_dispatching_at_once(peers: Any, redis_url: str) -> None:
    zk: sandbox.Running = peers.fresh("zookeeper")
    st = store_mod.Store.from_url(redis_url, f"t-zk-{os.getpid()}")
    elect = election_mod.Election(zk.endpoints["zookeeper"], "/syncworker-test/zk-loss", "me:1", 4.0)
    app = _Recorder()
    sender = dispatch.Dispatcher(st, app, allowed=elect.leading)  # type: ignore[arg-type]
    ref = {"task": "t", "unit": "ns/a", "service": ["ns", "", "a"]}
    try:
        elect.start()
        assert elect.campaign() and elect.leading()
        assert sender.mark(ref)
        assert len(app.sent) == 1
        st.dequeue("t:ns/a")
        t0 = time.monotonic()
        zk.stop()
        wait_for(lambda: not elect.leading(), 5, what="leadership to end with the ZooKeeper connection")
        print(f"dispatching stopped {time.monotonic() - t0:.2f}s after ZooKeeper went away")
        with pytest.raises(dispatch.NotLeader):
            sender.mark(ref)
        assert len(app.sent) == 1
    finally:
        elect.cancel()
        elect.stop()
        zk.stop()
        st.flush()


def test_a_leader_again_after_zookeeper_restarts(request: pytest.FixtureRequest, peers: Any, redis_url: str,
                                                 tmp_path: Path) -> None:
    zk: sandbox.Running = peers.fresh("zookeeper")  # this test's own: restarted on its port and data
    try:
        env = cluster_env(redis_url, zk.endpoints["zookeeper"])
        with running_cluster(request, env, tmp_path) as cluster:
            procs = {}
            for i in range(2):
                proc = cluster.scheduler(f"scheduler-{i}")
                procs[cluster.identity(proc)] = proc

            def leading() -> list[str]:
                return sorted(k for k, v in cluster.store.members().items()
                              if v.get("role") == "scheduler" and v.get("leading") and k in procs)

            wait_for(lambda: len(leading()) == 1, 30, what="a first leader")
            t0 = time.monotonic()
            zk.kill()
            wait_for(lambda: not leading(), 15, what="leadership to end with ZooKeeper")
            dropped = time.monotonic() - t0
            time.sleep(2.0)
            zk.restart()
            catalog.get("zookeeper").wait_ready(zk)
            t1 = time.monotonic()
            again = wait_for(lambda: (lead := leading()) and len(lead) == 1 and lead, 60, every=0.1,
                             what="a leader again after ZooKeeper restarted")
            back = time.monotonic() - t1
            wait_for(lambda: cluster.store.leader() == again[0], 10, what="the new leader to lead in the store")
            print(f"ZooKeeper killed: no scheduler leads after {dropped:.2f}s; restarted: {again[0]} leads "
                  f"{back:.2f}s later")
            assert all(p.alive() for p in procs.values())
            # exactly one leads, and stays the only one
            time.sleep(2.0)
            assert leading() == again
    finally:
        zk.stop()
