"""The delete guard as a function of time: source-empty grace, delete-ratio cap."""

from __future__ import annotations

from syncworker import marks, model
from syncworker.reconcile import planner, safety

POLICY = safety.Policy(empty_grace=60.0, max_delete_ratio=0.5, ratio_grace=30.0)


def copies(n: int) -> tuple[model.Instance, ...]:
    return tuple(marks.stamp(model.Instance(f"10.0.0.{i + 1}", 80), "t", "A") for i in range(n))


def test_no_deletes_passes_and_clears_pending() -> None:
    p = planner.Plan(creates=copies(1))
    v = safety.guard(p, 3, 4, {("10.9.9.9", 80): 0.0}, 100.0, POLICY)
    assert v.plan == p and v.held == () and v.pending == {}
    assert v.recheck_in(100.0, POLICY) is None


def test_empty_source_holds_every_delete_for_the_grace_then_lets_all_go() -> None:
    p = planner.Plan(deletes=copies(4))
    v = safety.guard(p, 4, 0, {}, 1000.0, POLICY)
    assert v.plan.deletes == () and v.held == copies(4) and v.reason == "source-empty"
    assert v.recheck_in(1000.0, POLICY) == 60.0
    # still within the grace: held, and the first-seen time is kept, not refreshed
    v2 = safety.guard(p, 4, 0, v.pending, 1059.9, POLICY)
    assert v2.plan.deletes == () and set(v2.pending.values()) == {1000.0}
    assert abs(v2.recheck_in(1059.9, POLICY) - 0.1) < 1e-9
    v3 = safety.guard(p, 4, 0, v2.pending, 1060.0, POLICY)
    assert v3.plan.deletes == copies(4) and v3.held == ()


def test_empty_source_grace_restarts_for_a_delete_first_seen_later() -> None:
    p = planner.Plan(deletes=copies(2))
    pending = {copies(2)[0].address: 0.0}
    v = safety.guard(p, 2, 0, pending, 100.0, POLICY)
    assert v.plan.deletes == ()
    assert v.pending == {copies(2)[0].address: 0.0, copies(2)[1].address: 100.0}


def test_ratio_cap_lets_a_share_go_and_holds_the_rest_until_ratio_grace() -> None:
    p = planner.Plan(deletes=copies(8))
    v = safety.guard(p, 10, 2, {}, 0.0, POLICY)
    assert len(v.plan.deletes) == 5 and len(v.held) == 3 and v.reason == "delete-ratio"
    assert v.recheck_in(0.0, POLICY) == 30.0
    rest = planner.Plan(deletes=v.held)
    v2 = safety.guard(rest, 5, 2, v.pending, 10.0, POLICY)
    # five copies left: two more may go now, one stays held
    assert len(v2.plan.deletes) == 2 and len(v2.held) == 1
    v3 = safety.guard(planner.Plan(deletes=v2.held), 3, 2, v2.pending, 30.0, POLICY)
    assert v3.plan.deletes == v2.held and v3.held == ()


def test_a_single_copy_may_always_go() -> None:
    v = safety.guard(planner.Plan(deletes=copies(1)), 1, 3, {}, 0.0, safety.Policy(max_delete_ratio=0.1))
    assert v.plan.deletes == copies(1)


def test_ripe_deletes_use_up_the_budget_for_fresh_ones() -> None:
    dels = copies(6)
    pending = {d.address: 0.0 for d in dels[:3]}
    v = safety.guard(planner.Plan(deletes=dels), 6, 1, pending, 40.0, POLICY)
    # allowed now: 3; the 3 ripe ones take all of it, the 3 fresh ones wait
    assert set(v.plan.deletes) == set(dels[:3])
    assert set(v.held) == set(dels[3:]) and set(v.pending.values()) == {40.0}


def test_held_deletes_do_not_touch_creates_or_updates() -> None:
    p = planner.Plan(creates=copies(1), deletes=copies(3)[1:])
    v = safety.guard(p, 2, 1, {}, 0.0, POLICY)
    assert v.plan.creates == copies(1) and len(v.plan.deletes) == 1 and len(v.held) == 1
