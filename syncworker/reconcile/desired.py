"""From a source listing to the copies a task wants at its destination (pure).

Loops are stopped here: a copy (a record with an origin mark) is not relayed
unless the task asks for relaying, and a record whose origin is the destination
itself never goes back home. Metadata filters, group filters, and the cluster
mapping apply here too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from syncworker import marks, model


@dataclasses.dataclass(frozen=True)
class CopyRules:
    task: str
    source: str
    destination: str
    relay: bool = False
    #: only instances whose metadata holds all these pairs are copied
    metadata_filter: Mapping[str, str] = dataclasses.field(default_factory=dict)
    only_healthy: bool = False
    #: source cluster -> destination cluster ("*" maps every cluster)
    cluster_map: Mapping[str, str] = dataclasses.field(default_factory=dict)


def desired(instances: Iterable[model.Instance], rules: CopyRules) -> list[model.Instance]:
    out: list[model.Instance] = []
    for inst in instances:
        origin = marks.origin(inst.metadata)
        if origin is not None:
            if origin == rules.destination:
                continue  # never copy home
            if not rules.relay:
                continue
        if any(inst.metadata.get(k) != v for k, v in rules.metadata_filter.items()):
            continue
        if rules.only_healthy and not (inst.healthy and inst.enabled):
            continue
        cluster = rules.cluster_map.get(inst.cluster, rules.cluster_map.get("*", inst.cluster))
        copy = inst.replace(cluster=cluster, native_id="")
        out.append(marks.stamp(copy, rules.task, origin or rules.source))
    return out
