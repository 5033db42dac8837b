"""The pure planner, one rule at a time."""

from __future__ import annotations

from syncworker import marks, model
from syncworker.reconcile import planner

OWNER = planner.Owner("t", "A")


def copy(host: str, port: int = 80, task: str = "t", origin: str = "A", **kw: object) -> model.Instance:
    return marks.stamp(model.Instance(host, port, **kw), task, origin)  # type: ignore[arg-type]


def native(host: str, port: int = 80, **kw: object) -> model.Instance:
    return model.Instance(host, port, **kw)  # type: ignore[arg-type]


def test_create_update_delete() -> None:
    want = [copy("10.0.0.1"), copy("10.0.0.2", weight=2.0)]
    actual = [copy("10.0.0.2", native_id="n2"), copy("10.0.0.3")]
    p = planner.plan(want, actual, OWNER)
    assert p.creates == (copy("10.0.0.1"),)
    assert [(u.old.address, u.new.weight, u.new.native_id) for u in p.updates] == [(("10.0.0.2", 80), 2.0, "n2")]
    assert p.deletes == (copy("10.0.0.3"),)
    assert p.clashes == ()
    assert p.counts() == {"create": 1, "update": 1, "delete": 1, "clash": 0}


def test_identical_copy_is_left_alone_even_with_another_native_id() -> None:
    p = planner.plan([copy("10.0.0.1")], [copy("10.0.0.1", native_id="registry-id")], OWNER)
    assert p.empty and p == planner.Plan()


def test_native_at_a_wanted_address_is_a_clash_never_an_update() -> None:
    n = native("10.0.0.1", weight=5.0)
    p = planner.plan([copy("10.0.0.1")], [n], OWNER)
    assert p.empty
    assert p.clashes == (n,)


def test_another_tasks_copy_is_a_clash_and_never_deleted() -> None:
    theirs = copy("10.0.0.1", task="other")
    elsewhere = copy("10.0.0.2", task="other")
    p = planner.plan([copy("10.0.0.1")], [theirs, elsewhere], OWNER)
    assert p.clashes == (theirs,)
    assert p.deletes == () and p.updates == () and p.creates == ()


def test_polaris_sync_copy_of_our_source_is_adopted() -> None:
    old = native("10.0.0.1", metadata={marks.POLARIS_SYNC: "A", "env": "prod"})
    gone = native("10.0.0.2", metadata={marks.POLARIS_SYNC: "A"})
    foreign = native("10.0.0.3", metadata={marks.POLARIS_SYNC: "nacos-2"})
    want = copy("10.0.0.1", metadata={"env": "prod"})
    p = planner.plan([want], [old, gone, foreign], OWNER)
    assert [(u.old, u.new) for u in p.updates] == [(old, want)]
    assert p.deletes == (gone,)
    assert p.clashes == () and p.creates == ()


def test_a_second_copy_of_ours_at_one_address_is_deleted() -> None:
    first, second = copy("10.0.0.1"), copy("10.0.0.1", weight=3.0)
    p = planner.plan([copy("10.0.0.1")], [first, second], OWNER)
    assert p.deletes == (second,)
    assert planner.plan([copy("10.0.0.1")], planner.apply_to([first, second], p), OWNER).empty


def test_adopted_polaris_sync_duplicate_goes_in_one_plan() -> None:
    """Regression: a polaris-sync copy next to our own copy survived the first plan (it was matched by
    the task mark only) and was deleted by the second, so plan-after-apply was not empty."""
    ours, ps = copy("10.0.0.2"), native("10.0.0.2", metadata={marks.POLARIS_SYNC: "A"})
    p = planner.plan([], [ours, ps], OWNER)
    assert set(p.deletes) == {ours, ps}
    assert planner.apply_to([ours, ps], p) == []


def test_native_beside_our_copy_wins_in_either_listing_order() -> None:
    """Regression: with a native and our copy at one address (Nacos keys by ip, port and cluster), the
    native listed second went unnoticed: no clash, and our copy doubled the native's traffic."""
    n = native("10.0.0.1", cluster="c1")
    ours = copy("10.0.0.1")
    for actual in ([n, ours], [ours, n]):
        p = planner.plan([copy("10.0.0.1", weight=2.0)], actual, OWNER)
        assert p.clashes == (n,)
        assert p.deletes == (ours,)
        assert p.updates == () and p.creates == ()
        assert planner.apply_to(actual, p) == [n]


def test_desired_duplicates_keep_the_first() -> None:
    p = planner.plan([copy("10.0.0.1", weight=1.0), copy("10.0.0.1", weight=9.0)], [], OWNER)
    assert [c.weight for c in p.creates] == [1.0]


def test_without_deletes_keeps_the_named_addresses() -> None:
    p = planner.plan([], [copy("10.0.0.1"), copy("10.0.0.2")], OWNER)
    kept = p.without_deletes([copy("10.0.0.2")])
    assert kept.deletes == (copy("10.0.0.1"),)


def test_apply_to_replaces_in_place_and_appends_creates() -> None:
    actual = [native("10.0.0.9"), copy("10.0.0.1"), copy("10.0.0.2")]
    p = planner.plan([copy("10.0.0.1", weight=4.0), copy("10.0.0.3")], actual, OWNER)
    assert planner.apply_to(actual, p) == [native("10.0.0.9"), copy("10.0.0.1", weight=4.0), copy("10.0.0.3")]
