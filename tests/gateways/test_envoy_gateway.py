"""The Envoy connector against a real Envoy 1.40 fed from the files the connector writes.

Contract: a plan applied gives back `representable(x)`, a second plan is empty, Envoy
serves what was written, hand-written clusters survive. End to end: the engine
syncs a memory registry whose instances are real local backends into Envoy, and
real requests through Envoy follow the registry within two seconds. A removed task
retires its clusters (and nothing else) from what Envoy serves.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from syncworker import errors, marks, model
from syncworker.config import models
from syncworker.connectors import base, memory, registry
from syncworker.connectors import envoy as envoy_mod
from syncworker.reconcile import engine as engine_mod
from syncworker.reconcile import planner
from syncworker.sandbox import base as sandbox_base
from syncworker.sandbox import harness
from syncworker.sandbox.peers.envoy import Envoy
from tests.gateways.conftest import (
    PROPAGATION_LIMIT,
    RawPolaris,
    client,
    config,
    polaris_source,
    running_engine,
    sample,
    time_until_gone,
    time_until_seen,
    wait_serving,
)
from tests.peers.backend import Backend

pytestmark = pytest.mark.peers

TASK = "gw-task"
OWNER = planner.Owner(TASK, "registry")
NS = "default"


@pytest.fixture(scope="module")
def envoy_run(peers: harness.PeerPool) -> Iterator[sandbox_base.Running]:
    running = peers.fresh("envoy")
    yield running
    running.stop()


def endpoint(running: sandbox_base.Running) -> base.Endpoint:
    return base.Endpoint(name="envoy", type="envoy", addresses=("file:///unused",),
                         options={"cds_path": running.extra["cds_path"], "eds_dir": running.extra["eds_dir"]})


def connector(running: sandbox_base.Running) -> envoy_mod.EnvoyConnector:
    conn = registry.create(endpoint(running))
    assert isinstance(conn, envoy_mod.EnvoyConnector)
    return conn


def copy(backend_or_port: Backend | int, **kw: object) -> model.Instance:
    port = backend_or_port if isinstance(backend_or_port, int) else backend_or_port.port
    meta = {"version": "1", **kw.pop("metadata", {})}  # type: ignore[dict-item]
    return marks.stamp(model.Instance(host="127.0.0.1", port=port, metadata=meta, **kw), TASK,  # type: ignore[arg-type]
                       "registry")


def ctx() -> base.ApplyContext:
    return base.ApplyContext(task=TASK)


def admin_clusters(running: sandbox_base.Running) -> str:
    return httpx.get(f"{running.endpoints['admin']}/clusters", timeout=5.0).text


def wait_admin(running: sandbox_base.Running, predicate: object, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = admin_clusters(running)
        if predicate(text):  # type: ignore[operator]
            return text
        time.sleep(0.05)
    raise AssertionError(f"Envoy's /clusters never matched; last:\n{text[-3000:]}")


def cds(running: sandbox_base.Running) -> list[dict[str, object]]:
    return json.loads(Path(str(running.extra["cds_path"])).read_text())["resources"]


def hand_cluster(running: sandbox_base.Running, name: str, port: int) -> None:
    """Add a cluster written by hand (no syncworker mark) next to whatever the CDS file holds."""
    eds = Path(str(running.extra["eds_dir"])) / f"{name}.json"
    envoy_mod.write_atomic(eds, json.dumps({"version_info": "1", "resources": [{
        "@type": envoy_mod.ENDPOINTS_TYPE, "cluster_name": name,
        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
            "address": "127.0.0.1", "port_value": port}}}}]}]}]}))
    path = Path(str(running.extra["cds_path"]))
    resources = [c for c in json.loads(path.read_text())["resources"] if c.get("name") != name]
    resources.append({"@type": envoy_mod.CLUSTER_TYPE, "name": name, "type": "EDS", "connect_timeout": "1s",
                      "eds_cluster_config": {"service_name": name, "eds_config": {
                          "resource_api_version": "V3", "path_config_source": {"path": str(eds)}}}})
    envoy_mod.write_atomic(path, json.dumps({"version_info": f"hand-{time.time()}", "resources": resources}))


# ---- the connector contract ------------------------------------------------------------------
def test_apply_reads_back_representable_and_envoy_serves_it(envoy_run: sandbox_base.Running,
                                                             peers: harness.PeerPool) -> None:
    conn = connector(envoy_run)
    hand_cluster(envoy_run, "hand-written", peers.alloc.one())
    hand_before = next(c for c in cds(envoy_run) if c["name"] == "hand-written")
    svc = model.ServiceKey(NS, "", "contract-one")
    ports = [peers.alloc.one() for _ in range(5)]
    wanted = [conn.representable(i) for i in [
        copy(ports[0], weight=1.0),
        copy(ports[1], weight=0.5, metadata={"zone": "z1"}, protocol="http", cluster="c1"),
        copy(ports[2], weight=2.337),           # -> 2.34
        copy(ports[3], weight=0.0001),          # a positive weight stays positive: 0.01
        copy(ports[4], weight=0.0),             # no traffic, read back as 0
    ]]
    assert [w.weight for w in wanted] == [1.0, 0.5, 2.34, 0.01, 0.0]

    async def run() -> None:
        p = planner.plan(wanted, (await conn.list_instances(svc)).instances, OWNER)
        assert len(p.creates) == 5
        outcomes = await conn.apply(svc, p, base.ApplyContext(task=TASK, desired=tuple(wanted)))
        assert all(o.ok for o in outcomes), outcomes
        listing = await conn.list_instances(svc)
        got = {i.address: i for i in listing.instances}
        assert got == {w.address: w for w in wanted}
        assert planner.plan(wanted, listing.instances, OWNER).empty
        assert await conn.list_services(NS) == [svc]
        assert await conn.health() is None

    asyncio.run(run())
    name = envoy_mod.cluster_name(svc)
    assert name == "default.contract-one"
    mine = next(c for c in cds(envoy_run) if c["name"] == name)
    assert mine["metadata"]["filter_metadata"]["syncworker"]["task"] == TASK  # type: ignore[index]
    assert mine["metadata"]["filter_metadata"]["syncworker"]["origin"] == "registry"  # type: ignore[index]
    assert next(c for c in cds(envoy_run) if c["name"] == "hand-written") == hand_before
    text = wait_admin(envoy_run, lambda t: f"{name}::127.0.0.1:{ports[0]}::weight::100" in t)
    assert f"{name}::127.0.0.1:{ports[1]}::weight::50" in text
    assert f"{name}::127.0.0.1:{ports[2]}::weight::234" in text
    assert f"{name}::127.0.0.1:{ports[3]}::weight::1\n" in text
    assert "hand-written::127.0.0.1:" in text


def test_update_delete_and_removal_keep_hand_written_clusters(envoy_run: sandbox_base.Running,
                                                             peers: harness.PeerPool) -> None:
    conn = connector(envoy_run)
    hand_cluster(envoy_run, "hand-two", peers.alloc.one())
    svc = model.ServiceKey(NS, "v2", "contract-two")
    name = envoy_mod.cluster_name(svc)
    assert name == "default.contract-two.v2"
    a, b, c = (peers.alloc.one() for _ in range(3))
    first = [conn.representable(copy(p)) for p in (a, b, c)]
    second = [conn.representable(copy(a, weight=3.0)), conn.representable(copy(c))]

    async def converge(want: list[model.Instance]) -> base.Listing:
        p = planner.plan(want, (await conn.list_instances(svc)).instances, OWNER)
        outcomes = await conn.apply(svc, p, base.ApplyContext(task=TASK, desired=tuple(want)))
        assert all(o.ok for o in outcomes), outcomes
        listing = await conn.list_instances(svc)
        assert sorted(listing.instances, key=lambda i: i.address) == sorted(want, key=lambda i: i.address)
        assert planner.plan(want, listing.instances, OWNER).empty
        return listing

    asyncio.run(converge(first))
    wait_admin(envoy_run, lambda t: f"{name}::127.0.0.1:{b}::" in t)
    asyncio.run(converge(second))
    text = wait_admin(envoy_run, lambda t: f"{name}::127.0.0.1:{b}::" not in t)
    assert f"{name}::127.0.0.1:{a}::weight::300" in text
    eds_file = Path(str(envoy_run.extra["eds_dir"])) / f"{name}.json"
    assert eds_file.exists()
    asyncio.run(converge([]))  # the task's copies are gone: the cluster goes, the hand-written one stays
    wait_admin(envoy_run, lambda t: f"{name}::" not in t and "hand-two::127.0.0.1" in t)
    assert name not in [c["name"] for c in cds(envoy_run)]
    assert not eds_file.exists()


def test_clash_with_hand_written_cluster_is_reported_not_overwritten(envoy_run: sandbox_base.Running,
                                                                     peers: harness.PeerPool) -> None:
    conn = connector(envoy_run)
    svc = model.ServiceKey(NS, "", "clashing")
    hand_cluster(envoy_run, envoy_mod.cluster_name(svc), peers.alloc.one())
    before = Path(str(envoy_run.extra["cds_path"])).read_text()
    want = [conn.representable(copy(peers.alloc.one()))]

    async def run() -> list[base.Outcome]:
        assert (await conn.list_instances(svc)).instances == ()  # a hand-written cluster is not ours
        return await conn.apply(svc, planner.plan(want, [], OWNER), ctx())

    outcomes = asyncio.run(run())
    assert [o.ok for o in outcomes] == [False]
    assert not outcomes[0].temporary and "written by hand" in outcomes[0].error
    assert Path(str(envoy_run.extra["cds_path"])).read_text() == before


def test_upstream_name_and_refused_host(envoy_run: sandbox_base.Running, peers: harness.PeerPool) -> None:
    conn = connector(envoy_run)
    svc = model.ServiceKey(NS, "", "named")
    good = conn.representable(copy(peers.alloc.one()))
    bad = conn.representable(marks.stamp(model.Instance(host="backend.example", port=8080), TASK, "registry"))

    async def run() -> tuple[list[base.Outcome], base.Listing]:
        outcomes = await conn.apply(svc, planner.plan([good, bad], [], OWNER),
                                    base.ApplyContext(task=TASK, desired=(good, bad), upstream_name="my-upstream"))
        return outcomes, await conn.list_instances(svc)

    outcomes, listing = asyncio.run(run())
    by_addr = {o.address: o for o in outcomes}
    assert by_addr[good.address].ok
    assert not by_addr[bad.address].ok and "IP address" in by_addr[bad.address].error
    assert listing.instances == (good,)
    assert "my-upstream" in [c["name"] for c in cds(envoy_run)]
    wait_admin(envoy_run, lambda t: f"my-upstream::127.0.0.1:{good.port}::" in t)


def test_unreadable_files_fail_reads_and_writes_without_rewriting(tmp_path: Path) -> None:
    cds_path = tmp_path / "cds.json"
    cds_path.write_text("{ not json")
    conn = registry.create(base.Endpoint(name="e", type="envoy", addresses=(f"file://{tmp_path}",)))
    svc = model.ServiceKey(NS, "", "x")
    with pytest.raises(errors.ReadError, match="refusing to rewrite"):
        asyncio.run(conn.list_instances(svc))
    outcomes = asyncio.run(conn.apply(svc, planner.Plan(creates=(copy(8080),)), ctx()))
    assert [o.ok for o in outcomes] == [False] and outcomes[0].temporary
    assert cds_path.read_text() == "{ not json"
    # a missing CDS file is an empty gateway, and the first write creates it
    cds_path.unlink()
    assert asyncio.run(conn.list_instances(svc)).instances == ()
    want = conn.representable(copy(8080))
    assert all(o.ok for o in asyncio.run(conn.apply(svc, planner.Plan(creates=(want,)), ctx())))
    assert asyncio.run(conn.list_instances(svc)).instances == (want,)
    assert (tmp_path / "eds" / "default.x.json").exists()


# ---- end to end with the engine -----------------------------------------------------------------
def test_engine_feeds_envoy_from_a_registry(envoy_run: sandbox_base.Running, backends: list[Backend],
                                            store: tuple[str, memory.Store],
                                            record_property: object) -> None:
    address, mem = store
    svc = model.ServiceKey(NS, "", "orders")
    b0, b1, b2 = backends
    names = {b.name for b in backends}
    for b, version in ((b0, "1"), (b1, "1"), (b2, "2")):
        mem.put(svc, model.Instance(host="127.0.0.1", port=b.port, metadata={"version": version}))
    # not healthy, not enabled: a gateway never gets these
    mem.services[svc][("127.0.0.9", 1)] = model.Instance(host="127.0.0.9", port=1, healthy=False)
    mem.services[svc][("127.0.0.9", 2)] = model.Instance(host="127.0.0.9", port=2, enabled=False)
    Envoy().set_routes(envoy_run, [("/v2/", "default.orders.v2"), ("/", "default.orders")])
    cfg = config("gw-envoy", address, {
        "name": "edge-envoy", "type": "envoy", "addresses": ["file:///unused"],
        "options": {"cds_path": envoy_run.extra["cds_path"], "eds_dir": envoy_run.extra["eds_dir"]},
    }, [{"namespace": NS, "service": "orders", "groups": [{"name": "v2", "metadata": {"version": "2"}}]}])
    url = f"{envoy_run.endpoints['http']}/orders"
    url_v2 = f"{envoy_run.endpoints['http']}/v2/orders"
    eds_file = Path(str(envoy_run.extra["eds_dir"])) / "default.orders.json"
    timings: dict[str, float] = {}

    async def scenario() -> None:
        async with running_engine(cfg) as eng, client() as c:
            # every healthy enabled instance, and the group upstream only its own
            await wait_serving(c, url, names)
            await wait_serving(c, url_v2, {b2.name})
            listing = await registry.create(base.Endpoint(
                name="x", type="envoy", addresses=("file:///unused",),
                options={"cds_path": envoy_run.extra["cds_path"], "eds_dir": envoy_run.extra["eds_dir"]},
            )).list_instances(svc)
            assert {i.address for i in listing.instances} == {("127.0.0.1", b.port) for b in backends}

            # removed at the registry: no more requests within 2 s
            t0 = time.monotonic()
            mem.remove(svc, ("127.0.0.1", b1.port))
            timings["remove"] = await time_until_gone(c, url, b1.name, t0)
            window = await sample(c, url, 30)
            assert set(window) == {b0.name, b2.name}, window

            # added at the registry: requests within 2 s
            t0 = time.monotonic()
            mem.put(svc, model.Instance(host="127.0.0.1", port=b1.port, metadata={"version": "1"}))
            timings["add"] = await time_until_seen(c, url, b1.name, t0)
            await wait_serving(c, url, names)

            # the registry cannot be read: Envoy keeps its targets for as long as that lasts,
            # even though the registry's content changed meanwhile
            before = eds_file.read_bytes()
            mem.fail_reads = True
            mem.remove(svc, ("127.0.0.1", b0.port))  # an event: a reconcile runs and fails its read
            seen: set[str] = set()
            end = time.monotonic() + 3.0  # three pull ticks and several retries
            while time.monotonic() < end:
                seen.update(await sample(c, url, 10))
            assert seen == names, seen
            assert eds_file.read_bytes() == before
            rows = [r for r in eng.status() if r["destination"] == str(svc)]
            assert rows and rows[0]["outcome"] == "error" and "read failed" in str(rows[0]["error"])
            mem.fail_reads = False
            t0 = time.monotonic()
            mem.notify(svc)
            timings["remove_after_outage"] = await time_until_gone(c, url, b0.name, t0)
            mem.put(svc, model.Instance(host="127.0.0.1", port=b0.port, metadata={"version": "1"}))
            await wait_serving(c, url, names)
        # the engine stopped: the copies stay (no delete on stop)
        async with client() as c:
            assert set(await sample(c, url, 30)) == names

    asyncio.run(scenario())
    print(f"envoy propagation: {timings}")
    record_property("propagation", timings)  # type: ignore[operator]
    assert timings["remove"] < PROPAGATION_LIMIT, timings
    assert timings["add"] < PROPAGATION_LIMIT, timings
    assert timings["remove_after_outage"] < PROPAGATION_LIMIT, timings


def test_polaris_to_envoy(envoy_run: sandbox_base.Running, backends: list[Backend], peers: harness.PeerPool) -> None:
    """A real registry as the source: natives registered in Polaris become Envoy endpoints."""
    pytest.importorskip("syncworker.connectors.polaris")
    polaris = peers.get("polaris")
    raw = RawPolaris(polaris)
    service = f"gw-envoy-{uuid.uuid4().hex[:8]}"
    cluster = f"default.{service}"
    b0, b1, b2 = backends
    cfg = config("polaris-envoy", polaris_source(polaris), {
        "name": "edge-envoy", "type": "envoy", "addresses": ["file:///unused"],
        "options": {"cds_path": envoy_run.extra["cds_path"], "eds_dir": envoy_run.extra["eds_dir"]},
    }, [{"namespace": "default", "service": service}])
    Envoy().set_routes(envoy_run, [(f"/{service}", cluster)])
    url = f"{envoy_run.endpoints['http']}/{service}"
    timings: dict[str, float] = {}

    async def scenario() -> None:
        await raw.register("default", service, b0.port)
        await raw.register("default", service, b1.port, weight=200)
        try:
            async with running_engine(cfg), client() as c:
                await wait_serving(c, url, {b0.name, b1.name})
                # Polaris weight 200 (default 100) is canonical 2.0, Envoy 200 (ours: 100 per 1.0)
                text = await asyncio.to_thread(admin_clusters, envoy_run)
                assert f"{cluster}::127.0.0.1:{b1.port}::weight::200" in text
                assert f"{cluster}::127.0.0.1:{b0.port}::weight::100" in text

                t0 = time.monotonic()
                await raw.register("default", service, b2.port)
                timings["add"] = await time_until_seen(c, url, b2.name, t0)
                t0 = time.monotonic()
                await raw.deregister("default", service, b0.port)
                timings["remove"] = await time_until_gone(c, url, b0.name, t0)
                assert set(await sample(c, url, 30)) == {b1.name, b2.name}
        finally:
            for b in backends:
                await raw.deregister("default", service, b.port)

    asyncio.run(scenario())
    print(f"polaris -> envoy propagation: {timings}")
    # Polaris's Discover cache refreshes once a second and the watch polls every 0.2 s
    assert timings["add"] < PROPAGATION_LIMIT, timings
    assert timings["remove"] < PROPAGATION_LIMIT, timings


# ---- a removed task retires its clusters ---------------------------------------------------------
def destination(running: sandbox_base.Running) -> dict[str, object]:
    return {"name": "envoy", "type": "envoy", "addresses": ["file:///unused"],
            "options": {"cds_path": running.extra["cds_path"], "eds_dir": running.extra["eds_dir"]}}


def eds_file(running: sandbox_base.Running, name: str) -> Path:
    return Path(str(running.extra["eds_dir"])) / f"{name}.json"


def test_a_removed_task_leaves_none_of_its_clusters(envoy_run: sandbox_base.Running, peers: harness.PeerPool,
                                                    store: tuple[str, memory.Store]) -> None:
    address, mem = store
    svc = model.ServiceKey(NS, "", "retired")
    for version in ("1", "2"):
        mem.put(svc, model.Instance(host="127.0.0.1", port=peers.alloc.one(), metadata={"version": version}))
    hand_cluster(envoy_run, "hand-retire", peers.alloc.one())
    other = model.ServiceKey(NS, "", "retire-other")
    other_copy = marks.stamp(model.Instance(host="127.0.0.1", port=peers.alloc.one()), "other-task", "registry")
    outcomes = asyncio.run(connector(envoy_run).apply(other, planner.Plan(creates=(other_copy,)),
                                                      base.ApplyContext(task="other-task", desired=(other_copy,))))
    assert all(o.ok for o in outcomes)
    cfg = config(TASK, address, destination(envoy_run), [{"namespace": NS, "service": "retired", "groups": [
        {"name": "v2", "metadata": {"version": "2"}, "upstreamName": "retired-custom"}]}])
    ours = {"default.retired", "retired-custom"}

    async def scenario() -> None:
        async with running_engine(cfg) as eng:
            await asyncio.to_thread(wait_admin, envoy_run, lambda t: all(f"{n}::127.0.0.1:" in t for n in ours))
            assert await eng.settle(10)
            assert (await eng.apply_config(models.RegistryConfig()))["removed"] == [TASK]

    asyncio.run(scenario())
    names = [c["name"] for c in cds(envoy_run)]
    assert not ours & set(names) and {"hand-retire", "default.retire-other"} <= set(names)
    assert not any(eds_file(envoy_run, n).exists() for n in ours)
    wait_admin(envoy_run, lambda t: not any(f"{n}::" in t for n in ours) and "hand-retire::127.0.0.1" in t
               and "default.retire-other::127.0.0.1" in t)


def test_a_hand_added_endpoint_keeps_its_cluster(envoy_run: sandbox_base.Running, peers: harness.PeerPool,
                                                 store: tuple[str, memory.Store]) -> None:
    address, _ = store
    conn = connector(envoy_run)
    svc = model.ServiceKey(NS, "", "retire-kept")
    name = envoy_mod.cluster_name(svc)
    ours = conn.representable(copy(peers.alloc.one()))
    assert all(o.ok for o in asyncio.run(conn.apply(svc, planner.Plan(creates=(ours,)),
                                                    base.ApplyContext(task=TASK, desired=(ours,)))))
    hand_port = peers.alloc.one()
    path = eds_file(envoy_run, name)
    body = json.loads(path.read_text())
    body["resources"][0]["endpoints"][0]["lb_endpoints"].append(
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": hand_port}}}})
    envoy_mod.write_atomic(path, json.dumps(body))
    cfg = config(TASK, address, destination(envoy_run), [{"namespace": NS, "service": "retire-kept"}])
    assert asyncio.run(engine_mod.Engine(registry.create).cleanup_task(cfg.tasks[0])) == 1
    assert [(i.host, i.port, dict(i.metadata)) for i in asyncio.run(conn.list_instances(svc)).instances] == [
        ("127.0.0.1", hand_port, {})]
    assert name in [c["name"] for c in cds(envoy_run)]
    wait_admin(envoy_run, lambda t: f"{name}::127.0.0.1:{hand_port}::" in t and f":{ours.port}::" not in t)
    (kept,) = asyncio.run(conn.retire(svc, base.ApplyContext(task=TASK)))
    assert (kept.kind, kept.name, kept.action) == ("cluster", name, base.KEPT) and str(hand_port) in kept.reason


def test_a_cluster_left_empty_is_retired(envoy_run: sandbox_base.Running, peers: harness.PeerPool) -> None:
    """A cluster of the task with no endpoint (its EDS file emptied or lost): no delete runs for it,
    retiring drops it."""
    conn = connector(envoy_run)
    svc = model.ServiceKey(NS, "", "retire-empty")
    name = envoy_mod.cluster_name(svc)
    ours = conn.representable(copy(peers.alloc.one()))
    assert all(o.ok for o in asyncio.run(conn.apply(svc, planner.Plan(creates=(ours,)),
                                                    base.ApplyContext(task=TASK, desired=(ours,)))))
    eds_file(envoy_run, name).unlink()
    assert asyncio.run(conn.list_instances(svc)).instances == ()
    assert asyncio.run(conn.retire(svc, base.ApplyContext(task="other-task"))) == []  # not the other task's
    (done,) = asyncio.run(conn.retire(svc, base.ApplyContext(task=TASK)))
    assert (done.kind, done.name, done.action) == ("cluster", name, base.DELETED)
    assert name not in [c["name"] for c in cds(envoy_run)]
    wait_admin(envoy_run, lambda t: f"{name}::" not in t)


def test_unreadable_files_fail_retiring_without_rewriting(tmp_path: Path) -> None:
    conn = registry.create(base.Endpoint(name="e", type="envoy", addresses=(f"file://{tmp_path}",)))
    svc = model.ServiceKey(NS, "", "x")
    want = conn.representable(copy(8080))
    assert all(o.ok for o in asyncio.run(conn.apply(svc, planner.Plan(creates=(want,)), ctx())))
    eds = tmp_path / "eds" / "default.x.json"
    eds.write_text("{ not json")
    before = (tmp_path / "cds.json").read_text()
    (failed,) = asyncio.run(conn.retire(svc, ctx()))
    assert failed.action == base.FAILED and "refusing to rewrite" in failed.reason
    assert (tmp_path / "cds.json").read_text() == before and eds.read_text() == "{ not json"
