"""Two-way hot migration Nacos <-> Polaris through a `syncworker run` child: propagation and clashes.

Natives are written straight into the registries (through the connectors, or the servers'
APIs as an application would), never with marks; the child runs conf/sync-registry.json's
two tasks on a namespace of the test's own.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from typing import Any

import httpx
import pytest

from syncworker import marks, model
from syncworker.sandbox import base as sandbox_base
from tests.contract import nacos_helpers
from tests.e2e.conftest import StartSync
from tests.e2e.helpers import (
    N2P,
    NACOS,
    NATIVE_TTL,
    P2N,
    POLARIS,
    Natives,
    RawReader,
    Side,
    SyncChild,
    converge,
    fresh_namespace,
    nacos_endpoint,
    nacos_view,
    polaris_endpoint,
    polaris_view,
    rows_of,
    total_ops,
    two_way,
    two_way_problems,
)

pytestmark = pytest.mark.peers

#: how long a change may take to show on the other side (watch p99 < 1 s; generous for a loaded box)
PROPAGATION = 20.0


def inst(host: str, port: int, **fields: Any) -> model.Instance:
    return model.Instance(host=host, port=port, **fields)


def record(records: Mapping[tuple[str, str, int], Mapping[str, Any]], service: str, native: model.Instance
           ) -> Mapping[str, Any]:
    rec = records.get((service, native.host, native.port))
    assert rec is not None, f"no record of {service} {native.host}:{native.port} in {sorted(records)}"
    return rec


def assert_polaris_copy(rec: Mapping[str, Any], native: model.Instance) -> None:
    """A Polaris record is the copy of a Nacos native: marks, Polaris weight = Nacos weight x 100, fields."""
    meta = rec["metadata"]
    assert meta[marks.ORIGIN] == NACOS and meta[marks.TASK] == N2P, rec
    assert rec["weight"] == round(native.weight * 100), rec
    assert rec["healthy"] is native.healthy and rec["isolate"] is (not native.enabled), rec
    want = dict(native.metadata)
    assert (rec.get("version") or "") == want.pop("version", ""), rec  # a Polaris instance field
    for key, value in want.items():
        assert meta.get(key) == value, (key, rec)


def assert_nacos_copy(rec: Mapping[str, Any], native: model.Instance) -> None:
    """A Nacos record is the copy of a Polaris native: marks, Nacos weight = Polaris weight / 100, fields."""
    meta = rec["metadata"]
    assert meta[marks.ORIGIN] == POLARIS and meta[marks.TASK] == P2N, rec
    assert rec["weight"] == native.weight, rec
    assert rec["healthy"] is native.healthy and rec["enabled"] is native.enabled, rec
    for key, value in native.metadata.items():
        assert meta.get(key) == value, (key, rec)


def test_two_way_propagation(nacos: sandbox_base.Running, polaris: sandbox_base.Running,
                             start_sync: StartSync) -> None:
    """Adds, changes (weight, health, enabled, metadata) and removals on either side show on the other."""
    ns = fresh_namespace("two-way")
    n_ep, p_ep = nacos_endpoint(nacos), polaris_endpoint(polaris)
    grace = 4.0
    config = two_way(n_ep, p_ep, ns, pull="5s", safety={"empty_grace": f"{grace:g}s"})
    timings: dict[str, float] = {}

    async def scenario() -> None:
        n = await Side(NACOS, n_ep, ns, P2N).open()
        p = await Side(POLARIS, p_ep, ns, N2P).open()
        raw = RawReader(nacos, polaris)
        natives: dict[str, Natives] = {NACOS: {}, POLARIS: {}}

        async def put(side: Side, service: str, native: model.Instance) -> None:
            natives[side.name].setdefault(service, {})[native.address] = native
            await side.put(service, native)

        async def remove(side: Side, service: str, native: model.Instance) -> None:
            del natives[side.name][service][native.address]
            if not natives[side.name][service]:
                del natives[side.name][service]
            await side.remove(service, native)

        async def converged(what: str, timeout: float = PROPAGATION) -> None:
            timings[what] = await converge(lambda: two_way_problems(n, p, natives), timeout, what)

        try:
            # natives before the sync starts: the first reconcile copies them
            n1 = inst("127.0.1.1", 8080, weight=1.0, metadata={"app": "orders", "version": "1.0"})
            p1 = inst("127.0.2.1", 9090, weight=1.0, metadata={"app": "users", "zone": "z1"})
            await asyncio.gather(put(n, "orders", n1), put(p, "users", p1))
            child: SyncChild = start_sync(config)
            await converged("initial sync", 60.0)
            prs, nrs = await raw.polaris(ns), await raw.nacos(ns)
            assert_polaris_copy(record(prs, "orders", n1), n1)
            assert record(prs, "orders", n1)["weight"] == 100  # Nacos 1.0 == Polaris 100
            assert_nacos_copy(record(nrs, "users", p1), p1)
            assert record(nrs, "users", p1)["weight"] == 1.0  # Polaris 100 == Nacos 1.0

            # adds on both sides while it runs, in a service that lives in both registries
            n2 = inst("127.0.1.2", 8080, weight=2.0, metadata={"app": "mixed"})
            n3 = inst("127.0.1.3", 8080, metadata={"app": "mixed"})
            p2 = inst("127.0.2.2", 9090, weight=0.5, metadata={"app": "mixed"})
            p3 = inst("127.0.2.3", 9090, metadata={"app": "mixed"})
            await asyncio.gather(put(n, "mixed", n2), put(n, "mixed", n3), put(p, "mixed", p2), put(p, "mixed", p3))
            await converged("add")
            prs, nrs = await raw.polaris(ns), await raw.nacos(ns)
            assert record(prs, "mixed", n2)["weight"] == 200
            assert record(nrs, "mixed", p2)["weight"] == 0.5
            assert not marks.is_copy(record(prs, "mixed", p2)["metadata"])  # natives stay natives
            assert not marks.is_copy(record(nrs, "mixed", n2)["metadata"])

            # one field at a time, on both sides at once
            steps: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
                ("weight", {"weight": 3.0}, {"weight": 2.5}),
                ("health", {"healthy": False}, {"healthy": False}),
                ("enabled", {"enabled": False}, {"enabled": False}),
                ("metadata", {"metadata": {"app": "orders", "version": "1.1", "color": "blue"}},
                 {"metadata": {"app": "users", "zone": "z2", "tier": "gold"}}),
            ]
            for what, n_change, p_change in steps:
                n1, p1 = n1.replace(**n_change), p1.replace(**p_change)
                await asyncio.gather(put(n, "orders", n1), put(p, "users", p1))
                await converged(f"change {what}")
                prs, nrs = await raw.polaris(ns), await raw.nacos(ns)
                assert_polaris_copy(record(prs, "orders", n1), n1)
                assert_nacos_copy(record(nrs, "users", p1), p1)
            assert record(prs, "orders", n1)["weight"] == 300
            assert record(nrs, "users", p1)["weight"] == 2.5

            # removals: one of two (goes at once), then the last one of a service (after the empty grace)
            await asyncio.gather(remove(n, "mixed", n2), remove(p, "mixed", p2))
            await converged("remove")
            await asyncio.gather(remove(n, "orders", n1), remove(p, "users", p1))
            t0 = time.monotonic()
            await asyncio.sleep(1.0)
            prs, nrs = await raw.polaris(ns), await raw.nacos(ns)
            # a service that suddenly reads empty keeps its copies for the grace period
            assert ("orders", n1.host, n1.port) in prs, "copy deleted before the empty-source grace ran out"
            assert ("users", p1.host, p1.port) in nrs, "copy deleted before the empty-source grace ran out"
            await converged("remove last", grace + PROPAGATION)
            timings["remove last"] = time.monotonic() - t0

            async def all_ok() -> list[str]:
                # (a unit may still show "held deletes" for a while: a read right after its delete can
                # see the deleted copy in Nacos's read cache, and that delete is held again)
                rows = await asyncio.to_thread(child.status) or []
                return [f"{r['task']} {r['service']}: {r['outcome']} {r['error']}" for r in rows
                        if r["outcome"] != "ok"] or ([] if rows else ["no status"])

            await converge(all_ok, grace + PROPAGATION, "every unit ok in /status")
        finally:
            await asyncio.gather(n.close(), p.close(), raw.close())

    asyncio.run(scenario())
    print(f"two-way propagation (s): { {k: round(v, 2) for k, v in timings.items()} }")


# ---- natives at a copy's address ---------------------------------------------------------------
async def register_in_polaris(running: sandbox_base.Running, namespace: str, service: str, host: str, port: int,
                              **fields: Any) -> None:
    """A Polaris application's own registration (the OpenAPI, no marks)."""
    token = running.credentials.get("token", "")
    async with httpx.AsyncClient(timeout=10, trust_env=False,
                                 headers={"X-Polaris-Token": token} if token else {}) as c:
        resp = await c.post(f"{running.endpoints['http']}/naming/v1/instances", json=[
            {"namespace": namespace, "service": service, "host": host, "port": port, **fields}])
    assert resp.json().get("code") == 200000, resp.text


def clashes(child: SyncChild, task_name: str, namespace: str, service: str) -> int:
    rows = rows_of(child.status() or [], task_name, namespace, service)
    return int(rows[0]["clashes"]) if rows else -1


async def wait_clashes(child: SyncChild, task_name: str, namespace: str, service: str, at_least: int) -> None:
    async def check() -> list[str]:
        n = clashes(child, task_name, namespace, service)
        return [] if n >= at_least else [f"{task_name} {service}: /status shows {n} clash(es), want >= {at_least}"]

    await converge(check, PROPAGATION, "clash reported in /status")


def test_native_at_copy_address_untouched(nacos: sandbox_base.Running, polaris: sandbox_base.Running,
                                          start_sync: StartSync) -> None:
    """A native at the address of a copy is never changed nor deleted; the clash shows in /status."""
    ns = fresh_namespace("clash")
    svc = "clash"
    n_ep, p_ep = nacos_endpoint(nacos), polaris_endpoint(polaris)
    config = two_way(n_ep, p_ep, ns, pull="2s")

    async def scenario() -> None:
        n = await Side(NACOS, n_ep, ns, P2N).open()
        p = await Side(POLARIS, p_ep, ns, N2P).open()
        raw = RawReader(nacos, polaris)
        try:
            # (a) one address natively in both registries before the sync starts, next to plain natives
            n_a = inst("127.0.3.1", 7000, weight=1.0, metadata={"who": "nacos-app"})
            p_a = inst("127.0.3.1", 7000, weight=2.0, metadata={"who": "polaris-app"})
            n_ok = inst("127.0.3.2", 7000, metadata={"who": "nacos-app-2"})
            p_ok = inst("127.0.3.5", 7000, metadata={"who": "polaris-app-2"})
            await asyncio.gather(n.put(svc, n_a), n.put(svc, n_ok), p.put(svc, p_a), p.put(svc, p_ok))
            child = start_sync(config)

            async def plain_copies() -> list[str]:
                prs, nrs = await raw.polaris(ns), await raw.nacos(ns)
                out = []
                if not marks.is_copy((prs.get((svc, n_ok.host, n_ok.port)) or {}).get("metadata") or {}):
                    out.append("no copy of the Nacos native in Polaris yet")
                if not marks.is_copy((nrs.get((svc, p_ok.host, p_ok.port)) or {}).get("metadata") or {}):
                    out.append("no copy of the Polaris native in Nacos yet")
                return out

            await converge(plain_copies, 60.0, "the sync copies the service's other natives")
            await wait_clashes(child, N2P, ns, svc, 1)
            await wait_clashes(child, P2N, ns, svc, 1)

            # (b) a Polaris application registers at the address of a copy (dual registration while
            # migrating): its record replaces the copy and is a native from then on
            n_b = inst("127.0.3.3", 7000, metadata={"who": "nacos-app-b"})
            await n.put(svc, n_b)

            async def copied() -> list[str]:
                rec = (await raw.polaris(ns)).get((svc, n_b.host, n_b.port))
                return [] if rec and marks.is_copy(rec["metadata"]) else ["no copy of n_b in Polaris yet"]

            await converge(copied, PROPAGATION, "copy of n_b in Polaris")
            await register_in_polaris(polaris, ns, svc, n_b.host, n_b.port, weight=300,
                                      metadata={"who": "polaris-app-b"})
            await wait_clashes(child, N2P, ns, svc, 2)

            prs, nrs = await raw.polaris(ns), await raw.nacos(ns)
            watched_p = {k: polaris_view(prs[(svc, h, port)]) for k, (h, port) in
                         {"p_a": p_a.address, "p_b": n_b.address, "p_ok": p_ok.address}.items()}
            watched_n = {k: nacos_view(nrs[(svc, h, port)]) for k, (h, port) in
                         {"n_a": n_a.address, "n_ok": n_ok.address}.items()}
            assert not marks.is_copy(prs[(svc, *n_b.address)]["metadata"])

            async def untouched(seconds: float) -> None:
                """Poll both registries for `seconds`: every watched native exactly as it was."""
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    prs, nrs = await raw.polaris(ns), await raw.nacos(ns)
                    for k, (h, port) in {"p_a": p_a.address, "p_b": n_b.address, "p_ok": p_ok.address}.items():
                        rec = prs.get((svc, h, port))
                        assert rec is not None, f"Polaris native {k} at {h}:{port} was deleted"
                        assert polaris_view(rec) == watched_p[k], f"Polaris native {k} was changed: {rec}"
                    for k, (h, port) in {"n_a": n_a.address, "n_ok": n_ok.address}.items():
                        rec = nrs.get((svc, h, port))
                        assert rec is not None, f"Nacos native {k} at {h}:{port} was deleted"
                        assert nacos_view(rec) == watched_n[k], f"Nacos native {k} was changed: {rec}"
                    await asyncio.sleep(0.2)

            # the sync would now update its copy at n_b's address (weight), then delete it
            await n.put(svc, n_b.replace(weight=5.0))
            await untouched(5.0)  # more than two pull periods
            await n.remove(svc, n_b)
            await untouched(5.0)
            # with n_b gone from Nacos, the Polaris native at that address is copied into Nacos
            p_b = inst(n_b.host, n_b.port, weight=3.0, metadata={"who": "polaris-app-b"})

            async def p_b_copied() -> list[str]:
                rec = (await raw.nacos(ns)).get((svc, *p_b.address))
                if rec is None or rec["metadata"].get(marks.ORIGIN) != POLARIS:
                    return [f"no copy of the Polaris native at {p_b.address} in Nacos: {rec}"]
                assert_nacos_copy(rec, p_b)
                return []

            await converge(p_b_copied, PROPAGATION, "the native that replaced a copy is copied the other way")
            assert clashes(child, N2P, ns, svc) == 1  # n_a vs p_a remains
            assert clashes(child, P2N, ns, svc) == 1
        finally:
            await asyncio.gather(n.close(), p.close(), raw.close())

    asyncio.run(scenario())


def test_nacos_native_registered_over_a_copy_untouched(nacos: sandbox_base.Running, polaris: sandbox_base.Running,
                                                      start_sync: StartSync) -> None:
    """A Nacos application registers at the address of a copy: its record must be left alone."""
    ns = fresh_namespace("clash-nacos")
    svc = "clash"
    n_ep, p_ep = nacos_endpoint(nacos), polaris_endpoint(polaris)
    config = two_way(n_ep, p_ep, ns, pull="2s")
    p_c = inst("127.0.3.4", 7000, weight=1.0, metadata={"who": "polaris-app-c"})
    p_keep = inst("127.0.3.6", 7000, metadata={"who": "polaris-app-d"})

    async def scenario() -> None:
        n = await Side(NACOS, n_ep, ns, P2N).open()
        p = await Side(POLARIS, p_ep, ns, N2P).open()
        raw = RawReader(nacos, polaris)
        try:
            await asyncio.gather(p.put(svc, p_c), p.put(svc, p_keep))
            child = start_sync(config)

            async def copied() -> list[str]:
                nrs = await raw.nacos(ns)
                return [] if all((svc, *i.address) in nrs for i in (p_c, p_keep)) else ["copies not in Nacos yet"]

            await converge(copied, 60.0, "copies of the Polaris natives in Nacos")
            before = total_ops(child.status() or [])
            # an application registers itself through Nacos's client API (register only, as a client
            # does; long liveness so that it needs no heartbeat during the test)
            liveness = {"preserved.heart.beat.interval": "5000",
                        "preserved.heart.beat.timeout": str(NATIVE_TTL * 1000),
                        "preserved.ip.delete.timeout": str(NATIVE_TTL * 1000)}
            with nacos_helpers.raw(nacos.endpoints["http"]) as api:
                answer = await asyncio.to_thread(
                    api.call, "POST", "/v3/client/ns/instance", **api._form(n.key(svc), p_c.host, p_c.port),
                    ephemeral="true", weight=3.0, metadata=json.dumps({"who": "nacos-app-c", **liveness}))
            assert answer["status"] == 200, answer
            await asyncio.sleep(3.0)  # Nacos's push delay, then more than one pull period
            rec = (await raw.nacos(ns)).get((svc, *p_c.address))
            assert rec is not None, "the application's record is gone"
            assert total_ops(child.status() or []) == before, "the sync wrote over the application's record"
            assert rec["weight"] == 3.0 and rec["metadata"].get("who") == "nacos-app-c", (
                f"the application's record reads as the sync's copy: {rec}")
            await wait_clashes(child, P2N, ns, svc, 1)
            await p.remove(svc, p_c)  # the sync would now delete its copy at that address
            end = time.monotonic() + 5.0
            while time.monotonic() < end:
                rec = (await raw.nacos(ns)).get((svc, *p_c.address))
                assert rec is not None and rec["metadata"].get("who") == "nacos-app-c", rec
                await asyncio.sleep(0.2)
        finally:
            await asyncio.gather(n.close(), p.close(), raw.close())

    asyncio.run(scenario())
