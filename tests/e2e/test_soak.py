"""Random changes on both sides at once for minutes, then convergence to exactly the expected state.

The acceptance: after SYNCWORKER_SOAK_SECONDS (default 300) of random adds, changes and
removals in Nacos and Polaris at the same time, each registry holds exactly its natives
plus copies of the other side's natives; no copy of a copy anywhere (no record whose
origin is the registry it sits in, no copy from anywhere but the other registry), and no
two records at one address. The invariants are also checked on snapshots during the run.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time

import pytest

from syncworker import model
from syncworker.sandbox import base as sandbox_base
from tests.e2e.conftest import StartSync
from tests.e2e.helpers import (
    N2P,
    NACOS,
    P2N,
    POLARIS,
    Natives,
    Side,
    converge,
    env_seconds,
    fresh_namespace,
    nacos_endpoint,
    polaris_endpoint,
    registry_problems,
    two_way,
    two_way_problems,
)

pytestmark = [pytest.mark.peers, pytest.mark.slow]

SERVICES = [f"soak-{i}" for i in range(5)]
#: at most this many natives of one side in one service
MAX_PER_SERVICE = 6


class RandomNatives:
    """One side's natives, changed at random; `model` is what the test wrote (the truth)."""

    def __init__(self, side: Side, octet: int, seed: int) -> None:
        self.side = side
        self.octet = octet  # natives of this side live at 127.0.<octet>.x: never at the other side's
        self.rng = random.Random(seed)
        self.model: Natives = {}
        self.ops: collections.Counter[str] = collections.Counter()
        self.new_services = 0

    def _fresh(self, service: str) -> model.Instance:
        taken = self.model.get(service, {})
        while True:
            addr = (f"127.0.{self.octet}.{self.rng.randint(1, 40)}", 20000 + self.rng.randint(0, 3))
            if addr not in taken:
                return model.Instance(host=addr[0], port=addr[1], weight=self.rng.choice([0.5, 1.0, 2.0]),
                                      metadata={"gen": str(self.rng.randint(0, 9))})

    def _changed(self, inst: model.Instance) -> model.Instance:
        field = self.rng.choice(["weight", "healthy", "enabled", "metadata"])
        if field == "weight":
            return inst.replace(weight=self.rng.choice([0.0, 0.25, 1.0, 1.5, 3.0, 10.0]))
        if field == "healthy":
            return inst.replace(healthy=not inst.healthy)
        if field == "enabled":
            return inst.replace(enabled=not inst.enabled)
        meta = dict(inst.metadata)
        meta["gen"] = str(int(meta.get("gen", "0")) + 1)
        if self.rng.random() < 0.5:
            meta["color"] = self.rng.choice(["red", "green", "blue"])
        else:
            meta.pop("color", None)
        return inst.replace(metadata=meta)

    async def one(self) -> None:
        services = SERVICES + [f"soak-new-{self.octet}-{i}" for i in range(self.new_services)]
        roll = self.rng.random()
        if roll < 0.02:
            self.new_services += 1
            service = f"soak-new-{self.octet}-{self.new_services - 1}"
            await self._put(service, self._fresh(service), "new service")
            return
        service = self.rng.choice(services)
        held = self.model.get(service, {})
        if roll < 0.05 and held:  # the whole service goes (the empty-source grace holds its copies)
            for inst in list(held.values()):
                await self._remove(service, inst)
            self.ops["empty service"] += 1
            return
        if not held or (roll < 0.35 and len(held) < MAX_PER_SERVICE):
            await self._put(service, self._fresh(service), "add")
        elif roll < 0.6:
            await self._remove(service, self.rng.choice(list(held.values())))
            self.ops["remove"] += 1
        else:
            await self._put(service, self._changed(self.rng.choice(list(held.values()))), "change")

    async def _put(self, service: str, inst: model.Instance, op: str) -> None:
        self.model.setdefault(service, {})[inst.address] = inst
        await self.side.put(service, inst)
        self.ops[op] += 1

    async def _remove(self, service: str, inst: model.Instance) -> None:
        del self.model[service][inst.address]
        if not self.model[service]:
            del self.model[service]
        await self.side.remove(service, inst)

    async def run(self, until: float) -> None:
        while time.monotonic() < until:
            await self.one()
            await asyncio.sleep(self.rng.uniform(0.05, 0.4))


def test_random_changes_converge(nacos: sandbox_base.Running, polaris: sandbox_base.Running,
                                 start_sync: StartSync) -> None:
    duration = env_seconds("SYNCWORKER_SOAK_SECONDS", 300.0)
    ns = fresh_namespace("soak")
    n_ep, p_ep = nacos_endpoint(nacos), polaris_endpoint(polaris)
    config = two_way(n_ep, p_ep, ns, pull="10s", safety={"empty_grace": "5s", "ratio_grace": "5s"})
    seed = random.randrange(1 << 30)
    print(f"soak: {duration:.0f}s, namespace {ns}, seed {seed}")
    report: dict[str, object] = {}

    async def scenario() -> None:
        n = await Side(NACOS, n_ep, ns, P2N).open()
        p = await Side(POLARIS, p_ep, ns, N2P).open()
        writers = [RandomNatives(n, 11, seed), RandomNatives(p, 12, seed + 1)]
        try:
            for w in writers:  # a starting population, copied by the first reconcile
                for service in SERVICES:
                    await w._put(service, w._fresh(service), "add")
            start_sync(config)
            until = time.monotonic() + duration
            midway: list[str] = []

            async def invariants() -> None:
                """While changes go on: no copy of a copy, no foreign copy, no duplicate (snapshots)."""
                checks = 0
                while time.monotonic() < until:
                    await asyncio.sleep(5.0)
                    n_snap, p_snap = await asyncio.gather(n.snapshot(), p.snapshot())
                    # copies lag behind natives mid-run, so only the structural rules are checked here
                    for problem in (registry_problems(n, n_snap, p, {}) + registry_problems(p, p_snap, n, {})):
                        if "missing" not in problem and "has no native" not in problem:
                            midway.append(problem)
                    checks += 1
                report["midway checks"] = checks

            await asyncio.gather(writers[0].run(until), writers[1].run(until), invariants())
            assert not midway, "during the run:\n  " + "\n  ".join(midway[:25])
            report["ops"] = {w.side.name: dict(w.ops) for w in writers}
            report["natives at the end"] = {w.side.name: sum(len(m) for m in w.model.values()) for w in writers}
            natives = {w.side.name: w.model for w in writers}
            report["converged after (s)"] = round(
                await converge(lambda: two_way_problems(n, p, natives), 90.0, "convergence after the soak", 0.5), 1)
            # and it stays so (no late flapping)
            await asyncio.sleep(3.0)
            assert await two_way_problems(n, p, natives) == []
        finally:
            await asyncio.gather(n.close(), p.close())

    asyncio.run(scenario())
    print(f"soak report: {report}")
