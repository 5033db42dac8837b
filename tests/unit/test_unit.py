"""One reconcile of one unit against real in-memory registries."""

from __future__ import annotations

from syncworker import marks, model
from syncworker.connectors import base, memory
from syncworker.reconcile import desired, safety, unit

from .helpers import run

SVC = model.ServiceKey("ns", "", "svc")
RULES = desired.CopyRules(task="ab", source="A", destination="B")
UNIT = unit.Unit("ab", SVC, SVC, RULES)
POLICY = safety.Policy(empty_grace=60, max_delete_ratio=0.5, ratio_grace=30)


def connector(name: str, address: str) -> memory.MemoryConnector:
    return memory.MemoryConnector(base.Endpoint(name=name, type="memory", addresses=(address,)))


def setup(*natives: model.Instance) -> tuple[memory.MemoryConnector, memory.MemoryConnector]:
    src, dst = connector("A", "mem-a"), connector("B", "mem-b")
    for n in natives:
        src.store.put(SVC, n)
    return src, dst


def test_reconcile_copies_then_is_idempotent() -> None:
    src, dst = setup(model.Instance("10.0.0.1", 80), model.Instance("10.0.0.2", 80, weight=2.0))
    state = unit.UnitState()
    first = run(unit.reconcile(UNIT, src, dst, state, POLICY))
    assert first.ok and len(first.plan.creates) == 2 and state.in_sync == 2 and state.outcome == "ok"
    assert sorted(i.host for i in dst.store.instances(SVC)) == ["10.0.0.1", "10.0.0.2"]
    writes = dst.store.writes
    second = run(unit.reconcile(UNIT, src, dst, state, POLICY))
    assert second.ok and second.plan.empty and dst.store.writes == writes
    assert state.runs == 2 and state.ops["create"] == 2


def test_failed_source_read_writes_nothing() -> None:
    src, dst = setup(model.Instance("10.0.0.1", 80))
    stale = marks.stamp(model.Instance("10.0.0.9", 80), "ab", "A")
    dst.store.put(SVC, stale)
    src.store.fail_reads = True
    state = unit.UnitState()
    res = run(unit.reconcile(UNIT, src, dst, state, POLICY))
    assert not res.ok and res.temporary and res.plan.empty
    assert "read failed" in state.error and state.outcome == "error" and state.failures == 1
    assert dst.store.instances(SVC) == [stale] and dst.store.writes == 0


def test_failed_destination_read_writes_nothing() -> None:
    src, dst = setup(model.Instance("10.0.0.1", 80))
    dst.store.fail_reads = True
    res = run(unit.reconcile(UNIT, src, dst, unit.UnitState(), POLICY))
    assert not res.ok and res.temporary
    assert dst.store.writes == 0 and dst.store.instances(SVC) == []


def test_failed_writes_are_reported_per_operation() -> None:
    src, dst = setup(model.Instance("10.0.0.1", 80), model.Instance("10.0.0.2", 80))
    dst.store.fail_writes = True
    state = unit.UnitState()
    res = run(unit.reconcile(UNIT, src, dst, state, POLICY))
    assert not res.ok and res.temporary
    assert [o.ok for o in res.outcomes] == [False, False]
    assert state.in_sync == 0 and "2 of 2 writes failed" in state.error


def test_dry_run_plans_but_writes_nothing() -> None:
    src, dst = setup(model.Instance("10.0.0.1", 80))
    res = run(unit.reconcile(UNIT, src, dst, unit.UnitState(), POLICY, apply=False))
    assert res.ok and len(res.plan.creates) == 1 and dst.store.writes == 0


def test_source_empty_holds_deletes_and_asks_for_a_recheck() -> None:
    src, dst = setup(model.Instance("10.0.0.1", 80), model.Instance("10.0.0.2", 80))
    state = unit.UnitState()
    now = [100.0]
    run(unit.reconcile(UNIT, src, dst, state, POLICY, clock=lambda: now[0]))
    for n in src.store.instances(SVC):
        src.store.remove(SVC, n.address)
    res = run(unit.reconcile(UNIT, src, dst, state, POLICY, clock=lambda: now[0]))
    assert res.ok and res.plan.deletes == () and res.recheck_in == 60.0
    assert state.held_deletes == 2 and state.outcome == "held deletes" and "source-empty" in state.error
    assert len(dst.store.instances(SVC)) == 2
    now[0] = 160.0
    res = run(unit.reconcile(UNIT, src, dst, state, POLICY, clock=lambda: now[0]))
    assert len(res.plan.deletes) == 2 and dst.store.instances(SVC) == [] and state.held_deletes == 0


def test_clash_is_counted_and_native_kept() -> None:
    src, dst = setup(model.Instance("10.0.0.1", 80, weight=2.0))
    native = model.Instance("10.0.0.1", 80, metadata={"owner": "app"})
    dst.store.put(SVC, native)
    state = unit.UnitState()
    res = run(unit.reconcile(UNIT, src, dst, state, POLICY))
    assert res.ok and res.plan.empty and state.clashes == 1 and state.in_sync == 0
    assert dst.store.instances(SVC) == [native]
