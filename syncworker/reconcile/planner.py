"""Pure planning: what must change at a destination so it holds the desired copies.

`plan(desired, actual, owner)` compares the copies a task wants (already stamped
with its ownership marks) with what the destination holds for one service, and
returns creates, updates, deletes and clashes. It touches only records the task
owns; a record at a wanted address that the task does not own (a native, or
another task's copy) is a clash: reported, never overwritten. The law that the
property tests check: planning again after the plan was applied gives an empty
plan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from syncworker import marks, model


@dataclasses.dataclass(frozen=True)
class Owner:
    task: str
    #: the source endpoint's name, for adopting polaris-sync's `__sync__` copies
    source: str


@dataclasses.dataclass(frozen=True)
class Update:
    old: model.Instance
    new: model.Instance


@dataclasses.dataclass(frozen=True)
class Plan:
    creates: tuple[model.Instance, ...] = ()
    updates: tuple[Update, ...] = ()
    deletes: tuple[model.Instance, ...] = ()
    clashes: tuple[model.Instance, ...] = ()

    @property
    def empty(self) -> bool:
        """True when nothing would be written (clashes are reported, not written)."""
        return not (self.creates or self.updates or self.deletes)

    def operations(self) -> list[tuple[str, model.Instance]]:
        """(op, instance) in the order destinations apply them: deletes, updates, creates."""
        return ([("delete", d) for d in self.deletes] + [("update", u.new) for u in self.updates]
                + [("create", c) for c in self.creates])

    def counts(self) -> dict[str, int]:
        return {"create": len(self.creates), "update": len(self.updates),
                "delete": len(self.deletes), "clash": len(self.clashes)}

    def without_deletes(self, kept: Iterable[model.Instance]) -> Plan:
        keep = {i.address for i in kept}
        return dataclasses.replace(self, deletes=tuple(d for d in self.deletes if d.address not in keep))


def same_copy(a: model.Instance, b: model.Instance) -> bool:
    """Equal in every field a copy carries (the registry's own id is not compared)."""
    return a == b


def plan(desired: Iterable[model.Instance], actual: Iterable[model.Instance], owner: Owner) -> Plan:
    wanted: dict[model.Address, model.Instance] = {}
    for inst in desired:
        wanted.setdefault(inst.address, inst)

    def mine(inst: model.Instance) -> bool:
        return marks.owned_by(inst, owner.task, owner.source)

    # where a registry holds several records at one address (Nacos keys by ip, port and
    # cluster), a record we do not own wins whatever the listing order: it is the one we
    # compare with, and ours there are extra
    held: dict[model.Address, model.Instance] = {}
    duplicates: list[model.Instance] = []
    for inst in actual:
        have = held.get(inst.address)
        if have is None:
            held[inst.address] = inst
        elif mine(have) and not mine(inst):
            held[inst.address] = inst
            duplicates.append(have)
        else:
            duplicates.append(inst)

    creates: list[model.Instance] = []
    updates: list[Update] = []
    deletes: list[model.Instance] = []
    clashes: list[model.Instance] = []
    for address, want in sorted(wanted.items()):
        have = held.get(address)
        if have is None:
            creates.append(want)
        elif not mine(have):
            clashes.append(have)
        elif not same_copy(have, want):
            updates.append(Update(old=have, new=want.replace(native_id=have.native_id)))
    for address, have in sorted(held.items()):
        if address not in wanted and mine(have):
            deletes.append(have)
    # a second record of ours at one address (left by a crash between two writes, or an
    # adopted polaris-sync copy next to our own) goes
    deletes.extend(d for d in duplicates if mine(d))
    return Plan(tuple(creates), tuple(updates), tuple(deletes), tuple(clashes))


def apply_to(actual: Iterable[model.Instance], p: Plan) -> list[model.Instance]:
    """What a destination holds after `p` succeeded in full (used by tests and dry runs)."""
    remaining = list(actual)
    for gone in p.deletes:
        remaining.remove(gone)
    for u in p.updates:
        remaining[remaining.index(u.old)] = u.new
    remaining.extend(p.creates)
    return remaining
