"""JSON forms of what cluster mode keeps in Redis or sends in Celery messages.

A unit travels as a reference (task, unit key suffix, source service); the worker
rebuilds the `Unit` from the task's config with `units.units_for`, so the config
stays the one source of truth. A unit's state (`UnitState`: held deletes, copies
for heartbeats, counters) is stored between runs, by whichever worker ran it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from pydantic import SecretStr

from syncworker import model
from syncworker.config import models
from syncworker.connectors import base
from syncworker.reconcile import unit as unit_mod
from syncworker.reconcile import units

Json = dict[str, Any]


# ---- unit references -------------------------------------------------------------------
def ref_of(u: unit_mod.Unit) -> Json:
    """The Celery kwargs of a unit: readable in Flower (`{"task": "a-to-b", "unit": "ns/svc", ...}`)."""
    s = u.source_service
    return {"task": u.task, "unit": u.key[len(u.task) + 1:], "service": [s.namespace, s.group, s.name]}


def key_of(ref: Mapping[str, Any]) -> str:
    return f"{ref['task']}:{ref['unit']}"


def service_of(ref: Mapping[str, Any]) -> model.ServiceKey:
    ns, group, name = ref["service"]
    return model.ServiceKey(str(ns), str(group), str(name))


def resolve(cfg: models.TaskConfig, dest_caps: base.Capabilities, ref: Mapping[str, Any]) -> unit_mod.Unit | None:
    """The unit a reference names under this task config, or None when the config no longer has it."""
    svc = service_of(ref)
    key = key_of(ref)
    for m in cfg.match:
        if m.service == "*":
            if m.namespace != svc.namespace:
                continue
        elif units.parse_service(m.namespace, m.service) != svc:
            continue
        found = units.units_for(cfg, dest_caps, [svc], m).get(key)
        if found is not None:
            return found
    return None


# ---- instances and unit state ----------------------------------------------------------
def instance_to_json(i: model.Instance) -> Json:
    return {"host": i.host, "port": i.port, "weight": i.weight, "healthy": i.healthy, "enabled": i.enabled,
            "metadata": dict(i.metadata), "protocol": i.protocol, "cluster": i.cluster, "ephemeral": i.ephemeral,
            "native_id": i.native_id}


def instance_from_json(d: Mapping[str, Any]) -> model.Instance:
    return model.Instance(host=d["host"], port=int(d["port"]), weight=float(d["weight"]), healthy=d["healthy"],
                          enabled=d["enabled"], metadata=dict(d["metadata"]), protocol=d["protocol"],
                          cluster=d["cluster"], ephemeral=d["ephemeral"], native_id=d.get("native_id", ""))


def state_to_json(s: unit_mod.UnitState) -> Json:
    doc = {f.name: getattr(s, f.name) for f in dataclasses.fields(s)}
    doc["ops"] = dict(s.ops)
    doc["pending_deletes"] = [[h, p, t] for (h, p), t in s.pending_deletes.items()]
    doc["copies"] = [instance_to_json(c) for c in s.copies]
    return doc


def state_from_json(d: Mapping[str, Any]) -> unit_mod.UnitState:
    fields = {f.name for f in dataclasses.fields(unit_mod.UnitState)}
    kwargs = {k: v for k, v in d.items() if k in fields}
    kwargs["pending_deletes"] = {(str(h), int(p)): float(t) for h, p, t in d.get("pending_deletes", [])}
    kwargs["copies"] = tuple(instance_from_json(c) for c in d.get("copies", []))
    return unit_mod.UnitState(**kwargs)


def status_row(task: str, service: str, destination: str, s: unit_mod.UnitState, **extra: object
               ) -> dict[str, object]:
    """One row of /status, the same fields as the embedded engine's `Engine.status()`."""
    return {"task": task, "service": service, "destination": destination, "source_instances": s.source_count,
            "in_sync": s.in_sync, "clashes": s.clashes, "skipped": s.skipped, "held_deletes": s.held_deletes,
            "outcome": s.outcome, "error": s.error, "last_run": s.last_run, "last_ok": s.last_ok,
            "ops": dict(s.ops), "runs": s.runs, **extra}


# ---- config ----------------------------------------------------------------------------
def config_text(config: models.RegistryConfig) -> str:
    """The config as canonical JSON with its secrets (what the leader publishes for workers; never logged)."""

    def reveal(v: Any) -> Any:
        if isinstance(v, SecretStr):
            return v.get_secret_value()
        if isinstance(v, dict):
            return {k: reveal(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [reveal(x) for x in v]
        return v

    return json.dumps(reveal(config.model_dump(mode="python", by_alias=True)), sort_keys=True, default=str)
