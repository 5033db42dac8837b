"""The heartbeat duty against a real Nacos: Polaris -> Nacos copies are ephemeral and live only while
beaten; when the worker holding the duty is killed, the lease runs out, the leader dispatches the
duty again and another worker keeps the copies healthy. With every worker gone the copies turn
unhealthy (Nacos's own verdict) but are not deleted: stopping never makes copies vanish."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from syncworker import model
from syncworker.connectors import base, registry
from syncworker.sandbox import base as sandbox

from .conftest import cluster_env, running_cluster, wait_for
from .test_end_to_end import Polaris, config

pytestmark = pytest.mark.peers

TAG = uuid.uuid4().hex[:6]
#: Nacos marks an ephemeral copy unhealthy this long after its last beat (the connector writes it)
UNHEALTHY_AFTER = 8


def nacos_listing(url: str, service: model.ServiceKey) -> list[model.Instance]:
    async def go() -> list[model.Instance]:
        conn = registry.create(base.Endpoint(name="probe", type="nacos", addresses=(url,)))
        await conn.open()
        try:
            return list((await conn.list_instances(service)).instances)
        finally:
            await conn.close()

    return asyncio.run(go())


def test_heartbeat_duty_moves_to_another_worker(request: pytest.FixtureRequest, peers: Any, redis_url: str,
                                                zookeeper: str, tmp_path: Path) -> None:
    polaris = Polaris(peers.get("polaris"))
    nacos: sandbox.Running = peers.get("nacos", health_checks=True)  # Nacos expires unbeaten copies
    url = nacos.endpoints["http"]
    src_ns, svc = f"hb-src-{TAG}", f"hb-{TAG}"
    polaris.register(src_ns, svc, ("127.0.0.11", 7001), ("127.0.0.12", 7001))
    task = {"name": "hb", "source": polaris.endpoint("pol-src"),
            "destination": {"name": "nacos-dst", "type": "nacos", "addresses": [url],
                            "options": {"ephemeral_unhealthy_after": UNHEALTHY_AFTER,
                                        "ephemeral_delete_after": 300}},
            "match": [{"namespace": src_ns, "service": svc, "dest_namespace": ""}]}
    env = cluster_env(redis_url, zookeeper, SYNCWORKER_HEARTBEAT_INTERVAL="1")
    dest = model.ServiceKey("", "", svc)
    with running_cluster(request, env, tmp_path) as cluster:
        cluster.scheduler()
        workers = {cluster.worker_identity(p): p for p in (cluster.worker("worker-a"), cluster.worker("worker-b"))}
        (tmp_path / "hb.json").write_text(json.dumps(config(task)))
        assert cluster.cli("config", "push", str(tmp_path / "hb.json")).returncode == 0

        def copies() -> list[model.Instance]:
            return sorted(nacos_listing(url, dest), key=lambda i: i.address)

        wait_for(lambda: [i.address for i in copies()] == [("127.0.0.11", 7001), ("127.0.0.12", 7001)], 60,
                 every=0.2, what="the copies in Nacos")
        assert all(i.ephemeral and i.healthy for i in copies())
        first = wait_for(lambda: (lease := cluster.store.lease("heartbeat:hb")) and lease["owner"], 30,
                         what="a worker to hold the heartbeat duty")

        killed = time.monotonic()
        workers[first].kill()
        second = wait_for(lambda: (lease := cluster.store.lease("heartbeat:hb")) and lease["owner"] != first
                          and lease["owner"], 30, what="another worker to take the heartbeat duty")
        print(f"heartbeat duty moved from {first} to {second} in {time.monotonic() - killed:.1f}s")
        assert second in workers
        # well past the point where unbeaten copies turn unhealthy: the new holder kept beating them
        time.sleep(max(0.0, killed + UNHEALTHY_AFTER + 8 - time.monotonic()))
        assert all(i.healthy for i in copies()), copies()

        # control: with no worker left nobody beats; Nacos marks the copies unhealthy, and keeps them
        workers[second].kill()
        stopped = time.monotonic()
        wait_for(lambda: (found := copies()) and not any(i.healthy for i in found), UNHEALTHY_AFTER + 20,
                 every=0.5, what="Nacos to mark unbeaten copies unhealthy")
        print(f"unbeaten copies unhealthy after {time.monotonic() - stopped:.1f}s")
        assert len(copies()) == 2
