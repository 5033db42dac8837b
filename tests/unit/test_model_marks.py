"""The canonical model and the ownership marks."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from syncworker import marks, model
from syncworker.connectors import memory, registry


def test_service_key_str_shows_the_group_only_when_there_is_one() -> None:
    assert str(model.ServiceKey("ns", "", "svc")) == "ns/svc"
    assert str(model.ServiceKey("ns", "g1", "svc")) == "ns/g1/svc"


def test_instance_metadata_is_frozen_and_order_insensitive() -> None:
    a = model.Instance("10.0.0.1", 80, metadata={"b": "2", "a": "1"})
    b = model.Instance("10.0.0.1", 80, metadata={"a": "1", "b": "2"})
    assert a == b and hash(a) == hash(b)
    assert list(a.metadata) == ["a", "b"]
    with pytest.raises(TypeError):
        a.metadata["c"] = "3"  # type: ignore[index]


def test_equal_instances_hash_equal_whatever_mapping_they_were_given() -> None:
    """A connector may hand over a read-only mapping of its own; equal instances must still hash equal
    (the planner and Counter-based checks rely on it)."""
    a = model.Instance("10.0.0.1", 80, metadata=MappingProxyType({"b": "2", "a": "1"}))
    b = model.Instance("10.0.0.1", 80, metadata={"a": "1", "b": "2"})
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1


def test_native_id_is_not_compared_but_every_carried_field_is() -> None:
    base = model.Instance("10.0.0.1", 80, native_id="x")
    assert base == base.replace(native_id="y")
    for change in ({"weight": 2.0}, {"healthy": False}, {"enabled": False}, {"metadata": {"k": "v"}},
                   {"protocol": "grpc"}, {"cluster": "c1"}, {"ephemeral": True}):
        assert base != base.replace(**change), change


@pytest.mark.parametrize(("inst", "problem"), [
    (model.Instance("10.0.0.1", 80), None),
    (model.Instance("", 80), "bad host"),
    (model.Instance("10.0.0.1 x", 80), "bad host"),
    (model.Instance("10.0.0.1", 0), "out of range"),
    (model.Instance("10.0.0.1", 65536), "out of range"),
    (model.Instance("10.0.0.1", 80, weight=-1), "negative"),
    (model.Instance("10.0.0.1", 80, weight=float("nan")), "not a number"),
])
def test_validate_instance(inst: model.Instance, problem: str | None) -> None:
    found = model.validate_instance(inst)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_canonical_weight_is_one_and_the_memory_registry_keeps_it() -> None:
    assert model.Instance("10.0.0.1", 80).weight == 1.0
    assert registry.connector_class("memory") is memory.MemoryConnector
    assert memory.MemoryConnector.default_weight == 1.0


# ---- marks ---------------------------------------------------------------------------

def test_origin_reads_our_mark_then_polaris_sync_mark() -> None:
    assert marks.origin({}) is None
    assert marks.origin({marks.ORIGIN: "A"}) == "A"
    assert marks.origin({marks.POLARIS_SYNC: "nacos"}) == "nacos"
    assert marks.origin({marks.ORIGIN: "A", marks.POLARIS_SYNC: "nacos"}) == "A"
    assert not marks.is_copy({"env": "prod"})
    assert marks.is_copy({marks.POLARIS_SYNC: "nacos"})


@pytest.mark.parametrize(("meta", "owned"), [
    ({}, False),                                                          # a native
    ({marks.TASK: "t", marks.ORIGIN: "A"}, True),                         # ours
    ({marks.TASK: "t", marks.ORIGIN: "Z"}, True),                         # ours, relayed from elsewhere
    ({marks.TASK: "other", marks.ORIGIN: "A"}, False),                    # another task's
    ({marks.POLARIS_SYNC: "A"}, True),                                    # polaris-sync copy of our source
    ({marks.POLARIS_SYNC: "B"}, False),                                   # polaris-sync copy of elsewhere
    ({marks.POLARIS_SYNC: "A", marks.TASK: "other"}, False),              # already adopted by another task
])
def test_owned_by(meta: dict[str, str], owned: bool) -> None:
    assert marks.owned_by(model.Instance("10.0.0.1", 80, metadata=meta), "t", "A") is owned


def test_stamp_replaces_every_old_mark_and_keeps_user_metadata() -> None:
    inst = model.Instance("10.0.0.1", 80, metadata={"env": "prod", marks.POLARIS_SYNC: "B",
                                                    marks.TASK: "old", marks.ORIGIN: "B"})
    stamped = marks.stamp(inst, "t", "A")
    assert dict(stamped.metadata) == {"env": "prod", marks.TASK: "t", marks.ORIGIN: "A"}
    assert marks.strip(stamped.metadata) == {"env": "prod"}
    assert dict(inst.metadata)[marks.TASK] == "old"  # the original is untouched
