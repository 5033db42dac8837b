"""From a task's config to its units (task x service x upstream group), shared by every runtime.

The embedded engine and the cluster scheduler both expand tasks with these
functions, so a unit has the same key and the same rules wherever it runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from syncworker import model
from syncworker.config import models
from syncworker.connectors import base
from syncworker.reconcile import desired, safety, unit

DEFAULT_GROUP = "DEFAULT_GROUP"


def parse_service(namespace: str, service: str) -> model.ServiceKey:
    """polaris-sync's `GROUP__name` service form; no prefix or DEFAULT_GROUP means the default group."""
    group, sep, name = service.partition("__")
    if not sep:
        return model.ServiceKey(namespace, "", service)
    return model.ServiceKey(namespace, "" if group == DEFAULT_GROUP else group, name)


def endpoint_of(cfg: models.EndpointConfig) -> base.Endpoint:
    return base.Endpoint(name=cfg.name, type=cfg.type, addresses=tuple(cfg.addresses),
                         token=cfg.token.get_secret_value(), user=cfg.user,
                         password=cfg.password.get_secret_value(), options=dict(cfg.options))


def same_destination(a: models.EndpointConfig, b: models.EndpointConfig) -> bool:
    """Whether two endpoint configs name the same place to write to.

    Credentials (token, user, password) and the order of the addresses do not change
    where copies live: a rotated token must not make a changed task clean up the copies
    it is about to keep. Any other difference (type, addresses, options such as a name
    prefix or a file path) may, so it counts.
    """
    ea, eb = endpoint_of(a), endpoint_of(b)
    return (ea.type, sorted(ea.addresses), ea.options) == (eb.type, sorted(eb.addresses), eb.options)


def policy_of(task: models.TaskConfig) -> safety.Policy:
    s = task.safety
    return safety.Policy(empty_grace=models.parse_duration(s.empty_grace),
                         max_delete_ratio=s.max_delete_ratio,
                         ratio_grace=models.parse_duration(s.ratio_grace))


def rules_of(cfg: models.TaskConfig, dest_caps: base.Capabilities) -> desired.CopyRules:
    return desired.CopyRules(task=cfg.name, source=cfg.source.name, destination=cfg.destination.name,
                             relay=cfg.relay, only_healthy=cfg.only_healthy or dest_caps.gateway)


def units_for(cfg: models.TaskConfig, dest_caps: base.Capabilities, services: Sequence[model.ServiceKey],
              m: models.MatchConfig) -> dict[str, unit.Unit]:
    out: dict[str, unit.Unit] = {}
    rules = dataclasses.replace(rules_of(cfg, dest_caps), metadata_filter=dict(m.metadata))
    for svc in services:
        ns = m.dest_namespace if m.dest_namespace is not None else svc.namespace
        name = m.dest_service or svc.name
        if not m.groups:
            u = unit.Unit(cfg.name, svc, model.ServiceKey(ns, svc.group, name), rules)
            out[u.key] = u
            continue
        # polaris-sync groups: one upstream holding every instance, one per group
        # holding the instances whose metadata matches; each is a unit of its own
        full = f"{svc.group}__{name}" if svc.group else name
        u = unit.Unit(cfg.name, svc, model.ServiceKey(ns, "", full), rules)
        out[u.key] = u
        for g in m.groups:
            sel = {**rules.metadata_filter, **g.selector()}
            u = unit.Unit(cfg.name, svc, model.ServiceKey(ns, g.name, full),
                          dataclasses.replace(rules, metadata_filter=sel), g.upstream_name)
            out[u.key] = u
    return out


async def discover(cfg: models.TaskConfig, source: base.Connector, dest_caps: base.Capabilities,
                   known: Mapping[str, unit.Unit]) -> tuple[dict[str, unit.Unit], list[str]]:
    """Every unit of a task now; a namespace whose listing fails keeps the units known in it."""
    found: dict[str, unit.Unit] = {}
    errors: list[str] = []
    for m in cfg.match:
        if m.service == "*":
            try:
                services = list(await source.list_services(m.namespace))
            except Exception as exc:
                errors.append(f"list services of namespace {m.namespace or 'default'!r}: {exc}")
                found.update({k: u for k, u in known.items() if u.source_service.namespace == m.namespace})
                continue
        else:
            services = [parse_service(m.namespace, m.service)]
        found.update(units_for(cfg, dest_caps, services, m))
    return found, errors
