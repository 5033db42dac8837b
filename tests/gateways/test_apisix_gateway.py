"""APISIX as a sync destination, against the APISIX Admin API (v3) CONTRACT DOUBLE (APISIX cannot run here).

Two layers: the connector contract (apply, list == representable, a second plan is
empty, large upstreams, errors, ids, labels, node ownership, optional routes) and
end-to-end runs of the engine from an in-memory registry into the double:
polaris-sync's scenario (three upstreams: default, version-1, version-2), nodes
added by hand that survive every sync, a failed source read that changes nothing,
a gateway outage the sync recovers from, and a removed task that retires its
upstreams and routes and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from syncworker import errors, marks, model
from syncworker.config import loader, models
from syncworker.connectors import apisix, base, memory, registry
from syncworker.reconcile import engine as engine_mod
from syncworker.reconcile import planner
from syncworker.sandbox import harness
from tests.doubles._server import json_reply
from tests.doubles.apisix_admin_double import DEFAULT_ADMIN_KEY, ApisixAdminDouble
from tests.doubles.fixtures import answer, running_apisix_double

pytestmark = pytest.mark.peers

ROOT = Path(__file__).resolve().parents[2]
TASK = "polaris1-to-apisix"
SOURCE = "ins-3ad0f6e6"
OWNER = planner.Owner(TASK, SOURCE)
SVC = model.ServiceKey("default", "", "test.service.3")
V1 = model.ServiceKey("default", "version-1", "test.service.3")
V2 = model.ServiceKey("default", "version-2", "test.service.3")
UP_DEFAULT = "default.test.service.3.default"
UP_V1 = "default.test.service.3.version-1"
UP_V2 = "default.test.service.3.version-2"
RECOVERY_LIMIT = 10.0


# ---- fixtures and helpers -----------------------------------------------------------------
@pytest.fixture
def apisix_double(peers: harness.PeerPool) -> Iterator[ApisixAdminDouble]:
    with running_apisix_double(peers.alloc) as double:
        yield double


@pytest.fixture
def registry_store() -> Iterator[tuple[str, memory.Store]]:
    name = f"memory://apisix-{uuid.uuid4().hex[:8]}"
    yield name, memory.store(name)
    memory.STORES.pop(name, None)


def endpoint(double: ApisixAdminDouble, **options: Any) -> base.Endpoint:
    return base.Endpoint(name="apisix", type="apisix", addresses=(double.url,), token=DEFAULT_ADMIN_KEY,
                         options=options)


@contextlib.asynccontextmanager
async def connector(ep: base.Endpoint) -> AsyncIterator[apisix.ApisixConnector]:
    conn = registry.create(ep)
    assert isinstance(conn, apisix.ApisixConnector)
    await conn.open()
    try:
        yield conn
    finally:
        await conn.close()


def copy(host: str, port: int = 8080, task: str = TASK, origin: str = SOURCE, **kw: Any) -> model.Instance:
    return marks.stamp(model.Instance(host, port, **kw), task, origin)


async def sync(conn: base.Connector, key: model.ServiceKey, want: list[model.Instance],
               owner: planner.Owner = OWNER, upstream_name: str = "") -> tuple[planner.Plan, list[base.Outcome]]:
    desired = [conn.representable(i) for i in want]
    listing = await conn.list_instances(key)
    p = planner.plan(desired, listing.instances, owner)
    outcomes = await conn.apply(key, p, base.ApplyContext(owner.task, tuple(desired), upstream_name))
    return p, outcomes


def by_address(insts: Any) -> dict[model.Address, model.Instance]:
    return {i.address: i for i in insts}


def nodes(double: ApisixAdminDouble) -> dict[str, dict[str, int]]:
    """upstream id -> {"host:port": weight}."""
    out: dict[str, dict[str, int]] = {}
    for uid, value in double.state()["upstreams"].items():
        raw = value.get("nodes") or {}
        if isinstance(raw, dict):
            out[uid] = dict(raw)
        else:
            out[uid] = {f"{n['host']}:{n.get('port')}": n["weight"] for n in raw}
    return out


def admin(double: ApisixAdminDouble) -> httpx.Client:
    return httpx.Client(base_url=double.url + "/apisix/admin", headers={"X-API-KEY": DEFAULT_ADMIN_KEY},
                        timeout=5.0, trust_env=False)


def add_node_by_hand(double: ApisixAdminDouble, uid: str, node: dict[str, Any]) -> None:
    """What an operator does: read the upstream, append a node, write the node list back."""
    with admin(double) as api:
        current = api.get(f"/upstreams/{uid}").json()["value"]["nodes"]
        assert api.patch(f"/upstreams/{uid}/nodes", json=[*current, node]).status_code == 200


def writes(double: ApisixAdminDouble) -> int:
    return sum(1 for method, _ in list(double.requests) if method in ("POST", "PUT", "PATCH", "DELETE"))


async def eventually(check: Callable[[], bool], timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


# ---- connector contract -------------------------------------------------------------------
def test_apply_then_list_gives_representable_and_a_second_plan_is_empty(apisix_double: ApisixAdminDouble) -> None:
    want = [copy("10.0.0.1", weight=1.0, metadata={"version": "1.0.0", "zone": "a b"}, protocol="http",
                 cluster="c1"),
            copy("10.0.0.2", weight=0.333), copy("10.0.0.3", weight=0.0), copy("10.0.0.4", weight=700.0),
            copy("::1", 9000, weight=2.5), copy("svc.example.internal", 443, weight=1.234)]

    async def main() -> None:
        async with connector(endpoint(apisix_double)) as conn:
            assert conn.capabilities.gateway and conn.capabilities.destination and not conn.capabilities.source
            assert conn.default_weight == 100
            p, outcomes = await sync(conn, SVC, want)
            assert len(p.creates) == len(want) and all(o.ok for o in outcomes), outcomes
            listed = by_address((await conn.list_instances(SVC)).instances)
            assert listed == by_address(conn.representable(i) for i in want)
            assert listed[("10.0.0.1", 8080)].metadata == {"version": "1.0.0", "zone": "a b", marks.TASK: TASK,
                                                          marks.ORIGIN: SOURCE}
            assert listed[("10.0.0.2", 8080)].weight == 0.33
            again, outcomes = await sync(conn, SVC, want)
            assert again.empty and outcomes == []
    asyncio.run(main())
    assert nodes(apisix_double) == {UP_DEFAULT: {"10.0.0.1:8080": 100, "10.0.0.2:8080": 33, "10.0.0.3:8080": 0,
                                                 "10.0.0.4:8080": 70000, "[::1]:9000": 250,
                                                 "svc.example.internal:443": 123}}
    up = apisix_double.state()["upstreams"][UP_DEFAULT]
    assert up["labels"] == {"managed-by": "syncworker", "syncworker-task": TASK}
    assert up["name"] == UP_DEFAULT and up["type"] == "roundrobin"
    assert apisix_double.state()["routes"] == {}  # routes are off by default


def test_updates_and_deletes_keep_nodes_added_by_hand(apisix_double: ApisixAdminDouble) -> None:
    async def main() -> None:
        async with connector(endpoint(apisix_double)) as conn:
            await sync(conn, SVC, [copy("10.0.0.1"), copy("10.0.0.2"), copy("10.0.0.3")])
            add_node_by_hand(apisix_double, UP_DEFAULT, {"host": "10.9.9.9", "port": 80, "weight": 7})
            add_node_by_hand(apisix_double, UP_DEFAULT, {"host": "10.0.0.4", "port": 8080, "weight": 5,
                                                         "metadata": {"team": "a"}})
            listed = by_address((await conn.list_instances(SVC)).instances)
            assert listed[("10.9.9.9", 80)] == model.Instance("10.9.9.9", 80, weight=0.07)  # no marks
            p, outcomes = await sync(conn, SVC, [copy("10.0.0.1", weight=3.0), copy("10.0.0.3"), copy("10.0.0.4")])
            assert p.counts() == {"create": 0, "update": 1, "delete": 1, "clash": 1}
            assert all(o.ok for o in outcomes)
            p, outcomes = await sync(conn, SVC, [])
            assert p.counts()["delete"] == 2 and all(o.ok for o in outcomes)
    asyncio.run(main())
    assert nodes(apisix_double) == {UP_DEFAULT: {"10.9.9.9:80": 7, "10.0.0.4:8080": 5}}
    hand = [n for n in apisix_double.state()["upstreams"][UP_DEFAULT]["nodes"] if n["host"] == "10.0.0.4"]
    assert hand == [{"host": "10.0.0.4", "port": 8080, "weight": 5, "metadata": {"team": "a"}, "priority": 0}]


def test_map_form_nodes_made_by_hand_are_kept(apisix_double: ApisixAdminDouble) -> None:
    with admin(apisix_double) as api:
        assert api.put(f"/upstreams/{UP_V1}", json={"nodes": {"10.7.7.7:80": 3, "[::2]:81": 1},
                                                    "type": "roundrobin"}).status_code == 201

    async def main() -> None:
        async with connector(endpoint(apisix_double)) as conn:
            listed = by_address((await conn.list_instances(V1)).instances)
            assert listed == {("10.7.7.7", 80): model.Instance("10.7.7.7", 80, weight=0.03),
                              ("::2", 81): model.Instance("::2", 81, weight=0.01)}
            _, outcomes = await sync(conn, V1, [copy("10.0.0.1")])
            assert all(o.ok for o in outcomes)
            assert (await sync(conn, V1, [copy("10.0.0.1")]))[0].empty
    asyncio.run(main())
    assert nodes(apisix_double) == {UP_V1: {"10.7.7.7:80": 3, "[::2]:81": 1, "10.0.0.1:8080": 100}}
    assert "labels" not in apisix_double.state()["upstreams"][UP_V1]  # a hand-made upstream is not relabelled


def test_large_upstreams_round_trip(apisix_double: ApisixAdminDouble) -> None:
    want = [copy(f"10.1.{i // 200}.{i % 200 + 1}", weight=1 + i % 3) for i in range(250)]

    async def main() -> None:
        async with connector(endpoint(apisix_double)) as conn:
            _, outcomes = await sync(conn, SVC, want)
            assert len(outcomes) == 250 and all(o.ok for o in outcomes)
            listed = (await conn.list_instances(SVC)).instances
            assert by_address(listed) == by_address(conn.representable(i) for i in want)
            assert (await sync(conn, SVC, want))[0].empty
            before = writes(apisix_double)
            p, outcomes = await sync(conn, SVC, want[:200])  # 50 deletes: one write
            assert len(p.deletes) == 50 and all(o.ok for o in outcomes)
            assert writes(apisix_double) == before + 1
    asyncio.run(main())
    assert len(nodes(apisix_double)[UP_DEFAULT]) == 200


def test_ids_labels_and_weight_scale() -> None:
    conn = apisix.ApisixConnector(base.Endpoint("a", "apisix", ("127.0.0.1:1",), options={"weight_scale": 1}))
    assert conn.bases == ["http://127.0.0.1:1/apisix/admin"]
    assert conn.upstream_id(V1) == UP_V1
    odd = conn.upstream_id(model.ServiceKey("", "", "providers:com.foo.Bar:1.0:" + "x" * 80))
    assert len(odd) <= 64 and odd.startswith("default.providers-com.foo.Bar-1.0-") and odd != conn.upstream_id(
        model.ServiceKey("", "", "providers:com.foo.Bar:1.0:" + "x" * 81))
    assert conn.representable(model.Instance("h", 1, weight=2.4)).weight == 2.0
    assert conn.default_weight == 1
    assert apisix.label_value("a b\t%") == "a%20b%09%25"
    long = apisix.label_value("t" * 300)
    assert len(long) == 256 and " " not in long


def test_long_and_odd_task_names_make_valid_labels(apisix_double: ApisixAdminDouble) -> None:
    task = "team a " + "x" * 300
    owner = planner.Owner(task, SOURCE)

    async def main() -> None:
        async with connector(endpoint(apisix_double)) as conn:
            want = [copy("10.0.0.1", task=task)]
            _, outcomes = await sync(conn, SVC, want, owner)
            assert all(o.ok for o in outcomes), outcomes
            assert (await sync(conn, SVC, want, owner))[0].empty
            p, _ = await sync(conn, SVC, [copy("10.0.0.1", weight=2.0)])  # another task: a clash
            assert p.counts() == {"create": 0, "update": 0, "delete": 0, "clash": 1}
    asyncio.run(main())
    label = apisix_double.state()["upstreams"][UP_DEFAULT]["labels"]["syncworker-task"]
    assert len(label) <= 256 and label.startswith("team%20a%20x")


def test_create_routes_makes_one_route_per_default_upstream(apisix_double: ApisixAdminDouble) -> None:
    async def main() -> None:
        async with connector(endpoint(apisix_double, create_routes=True, route_uri="/{namespace}/{service}/*")) as c:
            for key in (SVC, V1):
                _, outcomes = await sync(c, key, [copy("10.0.0.1")])
                assert all(o.ok for o in outcomes)
            with admin(apisix_double) as api:  # the route is the user's after creation
                assert api.patch(f"/routes/{UP_DEFAULT}", json={"uri": "/edited/*"}).status_code == 200
            _, outcomes = await sync(c, SVC, [copy("10.0.0.1"), copy("10.0.0.2")])
            assert all(o.ok for o in outcomes)
    asyncio.run(main())
    routes = apisix_double.state()["routes"]
    assert list(routes) == [UP_DEFAULT]
    assert routes[UP_DEFAULT]["upstream_id"] == UP_DEFAULT and routes[UP_DEFAULT]["uri"] == "/edited/*"
    assert routes[UP_DEFAULT]["labels"]["managed-by"] == "syncworker"


def test_upstream_name_comes_from_the_config(apisix_double: ApisixAdminDouble) -> None:
    async def main() -> None:
        async with connector(endpoint(apisix_double)) as conn:
            _, outcomes = await sync(conn, V2, [copy("10.0.0.2")], upstream_name="svc3-v2")
            assert all(o.ok for o in outcomes)
    asyncio.run(main())
    assert apisix_double.state()["upstreams"][UP_V2]["name"] == "svc3-v2"


def test_errors_map_to_read_errors_temporary_and_permanent_outcomes(apisix_double: ApisixAdminDouble,
                                                                    peers: harness.PeerPool) -> None:
    async def main() -> None:
        async with connector(endpoint(apisix_double)) as conn:
            await sync(conn, SVC, [copy("10.0.0.1")])
            apisix_double.fail_next(1, 503)
            with pytest.raises(errors.ReadError):
                await conn.list_instances(SVC)
            listing = await conn.list_instances(SVC)
            p = planner.plan([conn.representable(copy("10.0.0.1")), conn.representable(copy("10.0.0.2"))],
                             listing.instances, OWNER)
            apisix_double.fail_next(1, 500)
            (o,) = await conn.apply(SVC, p, base.ApplyContext(TASK))
            assert not o.ok and o.temporary
            # APISIX's 400 (a host its schema refuses) is permanent and carries its error_msg
            (o,) = await conn.apply(SVC, planner.Plan(creates=(conn.representable(copy("a*b")),)),
                                    base.ApplyContext(TASK))
            assert not o.ok and not o.temporary and "invalid configuration" in o.error
            assert await conn.health() is None
        wrong = base.Endpoint("apisix", "apisix", (apisix_double.url,), token="not-the-key")
        async with connector(wrong) as conn:
            with pytest.raises(errors.ReadError) as info:
                await conn.list_instances(SVC)
            assert "401" in str(info.value) and "not-the-key" not in str(info.value)
            assert DEFAULT_ADMIN_KEY not in str(info.value)
        async with connector(base.Endpoint("apisix", "apisix", (f"127.0.0.1:{peers.alloc.one()}",))) as down:
            with pytest.raises(errors.ReadError):
                await down.list_instances(SVC)
            (o,) = await down.apply(SVC, planner.Plan(creates=(copy("10.0.0.1"),)), base.ApplyContext(TASK))
            assert not o.ok and o.temporary
    asyncio.run(main())
    assert nodes(apisix_double) == {UP_DEFAULT: {"10.0.0.1:8080": 100}}


def test_a_node_taken_meanwhile_is_a_clash_and_a_changed_node_is_retried(apisix_double: ApisixAdminDouble) -> None:
    async def main() -> None:
        async with connector(endpoint(apisix_double)) as conn:
            await sync(conn, SVC, [copy("10.0.0.1")])
            listing = await conn.list_instances(SVC)
            p = planner.plan([conn.representable(copy("10.0.0.1", weight=2.0)), conn.representable(copy("10.0.0.2"))],
                             listing.instances, OWNER)
            # between the listing and the write an operator adds 10.0.0.2 and edits our node
            with admin(apisix_double) as api:
                api.patch(f"/upstreams/{UP_DEFAULT}/nodes", json=[
                    {"host": "10.0.0.1", "port": 8080, "weight": 9,
                     "metadata": {marks.TASK: TASK, marks.ORIGIN: SOURCE}},
                    {"host": "10.0.0.2", "port": 8080, "weight": 1}])
            outcomes = {o.op: o for o in await conn.apply(SVC, p, base.ApplyContext(TASK))}
            assert not outcomes["update"].ok and outcomes["update"].temporary
            assert not outcomes["create"].ok and not outcomes["create"].temporary
            assert "clash" in outcomes["create"].error
            # the next reconcile sets our node right and leaves theirs alone
            _, again = await sync(conn, SVC, [copy("10.0.0.1", weight=2.0), copy("10.0.0.2")])
            assert [o.op for o in again if o.ok] == ["update"]
    asyncio.run(main())
    assert nodes(apisix_double) == {UP_DEFAULT: {"10.0.0.1:8080": 200, "10.0.0.2:8080": 1}}


# ---- end to end with the engine -----------------------------------------------------------
def scenario_config(source_address: str, url: str, upstream_names: dict[str, str] | None = None,
                    **destination_options: Any) -> models.RegistryConfig:
    """conf/polaris-to-apisix.json with the source swapped for a memory registry of the same name
    (and `upstreamName`s given to groups by group name)."""
    doc = json.loads(json.dumps(loader.parse_text((ROOT / "conf" / "polaris-to-apisix.json").read_text(),
                                                  "polaris-to-apisix.json")[0]))
    task = doc["tasks"][0]
    task["source"] = {"name": SOURCE, "type": "memory", "addresses": [source_address]}
    task["destination"]["addresses"] = [url]
    task["destination"]["token"] = DEFAULT_ADMIN_KEY
    task["destination"]["options"].update(destination_options)
    for group in task["match"][0]["groups"]:
        if group["name"] in (upstream_names or {}):
            group["upstreamName"] = upstream_names[group["name"]]  # type: ignore[index]
    return loader.load_text(json.dumps(doc), "polaris-to-apisix.json")


def seed(store: memory.Store) -> None:
    for inst in (model.Instance("10.0.0.1", 8080, weight=1.0, metadata={"version": "1.0.0"}),
                 model.Instance("10.0.0.2", 8080, weight=2.0, metadata={"version": "1.0.0", "zone": "a"}),
                 model.Instance("10.0.0.3", 8080, weight=0.5, metadata={"version": "2.0.0"}),
                 model.Instance("10.0.0.4", 8080),
                 model.Instance("10.0.0.5", 8080, healthy=False, metadata={"version": "1.0.0"}),
                 model.Instance("10.0.0.6", 8080, enabled=False, metadata={"version": "2.0.0"})):
        store.put(SVC, inst)


EXPECTED = {
    UP_DEFAULT: {"10.0.0.1:8080": 100, "10.0.0.2:8080": 200, "10.0.0.3:8080": 50, "10.0.0.4:8080": 100},
    UP_V1: {"10.0.0.1:8080": 100, "10.0.0.2:8080": 200},
    UP_V2: {"10.0.0.3:8080": 50},
}


@contextlib.asynccontextmanager
async def running(cfg: models.RegistryConfig) -> AsyncIterator[engine_mod.Engine]:
    eng = engine_mod.Engine(registry.create, workers=4)
    await eng.start(cfg)
    try:
        yield eng
    finally:
        await eng.stop()


def test_polaris_sync_scenario_three_upstreams(apisix_double: ApisixAdminDouble,
                                               registry_store: tuple[str, memory.Store]) -> None:
    address, store = registry_store
    seed(store)

    async def main() -> None:
        async with running(scenario_config(address, apisix_double.url)) as eng:
            await eventually(lambda: nodes(apisix_double) == EXPECTED, 10, "the three upstreams")
            assert await eng.settle(10)
            before = writes(apisix_double)
            for key in list(eng.states):
                eng.queue.mark(key)
            assert await eng.settle(10)
            assert writes(apisix_double) == before
        assert nodes(apisix_double) == EXPECTED  # stopping deletes nothing
    asyncio.run(main())
    ups = apisix_double.state()["upstreams"]
    node = next(n for n in ups[UP_V1]["nodes"] if n["host"] == "10.0.0.2")
    assert node["metadata"] == {"version": "1.0.0", "zone": "a", marks.TASK: TASK, marks.ORIGIN: SOURCE}
    assert apisix_double.state()["routes"] == {}


def test_nodes_added_by_hand_survive_every_sync(apisix_double: ApisixAdminDouble,
                                                registry_store: tuple[str, memory.Store]) -> None:
    address, store = registry_store
    seed(store)

    async def main() -> None:
        async with running(scenario_config(address, apisix_double.url)) as eng:
            await eventually(lambda: nodes(apisix_double) == EXPECTED, 10, "the three upstreams")
            add_node_by_hand(apisix_double, UP_DEFAULT, {"host": "10.8.8.8", "port": 80, "weight": 10})
            add_node_by_hand(apisix_double, UP_V1, {"host": "10.0.0.9", "port": 8080, "weight": 10})
            store.remove(SVC, ("10.0.0.2", 8080))
            store.put(SVC, model.Instance("10.0.0.1", 8080, weight=3.0, metadata={"version": "1.0.0"}))
            store.put(SVC, model.Instance("10.0.0.9", 8080, weight=4.0, metadata={"version": "1.0.0"}))
            want = {
                UP_DEFAULT: {"10.0.0.1:8080": 300, "10.0.0.3:8080": 50, "10.0.0.4:8080": 100,
                             "10.0.0.9:8080": 400, "10.8.8.8:80": 10},
                UP_V1: {"10.0.0.1:8080": 300, "10.0.0.9:8080": 10},  # 10.0.0.9 there is a hand-made node
                UP_V2: EXPECTED[UP_V2],
            }
            await eventually(lambda: nodes(apisix_double) == want, 10, "the changes, hand-made nodes untouched")
            assert await eng.settle(10)
            assert {r["destination"]: r["clashes"] for r in eng.status()}[str(V1)] == 1
            before = writes(apisix_double)
            for key in list(eng.states):
                eng.queue.mark(key)
            assert await eng.settle(10)
            assert nodes(apisix_double) == want and writes(apisix_double) == before
            for host in ("10.0.0.3", "10.0.0.4"):
                store.remove(SVC, (host, 8080))
            want[UP_DEFAULT] = {"10.0.0.1:8080": 300, "10.0.0.9:8080": 400, "10.8.8.8:80": 10}
            await eventually(lambda: nodes(apisix_double)[UP_DEFAULT] == want[UP_DEFAULT], 10,
                             "owned nodes deleted, the hand-made one kept")
    asyncio.run(main())


def test_a_failed_source_read_leaves_nodes_unchanged(apisix_double: ApisixAdminDouble,
                                                     registry_store: tuple[str, memory.Store]) -> None:
    address, store = registry_store
    seed(store)

    async def main() -> None:
        async with running(scenario_config(address, apisix_double.url)) as eng:
            await eventually(lambda: nodes(apisix_double) == EXPECTED, 10, "the three upstreams")
            assert await eng.settle(10)
            before = writes(apisix_double)
            store.fail_reads = True
            store.remove(SVC, ("10.0.0.4", 8080))
            await eventually(lambda: all(s.failures >= 3 for s in eng.states.values()), 15,
                             "three failed reads of every unit")
            assert nodes(apisix_double) == EXPECTED and writes(apisix_double) == before
            store.fail_reads = False
            await eventually(lambda: "10.0.0.4:8080" not in nodes(apisix_double)[UP_DEFAULT], 10,
                             "the change once reads work again")
    asyncio.run(main())


def test_gateway_outage_then_the_current_state_arrives_within_10s(
        apisix_double: ApisixAdminDouble, registry_store: tuple[str, memory.Store]) -> None:
    address, store = registry_store
    seed(store)

    async def main() -> float:
        async with running(scenario_config(address, apisix_double.url)) as eng:
            await eventually(lambda: nodes(apisix_double) == EXPECTED, 10, "the three upstreams")
            apisix_double.set_down(True, mode="refuse")
            store.remove(SVC, ("10.0.0.4", 8080))
            store.put(SVC, model.Instance("10.0.0.7", 8080, weight=1.5, metadata={"version": "2.0.0"}))
            await eventually(lambda: all(s.failures >= 1 for s in eng.states.values()), 10, "failures while down")
            await asyncio.sleep(30.0)  # the outage itself: the 30 s the acceptance names
            apisix_double.set_down(False)
            back = time.monotonic()
            want = {
                UP_DEFAULT: {"10.0.0.1:8080": 100, "10.0.0.2:8080": 200, "10.0.0.3:8080": 50, "10.0.0.7:8080": 150},
                UP_V1: EXPECTED[UP_V1],
                UP_V2: {"10.0.0.3:8080": 50, "10.0.0.7:8080": 150},
            }
            await eventually(lambda: nodes(apisix_double) == want, RECOVERY_LIMIT + 25, "the state after it")
            return time.monotonic() - back

    took = asyncio.run(main())
    print(f"\napisix refused connections for 30 s: current state {took:.2f} s after the return")
    assert took < RECOVERY_LIMIT


# ---- a removed task retires the upstreams and routes it made ---------------------------------
OTHER_TASK = "another-task"
OTHER_SVC = model.ServiceKey("default", "", "other.service")
UP_OTHER = "default.other.service.default"


def routes(double: ApisixAdminDouble) -> dict[str, str]:
    """route id -> upstream_id."""
    return {rid: str(value.get("upstream_id")) for rid, value in double.state()["routes"].items()}


async def sync_then_remove(cfg: models.RegistryConfig, ready: Callable[[], bool],
                           between: Callable[[], None] = lambda: None) -> None:
    """Run `cfg` until `ready`, call `between`, then remove every task (a config without them)."""
    async with running(cfg) as eng:
        await eventually(ready, 10, "the synced state")
        assert await eng.settle(10)
        between()
        changes = await eng.apply_config(models.RegistryConfig())
        assert changes["removed"] == [TASK]


def another_tasks_objects(double: ApisixAdminDouble) -> None:
    """An upstream and a route another task made through the connector, plus hand-made ones."""
    async def main() -> None:
        async with connector(endpoint(double, create_routes=True)) as conn:
            other = planner.Owner(OTHER_TASK, SOURCE)
            _, outcomes = await sync(conn, OTHER_SVC, [copy("10.0.0.7", task=OTHER_TASK)], other)
            assert all(o.ok for o in outcomes)
    asyncio.run(main())
    with admin(double) as api:
        assert api.put("/upstreams/hand-made", json={"nodes": {"10.9.9.9:80": 1}}).status_code == 201
        assert api.put("/routes/hand-route", json={"uri": "/hand/*", "upstream_id": "hand-made"}).status_code == 201


def test_a_removed_task_leaves_none_of_its_upstreams_and_routes(apisix_double: ApisixAdminDouble,
                                                               registry_store: tuple[str, memory.Store]) -> None:
    address, store = registry_store
    seed(store)
    another_tasks_objects(apisix_double)
    others = {UP_OTHER: {"10.0.0.7:8080": 100}, "hand-made": {"10.9.9.9:80": 1}}
    cfg = scenario_config(address, apisix_double.url, {"version-1": "svc3-v1"}, create_routes=True)

    def named() -> None:  # the configured upstreamName is the upstream's name; its id stays derived
        assert apisix_double.state()["upstreams"][UP_V1]["name"] == "svc3-v1"

    # the removal runs `cleanup_units` with a connector of its own (as after a restart)
    asyncio.run(sync_then_remove(cfg, lambda: nodes(apisix_double) == {**EXPECTED, **others}, named))
    assert nodes(apisix_double) == others
    assert routes(apisix_double) == {UP_OTHER: UP_OTHER, "hand-route": "hand-made"}


def test_a_hand_added_node_keeps_its_upstream_and_route(apisix_double: ApisixAdminDouble,
                                                         registry_store: tuple[str, memory.Store]) -> None:
    address, store = registry_store
    seed(store)
    asyncio.run(sync_then_remove(
        scenario_config(address, apisix_double.url, create_routes=True), lambda: nodes(apisix_double) == EXPECTED,
        lambda: add_node_by_hand(apisix_double, UP_DEFAULT, {"host": "10.8.8.8", "port": 80, "weight": 10})))
    assert nodes(apisix_double) == {UP_DEFAULT: {"10.8.8.8:80": 10}}
    assert routes(apisix_double) == {UP_DEFAULT: UP_DEFAULT}  # it still routes to the hand-added node


def test_hand_made_upstream_and_routes_are_untouched(apisix_double: ApisixAdminDouble,
                                                     registry_store: tuple[str, memory.Store]) -> None:
    """An upstream and a route made by hand with the ids the task would use, and a hand route that uses
    one of the task's upstreams: APISIX refuses to delete an upstream in use, so that one stays too."""
    address, store = registry_store
    seed(store)
    with admin(apisix_double) as api:
        assert api.put(f"/upstreams/{UP_DEFAULT}", json={"nodes": {}, "labels": {"team": "a"}}).status_code == 201
        assert api.put(f"/routes/{UP_DEFAULT}", json={"uri": "/team-a/*", "upstream_id": UP_DEFAULT}
                       ).status_code == 201

    def hand_route_on_v1() -> None:
        with admin(apisix_double) as api:
            assert api.put("/routes/uses-v1", json={"uri": "/v1/*", "upstream_id": UP_V1}).status_code == 201

    asyncio.run(sync_then_remove(scenario_config(address, apisix_double.url, create_routes=True),
                                 lambda: nodes(apisix_double) == EXPECTED, hand_route_on_v1))
    assert nodes(apisix_double) == {UP_DEFAULT: {}, UP_V1: {}}
    assert apisix_double.state()["upstreams"][UP_DEFAULT]["labels"] == {"team": "a"}
    assert routes(apisix_double) == {UP_DEFAULT: UP_DEFAULT, "uses-v1": UP_V1}
    assert apisix_double.state()["routes"][UP_DEFAULT]["uri"] == "/team-a/*"


def test_another_tasks_upstream_is_never_retired(apisix_double: ApisixAdminDouble) -> None:
    another_tasks_objects(apisix_double)
    before = apisix_double.state()

    async def main() -> list[base.Retired]:
        async with connector(endpoint(apisix_double)) as conn:
            return await conn.retire(OTHER_SVC, base.ApplyContext(TASK))

    (kept,) = asyncio.run(main())
    assert (kept.kind, kept.action) == ("upstream", base.KEPT) and "not made by task" in kept.reason
    assert apisix_double.state() == before


def test_failed_reads_and_writes_while_retiring_delete_nothing_more(
        apisix_double: ApisixAdminDouble, registry_store: tuple[str, memory.Store],
        monkeypatch: pytest.MonkeyPatch) -> None:
    address, store = registry_store
    seed(store)
    cfg = scenario_config(address, apisix_double.url, create_routes=True)

    async def synced() -> None:
        async with running(cfg):
            await eventually(lambda: nodes(apisix_double) == EXPECTED, 10, "the three upstreams")
    asyncio.run(synced())  # stopped: the copies stay

    async def retire(key: model.ServiceKey) -> list[base.Retired]:
        async with connector(endpoint(apisix_double)) as conn:
            return await conn.retire(key, base.ApplyContext(TASK))

    apisix_double.fail_next(1, 500)  # the first read of the retirement
    (failed,) = asyncio.run(retire(V1))
    assert failed.action == base.FAILED and "HTTP 500" in failed.reason
    assert set(nodes(apisix_double)) == set(EXPECTED)

    # the route's delete fails: its upstream (next in line) stays; the cleanup goes on and returns
    answer(monkeypatch, apisix_double, "DELETE", f"/apisix/admin/routes/{UP_DEFAULT}",
           json_reply(500, {"error_msg": "etcd is down"}))
    deleted = asyncio.run(engine_mod.Engine(registry.create).cleanup_task(cfg.tasks[0]))
    assert deleted == 7
    assert nodes(apisix_double) == {UP_DEFAULT: {}}
    assert routes(apisix_double) == {UP_DEFAULT: UP_DEFAULT}
    monkeypatch.undo()
    route, upstream = asyncio.run(retire(SVC))
    assert [(r.kind, r.action) for r in (route, upstream)] == [("route", base.DELETED), ("upstream", base.DELETED)]
    assert nodes(apisix_double) == {} and routes(apisix_double) == {}
