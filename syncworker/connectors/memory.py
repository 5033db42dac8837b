"""An in-memory registry: a real connector over a process-local store.

Unit tests and the planner's property tests use it in place of a server: it
lists, watches and applies plans exactly as the interface says, and it can be
told to fail reads or writes, to check what the engine does then. Stores are
shared by name (the endpoint's first address), so two connectors configured with
`memory://a` see the same registry.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence
from typing import ClassVar

from syncworker import errors, model
from syncworker.connectors import base
from syncworker.reconcile import planner


@dataclasses.dataclass
class Store:
    services: dict[model.ServiceKey, dict[model.Address, model.Instance]] = dataclasses.field(
        default_factory=dict)
    fail_reads: bool = False
    fail_writes: bool = False
    watchers: list[asyncio.Queue[base.WatchEvent]] = dataclasses.field(default_factory=list)
    writes: int = 0

    def put(self, service: model.ServiceKey, inst: model.Instance) -> None:
        self.services.setdefault(service, {})[inst.address] = inst
        self.notify(service)

    def remove(self, service: model.ServiceKey, address: model.Address) -> None:
        self.services.get(service, {}).pop(address, None)
        self.notify(service)

    def instances(self, service: model.ServiceKey) -> list[model.Instance]:
        return list(self.services.get(service, {}).values())

    def notify(self, service: model.ServiceKey) -> None:
        for q in self.watchers:
            q.put_nowait(service)


STORES: dict[str, Store] = {}


def store(name: str) -> Store:
    return STORES.setdefault(name, Store())


class MemoryConnector(base.Connector):
    type_name = "memory"
    capabilities: ClassVar[base.Capabilities] = base.Capabilities(watch=True, batch_writes=True)

    def __init__(self, endpoint: base.Endpoint) -> None:
        super().__init__(endpoint)
        self.store = store(endpoint.addresses[0] if endpoint.addresses else endpoint.name)

    def _check_read(self) -> None:
        if self.store.fail_reads:
            raise errors.ReadError(f"memory registry {self.name}: reads are failing (test switch)")

    async def list_services(self, namespace: str) -> Sequence[model.ServiceKey]:
        self._check_read()
        return sorted(k for k, v in self.store.services.items() if k.namespace == namespace or not namespace)

    async def list_instances(self, service: model.ServiceKey) -> base.Listing:
        self._check_read()
        return base.Listing(tuple(self.store.instances(service)))

    async def apply(self, service: model.ServiceKey, plan: planner.Plan, ctx: base.ApplyContext
                    ) -> list[base.Outcome]:
        outcomes: list[base.Outcome] = []
        ops = plan.operations()
        for op, inst in ops:
            if self.store.fail_writes:
                outcomes.append(base.Outcome(op, inst.address, False, "writes are failing", temporary=True))
                continue
            if op == "delete":
                self.store.remove(service, inst.address)
            else:
                self.store.put(service, inst)
            self.store.writes += 1
            outcomes.append(base.Outcome(op, inst.address, True))
        return outcomes

    async def watch(self, services: Sequence[model.ServiceKey], namespaces: Sequence[str]
                    ) -> AsyncIterator[base.WatchEvent]:
        queue: asyncio.Queue[base.WatchEvent] = asyncio.Queue()
        self.store.watchers.append(queue)
        wanted = set(services)
        spaces = set(namespaces)
        try:
            while True:
                key = await queue.get()
                if key is None or key in wanted or key.namespace in spaces:
                    yield key
        finally:
            self.store.watchers.remove(queue)
