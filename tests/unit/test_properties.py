"""Property tests of the pure core: planner, desired state, delete guard.

Records come from a small pool of addresses so that desired copies, natives, our
copies, other tasks' copies and polaris-sync copies collide often.
"""

from __future__ import annotations

import collections
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from syncworker import marks, model
from syncworker.reconcile import desired, planner, safety

from . import strategies as s

#: enough examples to find the collisions that matter on this small pool, fast enough for every run
props = settings(max_examples=80, deadline=None)


def owned(inst: model.Instance) -> bool:
    return marks.owned_by(inst, s.OWNER.task, s.OWNER.source)


def full(inst: model.Instance) -> tuple[model.Instance, str]:
    """An instance with its native id, which `==` ignores."""
    return (inst, inst.native_id)


# ---- planner -----------------------------------------------------------------------

@props
@given(want=s.desired_copies, actual=s.actual_by_address)
def test_plan_after_apply_is_empty(want: list[model.Instance], actual: list[model.Instance]) -> None:
    p = planner.plan(want, actual, s.OWNER)
    after = planner.apply_to(actual, p)
    again = planner.plan(want, after, s.OWNER)
    assert again.empty, again
    assert {c.address for c in again.clashes} == {c.address for c in p.clashes}


@props
@given(want=s.desired_copies, actual=s.actual_any)
def test_plan_after_apply_is_empty_with_several_records_per_address(
        want: list[model.Instance], actual: list[model.Instance]) -> None:
    p = planner.plan(want, actual, s.OWNER)
    again = planner.plan(want, planner.apply_to(actual, p), s.OWNER)
    assert again.empty, again


@props
@given(want=s.desired_copies, actual=s.actual_by_address)
def test_applied_plan_converges_to_the_wanted_copies(
        want: list[model.Instance], actual: list[model.Instance]) -> None:
    p = planner.plan(want, actual, s.OWNER)
    after = planner.apply_to(actual, p)
    by_address = collections.defaultdict(list)
    for inst in after:
        by_address[inst.address].append(inst)
    first_wanted: dict[model.Address, model.Instance] = {}
    for w in want:
        first_wanted.setdefault(w.address, w)
    for address, w in first_wanted.items():
        held = by_address[address]
        assert len(held) == 1
        assert held[0] == w or not owned(held[0])
    # nothing of ours is left at an address we do not want
    assert all(i.address in first_wanted for i in after if owned(i))


@props
@given(want=s.desired_copies, actual=s.actual_any)
def test_plan_touches_only_owned_records(want: list[model.Instance], actual: list[model.Instance]) -> None:
    p = planner.plan(want, actual, s.OWNER)
    assert all(owned(u.old) for u in p.updates)
    assert all(owned(d) for d in p.deletes)
    # every record the owner does not own survives the plan unchanged (native id included)
    after = collections.Counter(full(i) for i in planner.apply_to(actual, p))
    foreign = collections.Counter(full(i) for i in actual if not owned(i))
    assert not foreign - after
    # creates go only where nothing is held
    held = {i.address for i in actual}
    assert all(c.address not in held for c in p.creates)


@props
@given(want=s.desired_copies, actual=s.actual_by_address)
def test_clashes_are_wanted_addresses_held_by_foreign_records(
        want: list[model.Instance], actual: list[model.Instance]) -> None:
    p = planner.plan(want, actual, s.OWNER)
    wanted = {w.address for w in want}
    foreign = {i.address for i in actual if not owned(i)}
    assert [c.address for c in p.clashes] == sorted(wanted & foreign)
    assert all(not owned(c) for c in p.clashes)


@props
@given(want=s.desired_copies, actual=s.actual_any)
def test_clashes_do_not_depend_on_listing_order(
        want: list[model.Instance], actual: list[model.Instance]) -> None:
    """A registry keyed by more than ip:port (Nacos: ip, port, cluster) may hold a native and our copy
    at one address, listed in any order: the native must win either way."""
    forward = planner.plan(want, actual, s.OWNER)
    backward = planner.plan(want, list(reversed(actual)), s.OWNER)
    wanted = {w.address for w in want}
    foreign = {i.address for i in actual if not owned(i)}
    assert {c.address for c in forward.clashes} == wanted & foreign
    assert {c.address for c in backward.clashes} == wanted & foreign
    assert collections.Counter(d.address for d in forward.deletes) == collections.Counter(
        d.address for d in backward.deletes)


# ---- desired -------------------------------------------------------------------------

SOURCE_KINDS = {
    "native": lambda i: s.with_meta(i),
    "copy-from-destination": lambda i: marks.stamp(i, "t-ba", s.DST),
    "copy-from-third": lambda i: marks.stamp(i, "t-cb", s.THIRD),
    "polaris-sync-from-destination": lambda i: s.with_meta(i, **{marks.POLARIS_SYNC: s.DST}),
    "polaris-sync-from-third": lambda i: s.with_meta(i, **{marks.POLARIS_SYNC: s.THIRD}),
}
source_records = st.lists(
    st.builds(lambda kind, inst: SOURCE_KINDS[kind](inst), st.sampled_from(sorted(SOURCE_KINDS)), s.instances()),
    max_size=10)
copy_rules = st.builds(
    desired.CopyRules, task=st.just(s.TASK), source=st.just(s.SRC), destination=st.just(s.DST),
    relay=st.booleans(), metadata_filter=st.dictionaries(st.just("env"), st.sampled_from(["a", "b"]), max_size=1),
    only_healthy=st.booleans(),
    cluster_map=st.dictionaries(st.sampled_from(["", "c1", "*"]), st.sampled_from(["x", "y"]), max_size=2))


def passes_filters(inst: model.Instance, rules: desired.CopyRules) -> bool:
    if any(inst.metadata.get(k) != v for k, v in rules.metadata_filter.items()):
        return False
    return not rules.only_healthy or (inst.healthy and inst.enabled)


@props
@given(source=source_records, rules=copy_rules)
def test_desired_never_goes_home_and_relays_only_when_asked(
        source: list[model.Instance], rules: desired.CopyRules) -> None:
    out = desired.desired(source, rules)
    assert all(marks.origin(o.metadata) != rules.destination for o in out)
    assert all(marks.owner(o.metadata) == rules.task for o in out)
    assert all(marks.POLARIS_SYNC not in o.metadata and o.native_id == "" for o in out)
    if rules.relay:
        expected = [i for i in source if marks.origin(i.metadata) != rules.destination and passes_filters(i, rules)]
        assert [marks.origin(o.metadata) for o in out] == [marks.origin(i.metadata) or rules.source for i in expected]
    else:
        expected = [i for i in source if not marks.is_copy(i.metadata) and passes_filters(i, rules)]
        assert all(marks.origin(o.metadata) == rules.source for o in out)
    assert [o.address for o in out] == [i.address for i in expected]
    assert [marks.strip(o.metadata) for o in out] == [marks.strip(i.metadata) for i in expected]
    cmap = rules.cluster_map
    assert [o.cluster for o in out] == [cmap.get(i.cluster, cmap.get("*", i.cluster)) for i in expected]


@props
@given(a=st.lists(s.instances(), max_size=5), b=st.lists(s.instances(), max_size=5), relay=st.booleans())
def test_two_way_sync_reaches_a_fixed_point_without_copies_of_copies(
        a: list[model.Instance], b: list[model.Instance], relay: bool) -> None:
    """Both directions at once on registries keyed by address: converges in two rounds, natives untouched."""
    def keyed(insts: list[model.Instance]) -> list[model.Instance]:
        return list({i.address: s.with_meta(i) for i in insts}.values())

    a, b = keyed(a), keyed(b)
    natives_a, natives_b = list(a), list(b)
    ab = desired.CopyRules("ab", "A", "B", relay=relay)
    ba = desired.CopyRules("ba", "B", "A", relay=relay)
    history = []
    for _ in range(4):
        b = planner.apply_to(b, planner.plan(desired.desired(a, ab), b, planner.Owner("ab", "A")))
        a = planner.apply_to(a, planner.plan(desired.desired(b, ba), a, planner.Owner("ba", "B")))
        history.append((collections.Counter(a), collections.Counter(b)))
    assert history[1] == history[2] == history[3]
    assert collections.Counter(natives_a) <= collections.Counter(a)
    assert collections.Counter(natives_b) <= collections.Counter(b)
    for here, name, task in ((a, "A", "ba"), (b, "B", "ab")):
        copies = [i for i in here if marks.is_copy(i.metadata)]
        assert all(marks.origin(c.metadata) != name and marks.owner(c.metadata) == task for c in copies)
    assert len(a) == len({i.address for i in natives_a} | {i.address for i in natives_b})
    assert len(b) == len(a)


# ---- safety --------------------------------------------------------------------------

policies = st.builds(safety.Policy, empty_grace=st.floats(0.01, 100), max_delete_ratio=st.floats(0.01, 1.0),
                     ratio_grace=st.floats(0.01, 100))


@st.composite
def guard_inputs(draw: st.DrawFn) -> tuple[planner.Plan, int, int, safety.Pending, float, safety.Policy]:
    addresses = [(f"10.0.{i // 250}.{i % 250}", 80) for i in range(draw(st.integers(0, 30)))]
    deletes = tuple(marks.stamp(model.Instance(h, p), s.TASK, s.SRC) for h, p in addresses)
    owned_count = len(deletes) + draw(st.integers(0, 30))
    now = 1000.0
    pending = {a: now - draw(st.floats(0, 200)) for a in addresses if draw(st.booleans())}
    pending.update({("192.0.2.1", 1): now - 5})  # a stale entry for a delete no longer planned
    return (planner.Plan(deletes=deletes), owned_count, draw(st.integers(0, 10)), pending, now, draw(policies))


@props
@given(guard_inputs())
def test_guard_caps_fresh_deletes_and_holds_an_empty_source(args: tuple) -> None:
    p, owned_count, want, pending, now, policy = args
    v = safety.guard(p, owned_count, want, pending, now, policy)
    passed, held = list(v.plan.deletes), list(v.held)
    # deletes are split, never invented or lost
    assert collections.Counter(passed + held) == collections.Counter(p.deletes)
    assert set(v.pending) == {h.address for h in held}
    assert all(v.pending[a] == pending.get(a, now) for a in v.pending)
    fresh = [d for d in passed if d.address not in pending]
    if want == 0 and p.deletes:
        since = [pending.get(d.address, now) for d in p.deletes]
        if any(now - t < policy.empty_grace for t in since):
            assert passed == []
            assert v.reason == "source-empty"
        else:
            assert held == []
    else:
        assert len(fresh) <= max(1, math.floor(owned_count * policy.max_delete_ratio))


@props
@given(n=st.integers(1, 40), extra=st.integers(0, 40), want=st.integers(0, 5), policy=policies)
def test_guarded_deletes_all_go_in_the_end(n: int, extra: int, want: int, policy: safety.Policy) -> None:
    """Held deletes are delayed, not lost: with time passing, a mass removal completes."""
    copies = [marks.stamp(model.Instance(f"10.1.{i // 250}.{i % 250}", 80), s.TASK, s.SRC) for i in range(n)]
    left, pending, now = list(copies), {}, 0.0
    step = max(policy.empty_grace, policy.ratio_grace) / 8
    limit = max(policy.empty_grace, policy.ratio_grace) + 2 * step
    while left and now <= limit:
        v = safety.guard(planner.Plan(deletes=tuple(left)), len(left) + extra, want, pending, now, policy)
        gone = set(v.plan.deletes)
        fresh = [d for d in gone if d.address not in pending]
        if want == 0 and now < policy.empty_grace:
            assert not gone
        elif want:
            assert len(fresh) <= max(1, math.floor((len(left) + extra) * policy.max_delete_ratio))
        left = [c for c in left if c not in gone]
        pending, now = v.pending, now + step
    assert left == []
