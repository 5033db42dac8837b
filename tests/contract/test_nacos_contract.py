"""The registry contract and Nacos-specific behaviour, against a real Nacos 3.x from the sandbox.

Beyond the shared suite: groups round trip, the ephemeral/persistent choice for
copies (what heartbeats, the preserved timeouts and persistence do over 40 s), the
refusal to mix ephemeral and persistent instances in one service, that writes leave no
overlay at a copy's address (one register per write, nothing lingers after a delete),
watch latency, and login (auth on) with a clear error for a wrong password.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
import uuid
from collections.abc import Iterator

import pytest

from syncworker import errors, marks, model
from syncworker.connectors import base, registry
from syncworker.connectors.nacos import NacosConnector
from syncworker.reconcile import engine, planner
from syncworker.sandbox import base as sandbox
from tests.contract import nacos_helpers as nh
from tests.contract.registry_suite import RegistryContract, copy, fresh_service, wait_listing

pytestmark = pytest.mark.peers

Loop = asyncio.AbstractEventLoop
OWNER = planner.Owner("contract-task", "contract-origin")
CTX = base.ApplyContext(task="contract-task")


@pytest.fixture(scope="module")
def nacos(peers) -> sandbox.Running:  # type: ignore[no-untyped-def]
    return peers.get("nacos")


@pytest.fixture(scope="module")
def http(nacos: sandbox.Running) -> str:
    return nacos.endpoints["http"]


@pytest.fixture(scope="module")
def checked_http(peers) -> str:  # type: ignore[no-untyped-def]
    """A Nacos that runs its own health checks (TCP checks, heartbeat expiry), as in production.

    The sandbox's default Nacos switches them off so made-up addresses cause no traffic;
    tests here use 127.0.0.0/8 addresses only.
    """
    return peers.get("nacos", health_checks=True).endpoints["http"]


def _open(loop: Loop, ep: base.Endpoint) -> NacosConnector:
    conn = NacosConnector(ep)
    loop.run_until_complete(conn.open())
    return conn


@pytest.fixture(scope="module")
def connector(loop: Loop, http: str) -> Iterator[NacosConnector]:
    conn = _open(loop, nh.endpoint(http))
    yield conn
    loop.run_until_complete(conn.close())


@pytest.fixture(scope="module")
def unreachable(loop: Loop) -> Iterator[NacosConnector]:
    conn = _open(loop, nh.endpoint(f"127.0.0.1:{nh.closed_port()}", timeout=1.0))
    yield conn
    loop.run_until_complete(conn.close())


@pytest.fixture
def namespace() -> str:
    return ""


def _apply(loop: Loop, conn: NacosConnector, svc: model.ServiceKey, plan: planner.Plan) -> list[base.Outcome]:
    outcomes = loop.run_until_complete(conn.apply(svc, plan, CTX))
    assert all(o.ok for o in outcomes), outcomes
    return outcomes


def _create(loop: Loop, conn: NacosConnector, svc: model.ServiceKey, *insts: model.Instance) -> None:
    _apply(loop, conn, svc, planner.Plan(creates=tuple(conn.representable(i) for i in insts)))


def _cleanup(loop: Loop, conn: NacosConnector, svc: model.ServiceKey) -> None:
    listing = loop.run_until_complete(conn.list_instances(svc))
    mine = tuple(i for i in listing.instances if marks.owner(i.metadata) == OWNER.task)
    if mine:
        loop.run_until_complete(conn.apply(svc, planner.Plan(deletes=mine), CTX))


class TestNacosContract(RegistryContract):
    """The shared suite (copies go into fresh services: ephemeral, the default for a new service)."""


class TestNacosGroupContract(RegistryContract):
    """The shared suite again, in a non-default Nacos group."""

    group = "SYNC_GROUP"


#: Nacos 3.x keeps the 2.x HTTP APIs behind these switches (client on by default, admin and console off)
V1_COMPATIBILITY = {"nacos.core.api.compatibility.client.enabled": "true",
                    "nacos.core.api.compatibility.admin.enabled": "true",
                    "nacos.core.api.compatibility.console.enabled": "true"}


@pytest.fixture(scope="module")
def v1_http(peers) -> str:  # type: ignore[no-untyped-def]
    """A Nacos 3.1 that also answers the 2.x HTTP APIs: no 2.x server can be built on this machine,
    so the connector's 2.x path (`api: v1`) is checked against 3.1's compatibility layer."""
    return peers.get("nacos", properties=V1_COMPATIBILITY).endpoints["http"]


class TestNacosV1ApiContract(RegistryContract):
    """The shared suite through the 2.x HTTP APIs (`/v1/ns/...`, the v1 catalog), as on a Nacos 2.x server."""

    @pytest.fixture
    def connector(self, loop: Loop, v1_http: str) -> Iterator[NacosConnector]:
        conn = _open(loop, nh.endpoint(v1_http, api="v1"))
        assert loop.run_until_complete(conn.api()) == "v1"
        yield conn
        loop.run_until_complete(conn.close())


def test_v1_api_watch_yields_a_change(loop: Loop, v1_http: str) -> None:
    """The 2.x path's watch (a single service polled through `/v1/ns/instance/list`) sees a change."""
    conn = _open(loop, nh.endpoint(v1_http, api="v1"))
    svc = fresh_service("")

    async def scenario() -> None:
        gen = conn.watch([svc], []).__aiter__()
        assert await asyncio.wait_for(gen.__anext__(), 10.0) is None
        with nh.raw(v1_http) as raw:
            raw.register(svc, "127.0.0.95", 9303, ephemeral=False, weight="2")
            try:
                deadline = time.monotonic() + 5
                while await asyncio.wait_for(gen.__anext__(), max(0.1, deadline - time.monotonic())) != svc:
                    pass
                listing = await conn.list_instances(svc)
                assert [(i.host, i.weight) for i in listing.instances] == [("127.0.0.95", 2.0)]
            finally:
                await gen.aclose()
                raw.deregister(svc, "127.0.0.95", 9303, ephemeral=False)

    try:
        loop.run_until_complete(scenario())
    finally:
        loop.run_until_complete(conn.close())


def test_registered_as_type_nacos() -> None:
    assert registry.connector_class("nacos") is NacosConnector


def test_group_round_trip(loop: Loop, connector: NacosConnector, http: str) -> None:
    """`GROUP__svc` in a task is Nacos group GROUP; DEFAULT_GROUP is the canonical empty group."""
    name = f"grp-{uuid.uuid4().hex[:8]}"
    svc = engine.parse_service("", f"ORDERS__{name}")
    assert svc == model.ServiceKey("", "ORDERS", name)
    assert engine.parse_service("", f"DEFAULT_GROUP__{name}") == model.ServiceKey("", "", name)
    want = connector.representable(copy("127.0.0.51", 8000))
    _create(loop, connector, svc, want)
    with nh.raw(http) as raw:
        recs = nh.wait_for(lambda: raw.records(svc))
        assert recs and recs[0]["ip"] == "127.0.0.51"
        assert raw.records(model.ServiceKey("", "", name)) == []  # not in DEFAULT_GROUP
    listing = loop.run_until_complete(wait_listing(connector, svc, lambda li: len(li.instances) == 1))
    assert list(listing.instances) == [want]
    assert svc in loop.run_until_complete(connector.list_services(""))
    _cleanup(loop, connector, svc)


def test_public_namespace_spellings(loop: Loop, connector: NacosConnector) -> None:
    """Canonical "" is Nacos "public"; the keys handed back keep the caller's spelling."""
    svc = fresh_service("")
    _create(loop, connector, svc, copy("127.0.0.52", 8000))
    loop.run_until_complete(wait_listing(connector, svc, lambda li: len(li.instances) == 1))
    as_public = model.ServiceKey("public", svc.group, svc.name)
    assert len(loop.run_until_complete(connector.list_instances(as_public)).instances) == 1
    assert as_public in loop.run_until_complete(connector.list_services("public"))
    _cleanup(loop, connector, svc)


def test_disabled_and_unhealthy_natives_are_listed(loop: Loop, connector: NacosConnector, http: str) -> None:
    svc = fresh_service("")
    with nh.raw(http) as raw:
        assert raw.register(svc, "127.0.0.61", 9000, ephemeral=False, enabled="false")["status"] == 200
        assert raw.register(svc, "127.0.0.62", 9000, ephemeral=False, healthy="false",
                            metadata={"zone": "z9", "protocol": "grpc"})["status"] == 200
        listing = loop.run_until_complete(wait_listing(connector, svc, lambda li: len(li.instances) == 2))
        got = {i.host: i for i in listing.instances}
        assert got["127.0.0.61"].enabled is False
        assert got["127.0.0.62"].protocol == "grpc" and got["127.0.0.62"].metadata["zone"] == "z9"
        assert all(i.ephemeral is False and i.native_id for i in listing.instances)
        raw.deregister(svc, "127.0.0.61", 9000, ephemeral=False)
        raw.deregister(svc, "127.0.0.62", 9000, ephemeral=False)


def test_protocol_lives_in_metadata(loop: Loop, connector: NacosConnector) -> None:
    svc = fresh_service("")
    want = connector.representable(copy("127.0.0.63", 9000, protocol="grpc"))
    assert want.metadata["protocol"] == "grpc"
    _create(loop, connector, svc, want)
    listing = loop.run_until_complete(wait_listing(connector, svc, lambda li: len(li.instances) == 1))
    assert listing.instances[0] == want and listing.instances[0].protocol == "grpc"
    _cleanup(loop, connector, svc)


def test_weights_round_trip_and_clamp(loop: Loop, connector: NacosConnector) -> None:
    svc = fresh_service("")
    wanted = [connector.representable(copy("127.0.0.64", 9000 + n, weight=w))
              for n, w in enumerate((0.0, 0.01, 1.0, 3.3333333, 10000.0, 25000.0))]
    assert wanted[-1].weight == 10000.0
    _create(loop, connector, svc, *wanted)
    listing = loop.run_until_complete(wait_listing(connector, svc, lambda li: len(li.instances) == len(wanted)))
    assert planner.plan(wanted, listing.instances, OWNER).empty
    _cleanup(loop, connector, svc)


# ---- ephemeral or persistent ----------------------------------------------------------------
def test_copies_follow_an_ephemeral_service(loop: Loop, connector: NacosConnector, http: str) -> None:
    """A service with ephemeral natives gets ephemeral copies, carrying the preserved timeouts."""
    svc = fresh_service("")
    with nh.raw(http) as raw:
        native = raw.register(svc, "127.0.0.71", 9100, ephemeral=True,
                              metadata={"preserved.ip.delete.timeout": "120000",
                                        "preserved.heart.beat.timeout": "120000"})
        assert native["status"] == 200, native
        loop.run_until_complete(wait_listing(connector, svc, lambda li: len(li.instances) == 1))
        _create(loop, connector, svc, copy("127.0.0.72", 9100))
        recs = nh.wait_for(lambda: [r for r in raw.records(svc) if r["ip"] == "127.0.0.72"])
        assert recs[0]["ephemeral"] is True
        assert recs[0]["metadata"]["preserved.ip.delete.timeout"] == "600000"
        raw.deregister(svc, "127.0.0.71", 9100, ephemeral=True)
    _cleanup(loop, connector, svc)


def test_copies_follow_a_persistent_service(loop: Loop, connector: NacosConnector, http: str) -> None:
    svc = fresh_service("")
    with nh.raw(http) as raw:
        assert raw.register(svc, "127.0.0.73", 9100, ephemeral=False)["status"] == 200
        loop.run_until_complete(wait_listing(connector, svc, lambda li: len(li.instances) == 1))
        want = connector.representable(copy("127.0.0.74", 9100))
        _create(loop, connector, svc, want)
        recs = nh.wait_for(lambda: [r for r in raw.records(svc) if r["ip"] == "127.0.0.74"])
        assert recs[0]["ephemeral"] is False
        assert "preserved.ip.delete.timeout" not in recs[0]["metadata"]
        assert raw.checker(svc) == "TCP"  # a cluster with persistent natives keeps Nacos's check
        listing = loop.run_until_complete(wait_listing(connector, svc, lambda li: len(li.instances) == 2))
        assert want in listing.instances
        raw.deregister(svc, "127.0.0.73", 9100, ephemeral=False)
    _cleanup(loop, connector, svc)
    assert loop.run_until_complete(wait_listing(connector, svc, lambda li: not li.instances)).instances == ()


def test_a_persistent_service_refuses_ephemeral_natives(loop: Loop, http: str) -> None:
    """Why copies are not persistent by default: a persistent copy would lock the service.

    Nacos 2.x/3.x keep one kind of instance per service, so an application that
    registers itself (SDKs register ephemeral instances) into a service holding
    persistent copies is refused.
    """
    svc = fresh_service("")
    conn = _open(loop, nh.endpoint(http, copies="persistent"))
    try:
        _create(loop, conn, svc, copy("127.0.0.75", 9100))
        with nh.raw(http) as raw:
            nh.wait_for(lambda: raw.records(svc))
            refused = raw.register(svc, "127.0.0.76", 9100, ephemeral=True)
            assert refused["status"] != 200, refused
            assert "persistent" in str(refused).lower(), refused
        _cleanup(loop, conn, svc)
    finally:
        loop.run_until_complete(conn.close())


def test_liveness_over_40s(loop: Loop, checked_http: str) -> None:
    """What keeps copies alive, measured over 40 s with nobody else beating them.

    - ephemeral copies with the default preserved timeouts (unhealthy after 60 s,
      deleted after 600 s) outlive a 40 s pause of the sync process untouched;
    - with short preserved timeouts (unhealthy after 6 s, deleted after 12 s)
      `heartbeat()` keeps a copy healthy and present, and a copy left without beats
      turns unhealthy and then is deleted by Nacos: the preserved keys are honoured;
    - persistent copies need no heartbeat at all, and keep the health they were written
      with although Nacos TCP-checks persistent instances (their cluster's check is off).
    """
    http = checked_http
    default = _open(loop, nh.endpoint(http, name="nacos-default"))
    short = _open(loop, nh.endpoint(http, name="nacos-short", ephemeral_unhealthy_after=6,
                                    ephemeral_delete_after=12))
    persistent = _open(loop, nh.endpoint(http, name="nacos-persistent", copies="persistent"))
    s_default, s_short, s_persistent = fresh_service(""), fresh_service(""), fresh_service("")
    try:
        _create(loop, default, s_default, copy("127.0.0.81", 9200))
        beaten = short.representable(copy("127.0.0.82", 9200))
        _create(loop, short, s_short, beaten, copy("127.0.0.83", 9200))
        _create(loop, persistent, s_persistent, copy("127.0.0.84", 9200))
        with nh.raw(http) as raw:
            for svc in (s_default, s_short, s_persistent):
                assert nh.wait_for(lambda svc=svc: raw.records(svc)), svc
        assert loop.run_until_complete(short.list_instances(s_short)).instances
        seen_unhealthy = False
        deadline = time.monotonic() + 40.0
        while time.monotonic() < deadline:
            loop.run_until_complete(short.heartbeat(s_short, [beaten]))
            loop.run_until_complete(asyncio.sleep(2.0))
            by_host = {i.host: i for i in loop.run_until_complete(short.list_instances(s_short)).instances}
            assert by_host["127.0.0.82"].healthy, "the beaten copy went unhealthy"
            unbeaten = by_host.get("127.0.0.83")
            seen_unhealthy = seen_unhealthy or (unbeaten is not None and not unbeaten.healthy)
        by_host = {i.host: i for i in loop.run_until_complete(short.list_instances(s_short)).instances}
        assert "127.0.0.83" not in by_host, "the unbeaten copy outlived its preserved delete timeout"
        assert seen_unhealthy, "the unbeaten copy never went unhealthy before it was deleted"
        for conn, svc, host in ((default, s_default, "127.0.0.81"), (persistent, s_persistent, "127.0.0.84")):
            listing = loop.run_until_complete(conn.list_instances(svc))
            assert [(i.host, i.healthy) for i in listing.instances] == [(host, True)], (svc, listing)
    finally:
        for conn, svc in ((default, s_default), (short, s_short), (persistent, s_persistent)):
            _cleanup(loop, conn, svc)
            loop.run_until_complete(conn.close())


def test_persistent_copies_switch_their_cluster_check_off(loop: Loop, http: str) -> None:
    conn = _open(loop, nh.endpoint(http, copies="persistent"))
    svc = fresh_service("")
    try:
        want = conn.representable(copy("127.0.0.85", 9200, cluster="C9"))
        _create(loop, conn, svc, want)
        with nh.raw(http) as raw:
            assert nh.wait_for(lambda: raw.checker(svc, "C9") == "NONE")
        loop.run_until_complete(conn.heartbeat(svc, [want]))  # persistent: no beat is sent
        loop.run_until_complete(conn.heartbeat(svc, [want]))  # no beat API call for persistent records
    finally:
        _cleanup(loop, conn, svc)
        loop.run_until_complete(conn.close())


# ---- no overlay at a copy's address -----------------------------------------------------------
#: liveness for natives registered here, so that nobody needs to beat them during a test
_NATIVE_LIVENESS = {"preserved.heart.beat.interval": "5000", "preserved.heart.beat.timeout": "120000",
                    "preserved.ip.delete.timeout": "120000"}


def _requests(conn: NacosConnector) -> list[tuple[str, str]]:
    """Record (method, path) of every request the connector sends from now on."""
    sent: list[tuple[str, str]] = []
    send = conn._send

    async def counting(method: str, path: str, **kw):  # type: ignore[no-untyped-def]
        sent.append((method, path))
        return await send(method, path, **kw)

    conn._send = counting  # type: ignore[method-assign]
    return sent


def _record(raw: nh.Raw, svc: model.ServiceKey, ip: str, port: int, check) -> dict:  # type: ignore[no-untyped-def]
    """The record at ip:port once `check` accepts it (Nacos serves reads from a cache)."""
    found: dict = {}

    def probe() -> bool:
        recs = [r for r in raw.records(svc) if r["ip"] == ip and r["port"] == port]
        found.clear()
        found.update(recs[0] if recs else {})
        return bool(recs) and bool(check(recs[0]))

    nh.wait_for(probe)
    return found


@pytest.mark.parametrize("kind", ["ephemeral", "persistent"])
def test_copies_leave_no_overlay_at_their_address(loop: Loop, http: str, kind: str) -> None:
    """A copy is written by one register, an update by a register again, and nothing lingers.

    Nacos lays what its instance update API (PUT) sets over any later registration at the
    address, even after a delete (the module docstring of the connector). The connector
    never sends one: an update replaces the record whole (a metadata key dropped is gone),
    and an application registering at the address of a copy, or at one the sync just freed,
    reads as itself, with no ownership mark.
    """
    ephemeral = kind == "ephemeral"
    conn = _open(loop, nh.endpoint(http, name=f"nacos-{kind}", copies=kind))
    svc = fresh_service("")
    ip, port, freed = "127.0.0.91", 9300, "127.0.0.92"
    try:
        sent = _requests(conn)
        first = conn.representable(copy(ip, port, weight=2.0, metadata={"gone": "soon"}))
        other = conn.representable(copy(freed, port, weight=5.0))
        _create(loop, conn, svc, first, other)
        writes = [r for r in sent if r[0] != "GET"]
        assert [m for m, path in writes if path.endswith("/ns/instance")] == ["POST", "POST"], writes
        listing = loop.run_until_complete(wait_listing(conn, svc, lambda li: len(li.instances) == 2))
        second = conn.representable(copy(ip, port, weight=4.0, enabled=False, metadata={"zone": "z2"}))
        plan = planner.plan([second, other], listing.instances, OWNER)
        assert len(plan.updates) == 1 and not plan.creates and not plan.deletes, plan
        sent.clear()
        _apply(loop, conn, svc, plan)
        assert [r for r in sent if r[0] != "GET"] == [("POST", "/v3/admin/ns/instance")], sent
        listing = loop.run_until_complete(wait_listing(conn, svc, lambda li: second in li.instances))
        assert second in listing.instances and "gone" not in dict(second.metadata)
        # the sync frees one address; an application takes it right away (within Nacos's
        # expiry of instance metadata, about 60 s, so a leftover overlay would show)
        _apply(loop, conn, svc, planner.Plan(deletes=(other,)))
        with nh.raw(http) as raw:
            assert nh.wait_for(lambda: not [r for r in raw.records(svc) if r["ip"] == freed])
            # at the copy's address, the application's record replaces the copy's (Nacos keeps one
            # record per ip:port and kind: over HTTP an ephemeral client is its ip:port)
            targets = [(freed, "app-on-freed"), (ip, "app-on-copy")]
            for host, who in targets:
                answer = raw.call("POST", "/v3/client/ns/instance" if ephemeral else "/v3/admin/ns/instance",
                                  **raw._form(svc, host, port), ephemeral=str(ephemeral).lower(), weight=3.0,
                                  metadata=json.dumps({"who": who, **_NATIVE_LIVENESS}))
                assert answer["status"] == 200, answer
            for host, who in targets:
                rec = _record(raw, svc, host, port, lambda r, who=who: r["metadata"].get("who") == who)
                assert rec.get("metadata", {}).get("who") == who, rec
                assert rec["weight"] == 3.0 and rec["enabled"] is True, rec
                assert not marks.is_copy(rec["metadata"]), rec
                assert set(rec["metadata"]) == {"who", *_NATIVE_LIVENESS}, rec
            for host, _ in targets:
                raw.deregister(svc, host, port, ephemeral=ephemeral)
    finally:
        _cleanup(loop, conn, svc)
        loop.run_until_complete(conn.close())


# ---- watch ----------------------------------------------------------------------------------
def test_watch_yields_changes_within_a_second(loop: Loop, connector: NacosConnector, http: str) -> None:
    """Both ways of watching: a single service (polled alone) and a whole namespace ("*")."""
    single = fresh_service("")
    in_namespace = fresh_service("", "WATCH_GROUP")
    latencies: dict[str, list[float]] = {"single service": [], "whole namespace": []}

    async def scenario() -> None:
        by_service = connector.watch([single], []).__aiter__()
        by_namespace = connector.watch([], [""]).__aiter__()
        for gen in (by_service, by_namespace):
            assert await asyncio.wait_for(gen.__anext__(), 10.0) is None  # baseline read: reconcile all

        async def expect(gen, key: model.ServiceKey, change) -> None:  # type: ignore[no-untyped-def]
            started = time.monotonic()
            await asyncio.to_thread(change)
            while True:
                event = await asyncio.wait_for(gen.__anext__(), 5.0)
                if event == key:
                    latencies["single service" if key == single else "whole namespace"].append(
                        time.monotonic() - started)
                    return

        with nh.raw(http) as raw:
            for gen, key in ((by_service, single), (by_namespace, in_namespace)):
                for n in range(8):
                    await expect(gen, key, lambda key=key, n=n: raw.register(
                        key, "127.0.0.91", 9300, ephemeral=False, weight=str(1 + n), enabled=str(n % 2 == 0).lower()))
                await expect(gen, key, lambda key=key: raw.deregister(key, "127.0.0.91", 9300, ephemeral=False))
        for gen in (by_service, by_namespace):
            await gen.aclose()

    loop.run_until_complete(scenario())
    for way, seen in latencies.items():
        print(f"\nnacos watch ({way}), {len(seen)} changes: write to event median "
              f"{statistics.median(seen):.3f} s, max {max(seen):.3f} s")
        assert max(seen) < 1.0, (way, sorted(seen))


# ---- auth -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nacos_auth(peers) -> sandbox.Running:  # type: ignore[no-untyped-def]
    return peers.get("nacos-auth")


@pytest.fixture(scope="module")
def auth_connector(loop: Loop, nacos_auth: sandbox.Running) -> Iterator[NacosConnector]:
    cred = nacos_auth.credentials
    conn = _open(loop, nh.endpoint(nacos_auth.endpoints["http"], user=cred["username"], password=cred["password"]))
    yield conn
    loop.run_until_complete(conn.close())


@pytest.fixture(scope="module")
def auth_unreachable(loop: Loop) -> Iterator[NacosConnector]:
    conn = _open(loop, nh.endpoint(f"127.0.0.1:{nh.closed_port()}", user="nacos", password="x", timeout=1.0))
    yield conn
    loop.run_until_complete(conn.close())


class TestNacosAuthContract(RegistryContract):
    """The shared suite with auth on: the connector logs in and sends its token."""

    @pytest.fixture
    def connector(self, auth_connector: NacosConnector) -> NacosConnector:
        return auth_connector

    @pytest.fixture
    def unreachable(self, auth_unreachable: NacosConnector) -> NacosConnector:
        return auth_unreachable

    def test_login_token_is_refreshed(self, loop: Loop, connector: NacosConnector) -> None:
        loop.run_until_complete(connector.list_services(""))
        token = connector._token
        assert token
        connector._token_expires = 0.0  # as if tokenTtl ran out
        loop.run_until_complete(connector.list_services(""))
        assert connector._token
        connector._token = "expired-or-revoked"  # the server answers 403: log in again once
        connector._token_expires = time.monotonic() + 3600
        loop.run_until_complete(connector.list_services(""))
        assert connector._token != "expired-or-revoked"

    def test_wrong_password_is_a_clear_error(self, loop: Loop, nacos_auth: sandbox.Running) -> None:
        secret = "not-the-password-" + uuid.uuid4().hex[:6]
        conn = _open(loop, nh.endpoint(nacos_auth.endpoints["http"], user="nacos", password=secret))
        try:
            with pytest.raises(errors.ReadError) as info:
                loop.run_until_complete(conn.list_services(""))
            text = str(info.value)
            assert "nacos-contract" in text and nacos_auth.endpoints["http"].split("//")[1].split("/")[0] in text
            assert "login" in text and "'nacos'" in text
            assert secret not in text
            outcomes = loop.run_until_complete(conn.apply(fresh_service(""), planner.Plan(
                creates=(conn.representable(copy("127.0.0.99", 9999)),)), CTX))
            # Nacos 3.1 answers a wrong password with HTTP 500 (an unknown user with 403), so the
            # failure may be marked temporary; it must say what to check and never show the secret
            assert not outcomes[0].ok and "password" in outcomes[0].error and secret not in outcomes[0].error
        finally:
            loop.run_until_complete(conn.close())

    def test_unknown_user_is_refused_for_good(self, loop: Loop, nacos_auth: sandbox.Running) -> None:
        conn = _open(loop, nh.endpoint(nacos_auth.endpoints["http"], user="nobody-" + uuid.uuid4().hex[:6],
                                       password="whatever"))
        try:
            outcomes = loop.run_until_complete(conn.apply(fresh_service(""), planner.Plan(
                creates=(conn.representable(copy("127.0.0.99", 9999)),)), CTX))
            assert not outcomes[0].ok and not outcomes[0].temporary
            assert "refused" in outcomes[0].error and "whatever" not in outcomes[0].error
        finally:
            loop.run_until_complete(conn.close())

    def test_no_credentials_is_refused(self, loop: Loop, nacos_auth: sandbox.Running) -> None:
        conn = _open(loop, nh.endpoint(nacos_auth.endpoints["http"]))
        try:
            with pytest.raises(errors.ReadError) as info:
                loop.run_until_complete(conn.list_services(""))
            assert "403" in str(info.value) or "401" in str(info.value)
        finally:
            loop.run_until_complete(conn.close())


# ---- through the engine -------------------------------------------------------------------
def test_engine_two_way_with_memory(loop: Loop, checked_http: str) -> None:
    """memory <-> Nacos through the engine: copies both ways, no loop, the engine's heartbeats
    keep ephemeral copies healthy past their (short) preserved timeout, and stopping leaves them."""
    from syncworker.config import models
    from syncworker.connectors import memory

    name = f"eng-{uuid.uuid4().hex[:8]}"
    svc = model.ServiceKey("", "", name)
    mem_addr = f"mem-nacos-{uuid.uuid4().hex[:6]}"
    nacos_ep = {"name": "nacos1", "type": "nacos", "addresses": [checked_http],
                "options": {"ephemeral_unhealthy_after": 8, "ephemeral_delete_after": 16}}
    mem_ep = {"name": "mem1", "type": "memory", "addresses": [mem_addr]}
    cfg = models.RegistryConfig.model_validate({
        "tasks": [{"name": "mem-to-nacos", "source": mem_ep, "destination": nacos_ep,
                   "match": [{"namespace": "", "service": name}]},
                  {"name": "nacos-to-mem", "source": nacos_ep, "destination": mem_ep,
                   "match": [{"namespace": "", "service": name}]}],
        "methods": [{"type": "watch"}, {"type": "pull", "interval": "60s"}]})
    memory.store(mem_addr).put(svc, model.Instance("127.0.0.101", 9400, metadata={"from": "memory"}))

    async def scenario() -> None:
        eng = engine.Engine(registry.create, workers=4)
        await eng.start(cfg)
        try:
            reader = NacosConnector(nh.endpoint(checked_http))
            listing = await wait_listing(reader, svc, lambda li: len(li.instances) == 1)
            assert listing.instances[0].metadata.get(marks.ORIGIN) == "mem1"
            with nh.raw(checked_http) as raw:
                # an ephemeral native next to the copy (beaten by this test, as its SDK would)
                assert (await asyncio.to_thread(raw.register, svc, "127.0.0.102", 9400, ephemeral=True))["status"] \
                    == 200
                deadline = time.monotonic() + 25.0
                while time.monotonic() < deadline:
                    await asyncio.to_thread(raw.beat, svc, "127.0.0.102", 9400)
                    await asyncio.sleep(2.0)
                copies = memory.store(mem_addr).instances(svc)
                assert sorted(i.host for i in copies) == ["127.0.0.101", "127.0.0.102"]
                listing = await reader.list_instances(svc)
                by_host = {i.host: i for i in listing.instances}
                assert set(by_host) == {"127.0.0.101", "127.0.0.102"}  # no copy of a copy
                assert by_host["127.0.0.101"].healthy  # beaten by the engine past its 8 s timeout
                await asyncio.to_thread(raw.deregister, svc, "127.0.0.102", 9400, ephemeral=True)
            await reader.close()
        finally:
            await eng.stop()
        reader = NacosConnector(nh.endpoint(checked_http))
        listing = await reader.list_instances(svc)
        assert [i.host for i in listing.instances if marks.is_copy(i.metadata)] == ["127.0.0.101"]
        await reader.apply(svc, planner.Plan(deletes=tuple(
            i for i in listing.instances if marks.owner(i.metadata) == "mem-to-nacos")), CTX)
        await reader.close()

    loop.run_until_complete(scenario())


def _record_paths(conn: NacosConnector) -> list[str]:
    """The paths of every request `conn` sends from now on, in order (the list fills as it goes)."""
    sent: list[str] = []
    real_call = conn._call

    async def counting(method: str, path: str, **kw):  # type: ignore[no-untyped-def]
        sent.append(path)
        return await real_call(method, path, **kw)

    conn._call = counting  # type: ignore[method-assign]
    return sent


def test_namespace_watch_waits_while_the_engine_is_busy_and_loses_no_change(loop: Loop, http: str) -> None:
    """While `watch_busy` says the engine has a backlog, whole-namespace polls wait (a change is not
    yielded yet, no catalog request is sent); once it clears, the change made meanwhile is yielded."""
    conn = _open(loop, nh.endpoint(http))
    sent = _record_paths(conn)
    busy = [False]
    conn.watch_busy = lambda: busy[0]
    svc = fresh_service("", "BUSY_GROUP")

    async def scenario() -> None:
        with nh.raw(http) as raw:
            raw.register(svc, "127.0.0.94", 9302, ephemeral=False, weight="1")
            await asyncio.sleep(1.0)  # Nacos's read cache
            events: list[model.ServiceKey | None] = []

            async def consume() -> None:
                async for event in conn.watch([], [""]):
                    events.append(event)

            watching = asyncio.create_task(consume())
            try:
                deadline = time.monotonic() + 10
                while None not in events:  # the baseline
                    assert time.monotonic() < deadline, "no baseline"
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.3)  # ordinary polls after the baseline
                busy[0] = True
                raw.register(svc, "127.0.0.94", 9302, ephemeral=False, weight="3")
                before = len(sent)
                await asyncio.sleep(2.5)  # far longer than Nacos's read delay and the poll interval
                assert svc not in events
                assert not [p for p in sent[before:] if p.endswith("/service/list")], sent[before:]
                busy[0] = False
                started = time.monotonic()
                while svc not in events:
                    assert time.monotonic() - started < 5, "the change made while busy was never yielded"
                    await asyncio.sleep(0.02)
                print(f"\nnacos namespace watch: change made while busy yielded {time.monotonic() - started:.2f} s "
                      "after the backlog cleared")
            finally:
                watching.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watching
            raw.deregister(svc, "127.0.0.94", 9302, ephemeral=False)

    try:
        loop.run_until_complete(scenario())
    finally:
        loop.run_until_complete(conn.close())


def test_namespace_watch_baseline_answers_the_first_reads_once(loop: Loop, http: str) -> None:
    """A whole-namespace watch's baseline answers the next read of each service (no request), once;
    a service that changes afterwards is read for real, and nothing primed outlives the watch."""
    conn = _open(loop, nh.endpoint(http))
    sent = _record_paths(conn)
    calm, busy = fresh_service("", "PRIME_GROUP"), fresh_service("", "PRIME_GROUP")

    async def scenario() -> None:
        with nh.raw(http) as raw:
            for svc in (calm, busy):
                raw.register(svc, "127.0.0.93", 9301, ephemeral=False, metadata={"v": "1"})
            await asyncio.sleep(1.0)  # Nacos's read cache
            fresh = {svc: await conn.list_instances(svc) for svc in (calm, busy)}  # real reads
            gen = conn.watch([], [""]).__aiter__()
            assert await asyncio.wait_for(gen.__anext__(), 10.0) is None
            before = len(sent)
            assert await conn.list_instances(calm) == fresh[calm]  # from the baseline
            assert len(sent) == before, sent[before:]
            await conn.list_instances(calm)  # only once: this one is a real read
            assert len(sent) > before
            raw.register(busy, "127.0.0.93", 9301, ephemeral=False, metadata={"v": "2"})
            while await asyncio.wait_for(gen.__anext__(), 5.0) != busy:
                pass
            got = await conn.list_instances(busy)  # changed since the baseline: read for real
            assert [i.metadata.get("v") for i in got.instances] == ["2"], got
            await gen.aclose()
            assert conn._primed == {}

    try:
        loop.run_until_complete(scenario())
    finally:
        loop.run_until_complete(conn.close())
