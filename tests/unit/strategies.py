"""Hypothesis strategies for records in a destination: natives, our copies, other tasks' copies,
and polaris-sync `__sync__` copies, on a small pool of addresses so that they collide."""

from __future__ import annotations

from hypothesis import strategies as st

from syncworker import marks, model
from syncworker.reconcile import planner

HOSTS = ("10.0.0.1", "10.0.0.2", "10.0.0.3")
PORTS = (80, 8080)
TASK, OTHER_TASK = "t-ab", "t-other"
SRC, DST, THIRD = "A", "B", "C"
OWNER = planner.Owner(TASK, SRC)

metadata = st.dictionaries(st.sampled_from(["env", "zone", "version"]), st.sampled_from(["a", "b"]), max_size=2)


@st.composite
def instances(draw: st.DrawFn) -> model.Instance:
    return model.Instance(
        host=draw(st.sampled_from(HOSTS)),
        port=draw(st.sampled_from(PORTS)),
        weight=draw(st.sampled_from([0.0, 0.5, 1.0, 2.0])),
        healthy=draw(st.booleans()),
        enabled=draw(st.booleans()),
        metadata=draw(metadata),
        protocol=draw(st.sampled_from(["", "http"])),
        cluster=draw(st.sampled_from(["", "c1"])),
        native_id=draw(st.sampled_from(["", "id-1", "id-2"])),
    )


def with_meta(inst: model.Instance, **extra: str) -> model.Instance:
    return inst.replace(metadata=model.freeze({**marks.strip(inst.metadata), **extra}))


#: every kind of record a destination may hold, as seen by task TASK copying from SRC
KINDS = {
    "native": lambda i: with_meta(i),
    "ours": lambda i: marks.stamp(i, TASK, SRC),
    "ours-relayed": lambda i: marks.stamp(i, TASK, THIRD),
    "other-task": lambda i: marks.stamp(i, OTHER_TASK, SRC),
    "other-task-elsewhere": lambda i: marks.stamp(i, OTHER_TASK, THIRD),
    "polaris-sync-of-our-source": lambda i: with_meta(i, **{marks.POLARIS_SYNC: SRC}),
    "polaris-sync-of-other": lambda i: with_meta(i, **{marks.POLARIS_SYNC: THIRD}),
    "polaris-sync-taken-by-other-task": lambda i: with_meta(
        i, **{marks.POLARIS_SYNC: SRC, marks.TASK: OTHER_TASK, marks.ORIGIN: SRC}),
}

records = st.builds(lambda kind, inst: KINDS[kind](inst), st.sampled_from(sorted(KINDS)), instances())

#: what a registry keyed by address holds (one record per address)
actual_by_address = st.lists(records, max_size=8, unique_by=lambda i: i.address)
#: what a registry keyed by more than the address may hold (Nacos: ip, port and cluster)
actual_any = st.lists(records, max_size=8)

#: copies the task wants, stamped as `desired()` stamps them (an address may repeat)
desired_copies = st.lists(
    st.builds(lambda i, origin: marks.stamp(i.replace(native_id=""), TASK, origin),
              instances(), st.sampled_from([SRC, THIRD])),
    max_size=8)
