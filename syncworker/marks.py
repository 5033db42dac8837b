"""Ownership marks carried in every copy's metadata (tags or labels on gateways).

`syncworker.task` names the task that wrote the copy, `syncworker.origin` the
registry endpoint where the instance natively lives. polaris-sync marks its copies
with `__sync__` = source endpoint name; we read that mark as an origin too, and a
copy marked only that way whose origin is our source is adopted rather than
duplicated, so users switch over from polaris-sync without duplicates.
"""

from __future__ import annotations

from collections.abc import Mapping

from syncworker import model

TASK = "syncworker.task"
ORIGIN = "syncworker.origin"
POLARIS_SYNC = "__sync__"
ALL = (TASK, ORIGIN, POLARIS_SYNC)


def owner(meta: Mapping[str, str]) -> str | None:
    return meta.get(TASK)


def origin(meta: Mapping[str, str]) -> str | None:
    """Where a copy natively lives; None for a native record."""
    return meta.get(ORIGIN) or meta.get(POLARIS_SYNC)


def is_copy(meta: Mapping[str, str]) -> bool:
    return origin(meta) is not None


def owned_by(inst: model.Instance, task: str, source_name: str) -> bool:
    """True when `task` may update or delete this record."""
    meta = inst.metadata
    if meta.get(TASK) == task:
        return True
    # a polaris-sync copy of our source: adopt it instead of clashing or duplicating
    return TASK not in meta and meta.get(POLARIS_SYNC) == source_name


def stamp(inst: model.Instance, task: str, origin_name: str) -> model.Instance:
    meta = {k: v for k, v in inst.metadata.items() if k not in ALL}
    meta[TASK] = task
    meta[ORIGIN] = origin_name
    return inst.replace(metadata=model.freeze(meta))


def strip(meta: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in meta.items() if k not in ALL}
