"""The contract every registry connector keeps, run against each connector's real server.

A connector's test module subclasses `RegistryContract` and provides the
`connector` fixture (an opened connector on a real server) and `namespace`
(a namespace that exists there). Every test uses fresh service names, so the
suite can share one server with other tests.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from syncworker import marks, model
from syncworker.connectors import base
from syncworker.reconcile import planner

Loop = asyncio.AbstractEventLoop
Conn = base.Connector


def fresh_service(namespace: str, group: str = "") -> model.ServiceKey:
    return model.ServiceKey(namespace, group, f"contract-{uuid.uuid4().hex[:10]}")


def copy(host: str, port: int, task: str = "contract-task", **kw: object) -> model.Instance:
    meta = {"version": "1.0.0", marks.TASK: task, marks.ORIGIN: "contract-origin"}
    meta.update(kw.pop("metadata", {}))  # type: ignore[arg-type]
    return model.Instance(host=host, port=port, metadata=meta, **kw)  # type: ignore[arg-type]


async def wait_listing(conn: base.Connector, svc: model.ServiceKey, predicate, timeout: float = 10.0
                       ) -> base.Listing:  # type: ignore[no-untyped-def]
    """Some registries serve reads from a cache refreshed asynchronously: poll briefly."""
    deadline = asyncio.get_running_loop().time() + timeout
    listing = await conn.list_instances(svc)
    while not predicate(listing):
        if asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.2)
        listing = await conn.list_instances(svc)
    return listing


class RegistryContract:
    """Subclass and provide fixtures `connector`, `unreachable` and `namespace` (`loop` is shared)."""

    group = ""

    def ctx(self) -> base.ApplyContext:
        return base.ApplyContext(task="contract-task")

    def test_missing_service_lists_empty(self, loop: Loop, connector: Conn, namespace: str) -> None:
        listing = loop.run_until_complete(connector.list_instances(fresh_service(namespace, self.group)))
        assert listing.instances == ()

    def test_write_then_read_gives_representable(self, loop: Loop, connector: Conn, namespace: str) -> None:
        svc = fresh_service(namespace, self.group)
        wanted = [connector.representable(copy("127.0.0.11", 8080, weight=1.0)),
                  connector.representable(copy("127.0.0.12", 8081, weight=0.5, healthy=False,
                                                metadata={"zone": "z1"})),
                  connector.representable(copy("127.0.0.13", 8082, weight=2.0, enabled=False))]
        p = planner.plan(wanted, [], planner.Owner("contract-task", "contract-origin"))
        outcomes = loop.run_until_complete(connector.apply(svc, p, self.ctx()))
        assert all(o.ok for o in outcomes), outcomes
        listing = loop.run_until_complete(wait_listing(connector, svc, lambda li: len(li.instances) == 3))
        got = {i.address: i for i in listing.instances}
        for w in wanted:
            assert got[w.address] == w, f"read back {got[w.address]} != written {w}"
        # the law: planning again right after apply is empty
        again = planner.plan(wanted, listing.instances, planner.Owner("contract-task", "contract-origin"))
        assert again.empty, again
        loop.run_until_complete(connector.apply(svc, planner.Plan(deletes=tuple(listing.instances)), self.ctx()))

    def test_update_and_delete(self, loop: Loop, connector: Conn, namespace: str) -> None:
        svc = fresh_service(namespace, self.group)
        owner = planner.Owner("contract-task", "contract-origin")
        first = [connector.representable(copy("127.0.0.21", 9000)),
                 connector.representable(copy("127.0.0.22", 9000))]
        done = loop.run_until_complete(connector.apply(svc, planner.plan(first, [], owner), self.ctx()))
        assert all(o.ok for o in done)
        listing = loop.run_until_complete(wait_listing(connector, svc, lambda li: len(li.instances) == 2))
        second = [connector.representable(copy("127.0.0.21", 9000, weight=3.0, metadata={"version": "2"}))]
        p = planner.plan(second, listing.instances, owner)
        assert len(p.updates) == 1 and len(p.deletes) == 1
        assert all(o.ok for o in loop.run_until_complete(connector.apply(svc, p, self.ctx())))
        listing = loop.run_until_complete(wait_listing(connector, svc, lambda li: len(li.instances) == 1
                                   and li.instances[0] == second[0]))
        assert list(listing.instances) == second
        loop.run_until_complete(connector.apply(svc, planner.Plan(deletes=tuple(listing.instances)), self.ctx()))
        listing = loop.run_until_complete(wait_listing(connector, svc, lambda li: not li.instances))
        assert listing.instances == ()

    def test_list_services_finds_written_service(self, loop: Loop, connector: Conn, namespace: str) -> None:
        svc = fresh_service(namespace, self.group)
        inst = connector.representable(copy("127.0.0.31", 7000))
        loop.run_until_complete(connector.apply(svc, planner.Plan(creates=(inst,)), self.ctx()))
        deadline = 10.0
        found = False
        while deadline > 0 and not found:
            found = svc in loop.run_until_complete(connector.list_services(namespace))
            if not found:
                loop.run_until_complete(asyncio.sleep(0.25))
                deadline -= 0.25
        assert found, f"{svc} not listed in namespace {namespace!r}"
        loop.run_until_complete(connector.apply(svc, planner.Plan(creates=(), deletes=(inst,)), self.ctx()))

    def test_weights_are_canonical(self, loop: Loop, connector: Conn, namespace: str) -> None:
        """Canonical 1.0 is the registry's default weight; a native at the default reads as 1.0."""
        assert connector.default_weight > 0
        inst = connector.representable(copy("127.0.0.41", 7100, weight=1.0))
        assert inst.weight == pytest.approx(1.0)

    def test_unreachable_server_is_a_read_error(self, loop: Loop, unreachable: Conn, namespace: str) -> None:
        from syncworker import errors

        with pytest.raises(errors.ReadError):
            loop.run_until_complete(unreachable.list_instances(fresh_service(namespace, self.group)))
        with pytest.raises(errors.ReadError):
            loop.run_until_complete(unreachable.list_services(namespace))
