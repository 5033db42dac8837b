"""From a source listing to the copies a task wants: loops stopped, filters and cluster map applied."""

from __future__ import annotations

from syncworker import marks, model
from syncworker.reconcile import desired

RULES = desired.CopyRules(task="ab", source="A", destination="B")


def inst(host: str, **kw: object) -> model.Instance:
    return model.Instance(host, 80, **kw)  # type: ignore[arg-type]


def test_natives_are_stamped_with_task_and_source() -> None:
    out = desired.desired([inst("10.0.0.1", metadata={"env": "prod"}, native_id="src-id")], RULES)
    assert len(out) == 1
    assert dict(out[0].metadata) == {"env": "prod", marks.TASK: "ab", marks.ORIGIN: "A"}
    assert out[0].native_id == ""


def test_a_copy_never_goes_home_even_when_relaying() -> None:
    home = marks.stamp(inst("10.0.0.1"), "ba", "B")
    ps_home = inst("10.0.0.2", metadata={marks.POLARIS_SYNC: "B"})
    for rules in (RULES, desired.CopyRules("ab", "A", "B", relay=True)):
        assert desired.desired([home, ps_home], rules) == []


def test_copies_are_not_relayed_unless_asked() -> None:
    from_c = marks.stamp(inst("10.0.0.1"), "ca", "C")
    ps_from_c = inst("10.0.0.2", metadata={marks.POLARIS_SYNC: "C"})
    assert desired.desired([from_c, ps_from_c], RULES) == []
    relayed = desired.desired([from_c, ps_from_c], desired.CopyRules("ab", "A", "B", relay=True))
    assert [(marks.owner(o.metadata), marks.origin(o.metadata)) for o in relayed] == [("ab", "C"), ("ab", "C")]
    assert all(marks.POLARIS_SYNC not in o.metadata for o in relayed)


def test_metadata_filter_and_only_healthy() -> None:
    src = [inst("10.0.0.1", metadata={"env": "prod"}), inst("10.0.0.2", metadata={"env": "dev"}),
           inst("10.0.0.3", metadata={"env": "prod"}, healthy=False),
           inst("10.0.0.4", metadata={"env": "prod"}, enabled=False)]
    rules = desired.CopyRules("ab", "A", "B", metadata_filter={"env": "prod"})
    assert [o.host for o in desired.desired(src, rules)] == ["10.0.0.1", "10.0.0.3", "10.0.0.4"]
    healthy = desired.CopyRules("ab", "A", "B", metadata_filter={"env": "prod"}, only_healthy=True)
    assert [o.host for o in desired.desired(src, healthy)] == ["10.0.0.1"]


def test_cluster_map_exact_then_wildcard_then_unchanged() -> None:
    src = [inst("10.0.0.1", cluster="c1"), inst("10.0.0.2", cluster="c2")]
    exact = desired.CopyRules("ab", "A", "B", cluster_map={"c1": "DEFAULT"})
    assert [o.cluster for o in desired.desired(src, exact)] == ["DEFAULT", "c2"]
    wild = desired.CopyRules("ab", "A", "B", cluster_map={"c1": "DEFAULT", "*": "other"})
    assert [o.cluster for o in desired.desired(src, wild)] == ["DEFAULT", "other"]


def test_every_carried_field_is_kept() -> None:
    src = inst("10.0.0.1", weight=2.5, healthy=False, enabled=False, protocol="grpc", ephemeral=True)
    (out,) = desired.desired([src], RULES)
    assert (out.weight, out.healthy, out.enabled, out.protocol, out.ephemeral) == (2.5, False, False, "grpc", True)
