"""The leader's logic in one process, over memory registries and a real Redis store: what it dispatches,
what it cleans up when a task goes or changes (also a cleanup its predecessor died owing), and which
lost jobs it sends again. Celery is replaced by a recorder of the messages it would send."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from scheduler import leader as leader_mod
from syncworker import marks, model
from syncworker.cluster import codec
from syncworker.cluster import store as store_mod
from syncworker.config import models
from syncworker.config import settings as settings_mod
from syncworker.connectors import memory, registry

pytestmark = pytest.mark.peers

NS = "ns"


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def send_task(self, name: str, kwargs: dict[str, Any], **_: Any) -> None:
        self.sent.append((name, kwargs))

    def units(self) -> list[str]:
        return sorted(codec.key_of(k) for n, k in self.sent if n == "syncworker.reconcile")


class NoSource:
    def initial(self) -> models.RegistryConfig | None:
        return None

    def poll(self) -> models.RegistryConfig | None:
        return None

    def accepted(self) -> None:
        return None


def cfg(*tasks: dict[str, Any]) -> models.RegistryConfig:
    return models.RegistryConfig.model_validate({"tasks": list(tasks), "methods": [{"type": "watch"}]})


def task(name: str, src: str, dst: str, service: str = "*", **match: Any) -> dict[str, Any]:
    return {"name": name, "source": {"name": src, "type": "memory", "addresses": [f"mem-{src}"]},
            "destination": {"name": dst, "type": "memory", "addresses": [f"mem-{dst}"]},
            "match": [{"namespace": NS, "service": service, **match}]}


def put(registry_name: str, svc: str, *insts: model.Instance, namespace: str = NS) -> None:
    for i in insts:
        memory.store(f"mem-{registry_name}").put(model.ServiceKey(namespace, "", svc), i)


def at(registry_name: str, svc: str, namespace: str = NS) -> list[model.Address]:
    return sorted(i.address for i in memory.store(f"mem-{registry_name}").instances(
        model.ServiceKey(namespace, "", svc)))


def copy(task_name: str, origin: str, host: str) -> model.Instance:
    return marks.stamp(model.Instance(host, 80), task_name, origin)


@pytest.fixture
def st(redis_url: str) -> Iterator[store_mod.Store]:
    memory.STORES.clear()
    s = store_mod.Store.from_url(redis_url, f"t{uuid.uuid4().hex[:10]}")
    yield s
    s.flush()
    memory.STORES.clear()


def make_leader(st: store_mod.Store, identity: str = "leader:1") -> tuple[leader_mod.Leader, Recorder]:
    settings = settings_mod.Settings(SYNCWORKER_REDIS_PREFIX=st.prefix, SYNCWORKER_ALIVE_TTL=3,
                                     SYNCWORKER_QUEUE_TIMEOUT=60)
    lead = leader_mod.Leader(st, settings, identity, NoSource(), allowed=lambda: True, factory=registry.create)
    rec = Recorder()
    lead.dispatch.app = rec  # type: ignore[assignment]
    return lead, rec


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_applying_a_config_publishes_it_and_dispatches_every_unit(st: store_mod.Store) -> None:
    put("a", "s1", model.Instance("10.0.0.1", 80))
    put("a", "s2", model.Instance("10.0.0.2", 80))
    lead, rec = make_leader(st)

    async def go() -> dict[str, list[str]]:
        try:
            return await lead.apply(cfg(task("t", "a", "b")))
        finally:
            await lead._stop_task("t")

    assert run(go())["added"] == ["t"]
    assert rec.units() == ["t:ns/s1", "t:ns/s2"]
    assert sorted(st.units("t")) == ["t:ns/s1", "t:ns/s2"]
    applied = st.applied_config()
    assert applied is not None and store_mod.parse_applied(applied) == cfg(task("t", "a", "b"))
    assert st.cleanups() == {}
    # a burst of marks on a queued unit sends nothing more
    lead.dispatch.mark({"task": "t", "unit": "ns/s1", "service": [NS, "", "s1"]})
    assert rec.units() == ["t:ns/s1", "t:ns/s2"]


def test_a_removed_task_is_cleaned_up_and_only_its_copies_go(st: store_mod.Store) -> None:
    put("a", "s1", model.Instance("10.0.0.1", 80))
    put("b", "s1", copy("t", "a", "10.0.0.1"), copy("other", "a", "10.0.0.9"), model.Instance("10.0.0.5", 80))
    lead, _ = make_leader(st)

    async def go() -> None:
        await lead.apply(cfg(task("t", "a", "b")))
        changes = await lead.apply(cfg())
        assert changes["removed"] == ["t"]

    run(go())
    assert at("b", "s1") == [("10.0.0.5", 80), ("10.0.0.9", 80)]  # the native and another task's copy stay
    assert st.units("t") == {} and st.cleanups() == {}


def test_the_next_leader_finishes_a_cleanup_its_predecessor_owed(st: store_mod.Store) -> None:
    put("a", "s1", model.Instance("10.0.0.1", 80))
    put("b", "s1", copy("t", "a", "10.0.0.1"))
    first, _ = make_leader(st, "leader:1")

    async def crash_after_publishing() -> None:
        await first.apply(cfg(task("t", "a", "b")))
        await first._stop_task("t")
        # what apply() notes before it publishes a config without "t"; then this leader dies
        st.add_cleanup("t", codec.config_text(cfg(task("t", "a", "b"))), st.units("t").values())
        st.publish_applied(codec.config_text(cfg()), "leader:1")

    run(crash_after_publishing())
    assert at("b", "s1") == [("10.0.0.1", 80)]
    second, _ = make_leader(st, "leader:2")
    run(second.apply(cfg()))
    assert at("b", "s1") == []
    assert st.cleanups() == {}


def test_a_changed_task_cleans_up_only_what_it_no_longer_covers(st: store_mod.Store) -> None:
    put("a", "s1", model.Instance("10.0.0.1", 80))
    put("a", "s2", model.Instance("10.0.0.2", 80))
    put("b", "s1", copy("t", "a", "10.0.0.1"))
    put("b", "s2", copy("t", "a", "10.0.0.2"))
    lead, _ = make_leader(st)

    async def go() -> None:
        await lead.apply(cfg(task("t", "a", "b")))
        changes = await lead.apply(cfg(task("t", "a", "b", service="s1")))
        assert changes["changed"] == ["t"]
        await lead._stop_task("t")

    run(go())
    assert at("b", "s1") == [("10.0.0.1", 80)]
    assert at("b", "s2") == []
    assert sorted(st.units("t")) == ["t:ns/s1"]


def test_jobs_of_vanished_workers_are_dispatched_again(st: store_mod.Store) -> None:
    lead, rec = make_leader(st)
    refs = [{"task": "t", "unit": f"ns/s{i}", "service": [NS, "", f"s{i}"]} for i in range(4)]
    st.say_alive("alive:1", 30, role="worker")
    now = time.time()
    st.queue(refs[0], now)
    st.received("t:ns/s0", "dead:1")  # taken by a worker that is gone
    st.queue(refs[1], now)
    st.received("t:ns/s1", "alive:1")  # taken by a live one: left alone
    st.queue(refs[2], now - 10)  # never taken, and nothing waits in the broker: fetched by the dead
    st.set_running(refs[3], "dead:1")  # running on a worker that is gone
    assert lead.sweep() == 3
    assert rec.units() == ["t:ns/s0", "t:ns/s2", "t:ns/s3"]
    assert st.running() == {}
    assert sorted(st.queued()) == ["t:ns/s0", "t:ns/s1", "t:ns/s2", "t:ns/s3"]
    assert lead.sweep() == 0  # the new jobs are queued and not yet overdue


def test_a_disabled_task_is_paused_and_keeps_its_copies(st: store_mod.Store) -> None:
    put("a", "s1", model.Instance("10.0.0.1", 80))
    put("b", "s1", copy("t", "a", "10.0.0.1"))
    lead, _ = make_leader(st)

    async def go() -> None:
        await lead.apply(cfg(task("t", "a", "b")))
        changes = await lead.apply(cfg({**task("t", "a", "b"), "enable": False}))
        assert changes["disabled"] == ["t"] and changes["removed"] == []
        assert "t" not in lead.tasks

    run(go())
    assert at("b", "s1") == [("10.0.0.1", 80)]
    assert st.cleanups() == {}
