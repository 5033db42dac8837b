"""Flower over a running cluster: executed sync jobs are listed, behind basic auth.

A scheduler and one worker sync a small Polaris -> Polaris task (one namespace
copied into another of the same Polaris); `syncworker flower` runs against the
same Redis with SYNCWORKER_FLOWER_AUTH. Its API lists the `syncworker.reconcile`
jobs that ran, with the task and unit in their kwargs; its pages answer 401
without credentials.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from .conftest import cluster_env, running_cluster, wait_for
from .test_end_to_end import Polaris, config, task

pytestmark = pytest.mark.peers

TAG = uuid.uuid4().hex[:6]
SRC, DST = f"fl-src-{TAG}", f"fl-dst-{TAG}"
SERVICES = 3
USER, PASSWORD = "flower", f"pw-{TAG}"


def get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def test_flower_lists_executed_sync_jobs_behind_basic_auth(request: pytest.FixtureRequest, peers: Any,
                                                          redis_url: str, zookeeper: str, tmp_path: Path) -> None:
    polaris = Polaris(peers.get("polaris"))
    for s in range(SERVICES):
        polaris.register(SRC, f"svc-{s}", (f"10.8.{s}.1", 8080), (f"10.8.{s}.2", 8080))
    port = peers.alloc.one()
    base_url = f"http://127.0.0.1:{port}"
    auth = (USER, PASSWORD)
    with running_cluster(request, cluster_env(redis_url, zookeeper), tmp_path) as cluster:
        # Flower first: it only knows the jobs whose events it saw
        flower = cluster.start("flower", "flower", "--port", str(port), "--address", "127.0.0.1",
                               SYNCWORKER_FLOWER_AUTH=f"{USER}:{PASSWORD}")
        cluster.scheduler("scheduler", "--status-port", "0")
        cluster.worker("worker-a")
        wait_for(lambda: get(base_url + "/healthcheck")[0] in (200, 401), 60, every=0.2,
                 what="Flower to answer")
        wait_for(lambda: len(cluster.workers_alive()) == 1 and cluster.store.leader(), 40,
                 what="a leader and a live worker")
        wait_for(lambda: json.loads(get(base_url + "/api/workers?refresh=1", auth)[1] or b"{}"), 30, every=0.5,
                 what="Flower to see the worker")

        cfg = tmp_path / "flower.json"
        cfg.write_text(json.dumps(config(task("fl-main", polaris, SRC, DST))))
        pushed = cluster.cli("config", "push", str(cfg))
        assert pushed.returncode == 0, pushed.stderr
        wait_for(lambda: all(len(polaris.addresses(DST, f"svc-{s}")) == 2 for s in range(SERVICES)), 30,
                 every=0.2, what="the sync to complete")

        def reconciles() -> list[dict[str, Any]]:
            status, body = get(base_url + "/api/tasks?taskname=syncworker.reconcile", auth)
            if status != 200:
                return []
            jobs = [t for t in json.loads(body).values()
                    if t.get("name") == "syncworker.reconcile" and t.get("state") == "SUCCESS"
                    and "fl-main" in str(t.get("kwargs"))]
            units = {str(t.get("kwargs")) for t in jobs}
            want = [f"{SRC}/svc-{s}" for s in range(SERVICES)]
            return jobs if all(any(u in k for k in units) for u in want) else []

        jobs = wait_for(reconciles, 30, every=0.5, what="Flower to list the executed reconciles")
        print(f"Flower lists {len(jobs)} executed syncworker.reconcile jobs, e.g. "
              f"{jobs[0]['name']} args={jobs[0]['args']} kwargs={jobs[0]['kwargs']} on {jobs[0].get('worker')}")
        assert all(t.get("worker", "").startswith("worker-a@") for t in jobs), jobs

        # the API and the pages are behind basic auth
        assert get(base_url + "/api/tasks")[0] == 401
        assert get(base_url + "/tasks")[0] == 401
        assert get(base_url + "/tasks", (USER, "wrong"))[0] == 401
        status, page = get(base_url + "/tasks", auth)
        assert status == 200
        assert b"<html" in page.lower()
        assert flower.alive(), flower.tail()
