"""The engine: turns tasks into units, keeps them converged, and reports their state.

Watch events and pull ticks only mark units dirty (`DirtyQueue`); a fixed pool of
worker coroutines runs `unit.reconcile` on dirty units, one run per unit at a
time. Failures come back as a delayed mark (exponential backoff); held deletes
come back when their grace runs out. The engine knows connectors only through
`connectors.base` and gets them from a factory, so the same engine runs in the
embedded process and inside cluster workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Sequence

from syncworker import model
from syncworker.config import models
from syncworker.connectors import base
from syncworker.reconcile import dirtyqueue, planner, ratelimit, safety, unit, units

log = logging.getLogger("syncworker.engine")

ConnectorFactory = Callable[[base.Endpoint], base.Connector]

# kept here for callers that know them as engine functions
parse_service = units.parse_service
endpoint_of = units.endpoint_of
policy_of = units.policy_of


#: retry delays double from 0.5 s up to this cap; a peer back from an outage gets the
#: current state within one cap (the gateways' "within 10 s of coming back")
MAX_BACKOFF = 5.0


def backoff(failures: int) -> float:
    """Exponential backoff with +-20 % jitter, so units failing together do not retry in lockstep."""
    base = min(MAX_BACKOFF, 0.5 * 2 ** max(0, failures - 1))
    return base * random.uniform(0.8, 1.2)


def still_has_copies(state: unit.UnitState | None) -> bool:
    """Whether a unit whose service is no longer listed may still have copies to converge."""
    if state is None:
        return False
    return state.runs == 0 or state.outcome != "ok" or state.held_deletes > 0 or state.in_sync > 0


@dataclasses.dataclass
class TaskRuntime:
    config: models.TaskConfig
    source: base.Connector
    dest: base.Connector
    policy: safety.Policy
    bucket: ratelimit.TokenBucket
    units: dict[str, unit.Unit] = dataclasses.field(default_factory=dict)
    loops: list[asyncio.Task[None]] = dataclasses.field(default_factory=list)
    discovery_error: str = ""



class Engine:
    def __init__(self, factory: ConnectorFactory, *, workers: int = 16, discover_interval: float = 10.0,
                 heartbeat_interval: float = 5.0) -> None:
        self.factory = factory
        self.queue = dirtyqueue.DirtyQueue()
        self.tasks: dict[str, TaskRuntime] = {}
        self.states: dict[str, unit.UnitState] = {}
        self.config = models.RegistryConfig()
        self.workers = workers
        self.discover_interval = discover_interval
        self.heartbeat_interval = heartbeat_interval
        self._loops: list[asyncio.Task[None]] = []
        self._idle = asyncio.Event()
        self._active = 0

    # ---- lifecycle -----------------------------------------------------------------
    async def start(self, config: models.RegistryConfig) -> None:
        self._loops.append(asyncio.create_task(self.queue.run_timers(), name="timers"))
        for i in range(self.workers):
            self._loops.append(asyncio.create_task(self._worker(), name=f"worker-{i}"))
        await self.apply_config(config)

    async def stop(self) -> None:
        """Stop everything; copies stay where they are (no delete on stop)."""
        for name in list(self.tasks):
            await self._stop_task(name)
        for loop in self._loops:
            loop.cancel()
        for loop in self._loops:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await loop
        self._loops.clear()

    async def apply_config(self, config: models.RegistryConfig) -> dict[str, list[str]]:
        """Start new tasks, restart changed ones, stop and clean up removed ones; keep the rest.

        A task set to `enable: false` is stopped and its copies stay (a pause); a task
        that is gone from the config has its copies deleted.
        """
        new = {t.name: t for t in config.enabled_tasks()}
        old = {name: rt.config for name, rt in self.tasks.items()}
        methods_changed = config.methods != self.config.methods
        changes: dict[str, list[str]] = {"added": [], "changed": [], "removed": [], "disabled": [], "kept": []}
        for name, cfg in old.items():
            if name not in new:
                known = list(self.tasks[name].units.values())
                await self._stop_task(name)
                if any(t.name == name for t in config.tasks):
                    changes["disabled"].append(name)  # paused: its copies stay
                    continue
                # the units it ran, so a source that cannot list its services now still gets cleaned
                await self._cleanup_units(cfg, known)
                changes["removed"].append(name)
        self.config = config
        for name, cfg in new.items():
            if name in old and old[name] == cfg and not methods_changed:
                changes["kept"].append(name)
                continue
            if name in old:
                before = list(self.tasks[name].units.values())
                await self._stop_task(name)
                changes["changed"].append(name)
                if not units.same_destination(old[name].destination, cfg.destination):
                    # another destination: its copies go before the new task starts, so this
                    # cleanup can never delete what the new task writes (same task, same marks)
                    await self._cleanup_units(old[name], before)
                    await self._start_task(cfg)
                    continue
                await self._start_task(cfg)
                rt = self.tasks[name]
                kept = {u.dest_service for u in rt.units.values()}
                orphans = [u for u in before if u.dest_service not in kept]
                if orphans and rt.discovery_error:
                    # an incomplete listing is not a removal: nothing is deleted on a failed read
                    log.warning("changed task: copies under services it may no longer have are kept, "
                                "since its service listing failed", extra={
                                    "task": name, "units": len(orphans), "error": rt.discovery_error})
                elif orphans:
                    await self._cleanup_units(old[name], orphans)
                continue
            changes["added"].append(name)
            await self._start_task(cfg)
        log.info("config applied", extra={"changes": changes})
        return changes

    async def _start_task(self, cfg: models.TaskConfig) -> None:
        source = self.factory(endpoint_of(cfg.source))
        dest = self.factory(endpoint_of(cfg.destination))
        rt = TaskRuntime(cfg, source, dest, policy_of(cfg), ratelimit.TokenBucket(cfg.rate_limit))
        self.tasks[cfg.name] = rt
        await source.open()
        await dest.open()
        await self._discover(rt)
        for key in rt.units:
            self.queue.mark(key)
        rt.loops.append(asyncio.create_task(self._discovery_loop(rt), name=f"discover-{cfg.name}"))
        pull = self.config.method("pull")
        if pull is not None:
            rt.loops.append(asyncio.create_task(
                self._pull_loop(rt, models.parse_duration(pull.interval)), name=f"pull-{cfg.name}"))
        if self.config.method("watch") is not None and source.capabilities.watch:
            source.watch_busy = lambda: self._backlog(rt)
            rt.loops.append(asyncio.create_task(self._watch_loop(rt), name=f"watch-{cfg.name}"))
        if dest.capabilities.needs_heartbeats:
            rt.loops.append(asyncio.create_task(self._heartbeat_loop(rt), name=f"beat-{cfg.name}"))

    async def _stop_task(self, name: str) -> None:
        rt = self.tasks.pop(name, None)
        if rt is None:
            return
        for loop in rt.loops:
            loop.cancel()
        for loop in rt.loops:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await loop
        # wait for running reconciles of this task to finish before closing its connectors
        while any(self.queue.running(k) for k in rt.units):
            await asyncio.sleep(0.02)
        for key in rt.units:
            self.states.pop(key, None)
        await rt.source.close()
        await rt.dest.close()

    # ---- units ---------------------------------------------------------------------
    def _units_for(self, rt: TaskRuntime, services: Sequence[model.ServiceKey],
                   m: models.MatchConfig) -> dict[str, unit.Unit]:
        return units.units_for(rt.config, rt.dest.capabilities, services, m)

    async def _discover(self, rt: TaskRuntime) -> list[str]:
        """(Re)build the unit list; a failed listing keeps the units known so far."""
        found, errors = await units.discover(rt.config, rt.source, rt.dest.capabilities, rt.units)
        added = [k for k in found if k not in rt.units]
        # a service that is no longer listed keeps its unit until its copies are gone
        # (the empty-source grace still applies to them)
        for key, u in rt.units.items():
            if key not in found and self._still_has_copies(key):
                found[key] = u
        rt.units = found
        rt.discovery_error = "; ".join(errors)
        for key in found:
            self.states.setdefault(key, unit.UnitState())
        return added

    def _backlog(self, rt: TaskRuntime) -> bool:
        """Whether more of the task's units wait for a worker than the workers can take at once."""
        waiting = 0
        for key in rt.units:
            waiting += self.queue.ready(key)
            if waiting > self.workers:
                return True
        return False

    def _still_has_copies(self, key: str) -> bool:
        return still_has_copies(self.states.get(key))

    def _runtime_of(self, key: str) -> tuple[TaskRuntime, unit.Unit] | None:
        for rt in self.tasks.values():
            if key in rt.units:
                return rt, rt.units[key]
        return None

    async def _worker(self) -> None:
        while True:
            key = await self.queue.get()
            self._active += 1
            try:
                found = self._runtime_of(key)
                if found is None:
                    continue
                rt, u = found
                state = self.states.setdefault(key, unit.UnitState())
                result = await unit.reconcile(u, rt.source, rt.dest, state, rt.policy, throttle=rt.bucket.take)
                if not result.ok:
                    delay = backoff(state.failures)
                    log.warning("unit failed", extra={"unit": key, "error": result.error, "retry_in": delay})
                    self.queue.mark(key, delay)
                else:
                    state.failures = 0
                    if result.recheck_in is not None:
                        self.queue.mark(key, result.recheck_in + 0.05)
            except Exception:
                log.exception("reconcile crashed", extra={"unit": key})
                self.queue.mark(key, 5.0)
            finally:
                self._active -= 1
                self.queue.done(key)

    # ---- loops ---------------------------------------------------------------------
    async def _pull_loop(self, rt: TaskRuntime, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            for key in rt.units:
                self.queue.mark(key)

    async def _discovery_loop(self, rt: TaskRuntime) -> None:
        if not any(m.service == "*" for m in rt.config.match):
            return
        while True:
            await asyncio.sleep(self.discover_interval)
            for key in await self._discover(rt):
                self.queue.mark(key)

    async def _watch_loop(self, rt: TaskRuntime) -> None:
        failures = 0
        while True:
            services = [u.source_service for u in rt.units.values()]
            namespaces = [m.namespace for m in rt.config.match if m.service == "*"]
            try:
                async for event in rt.source.watch(services, namespaces):
                    failures = 0
                    self._on_event(rt, event)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                delay = backoff(failures)
                log.warning("watch failed", extra={"task": rt.config.name, "error": str(exc), "retry_in": delay})
                await asyncio.sleep(delay)
                for key in rt.units:  # we may have missed events: resync
                    self.queue.mark(key)

    def _on_event(self, rt: TaskRuntime, event: base.WatchEvent) -> None:
        if event is None:
            for key in rt.units:
                self.queue.mark(key)
            return
        hits = [k for k, u in rt.units.items() if u.source_service == event]
        if hits:
            for key in hits:
                self.queue.mark(key)
            return
        for m in rt.config.match:
            if m.service == "*" and m.namespace == event.namespace:
                new = self._units_for(rt, [event], m)
                rt.units.update(new)
                for key in new:
                    self.states.setdefault(key, unit.UnitState())
                    self.queue.mark(key)

    async def _heartbeat_loop(self, rt: TaskRuntime) -> None:
        while True:
            for key, u in list(rt.units.items()):
                state = self.states.get(key)
                copies = [c for c in state.copies if c.ephemeral] if state else []
                if copies:
                    try:
                        await rt.dest.heartbeat(u.dest_service, copies)
                    except Exception as exc:
                        # a copy the registry dropped comes back with a reconcile now, not at the next pull
                        log.warning("heartbeat failed; reconciling", extra={"unit": key, "error": str(exc)})
                        self.queue.mark(key)
            await asyncio.sleep(self.heartbeat_interval)

    # ---- removal -------------------------------------------------------------------
    async def cleanup_task(self, cfg: models.TaskConfig) -> int:
        """Delete every copy a removed task owns at its destination (its units as configured)."""
        source = self.factory(endpoint_of(cfg.source))
        try:
            await source.open()
            rt = TaskRuntime(cfg, source, self.factory(endpoint_of(cfg.destination)), policy_of(cfg),
                             ratelimit.TokenBucket(0))
            await self._discover(rt)
        finally:
            await source.close()
        return await self._cleanup_units(cfg, list(rt.units.values()))

    async def _cleanup_units(self, cfg: models.TaskConfig, units: Sequence[unit.Unit]) -> int:
        """Delete the copies `cfg`'s task owns under these units' destination services."""
        for u in units:
            self.states.pop(u.key, None)
        return await cleanup_units(self.factory, cfg, units)

    # ---- observation ---------------------------------------------------------------
    def busy(self) -> bool:
        return self._active > 0 or self.queue.pending() > 0

    async def settle(self, timeout: float = 30.0) -> bool:
        """Wait until no unit is queued or running (tests and benchmarks)."""
        deadline = time.monotonic() + timeout
        quiet = 0
        while time.monotonic() < deadline:
            quiet = quiet + 1 if not self.busy() else 0
            if quiet >= 3:
                return True
            await asyncio.sleep(0.02)
        return False

    def status(self) -> list[dict[str, object]]:
        rows: list[dict[str, object]] = []
        for name, rt in sorted(self.tasks.items()):
            for key, u in sorted(rt.units.items()):
                s = self.states.get(key, unit.UnitState())
                rows.append({
                    "task": name, "service": str(u.source_service), "destination": str(u.dest_service),
                    "source_instances": s.source_count, "in_sync": s.in_sync, "clashes": s.clashes,
                    "skipped": s.skipped, "held_deletes": s.held_deletes, "outcome": s.outcome,
                    "error": s.error or rt.discovery_error, "last_run": s.last_run, "last_ok": s.last_ok,
                    "ops": dict(s.ops), "runs": s.runs,
                })
        return rows


async def cleanup_units(factory: ConnectorFactory, cfg: models.TaskConfig, units: Sequence[unit.Unit]) -> int:
    """Delete the copies `cfg`'s task owns under these units' destination services.

    Then a gateway retires what it made for each unit whose copies are all gone (its
    upstream, service, route, cluster or block; see `Connector.retire`); a unit whose
    read or deletes failed keeps them. Nothing here raises for one unit's trouble.
    Shared by the engine (a removed or changed task) and the cluster scheduler.
    """
    dest = factory(endpoint_of(cfg.destination))
    owner = planner.Owner(cfg.name, cfg.source.name)
    removed = retired = 0
    try:
        await dest.open()
        # a gateway's service object goes with its default unit, so that unit comes after its groups
        for u in sorted(units, key=lambda u: not u.dest_service.group):
            deleted, clean = await _delete_copies(dest, owner, u)
            removed += deleted
            if clean:
                retired += await _retire(dest, cfg.name, u)
    finally:
        await dest.close()
    log.info("copies of a removed task or unit cleaned up",
             extra={"task": cfg.name, "deleted": removed, "retired": retired})
    return removed


async def _delete_copies(dest: base.Connector, owner: planner.Owner, u: unit.Unit) -> tuple[int, bool]:
    """(copies deleted, whether every owned copy of the unit is gone now)."""
    dest.bind_upstream(u.dest_service, u.upstream_name)
    try:
        listing = await dest.list_instances(u.dest_service)
    except Exception as exc:
        log.warning("cleanup read failed", extra={"unit": u.key, "error": str(exc)})
        return 0, False
    p = planner.plan([], listing.instances, owner)
    if not p.deletes:
        return 0, True
    ctx = base.ApplyContext(task=owner.task, desired=(), upstream_name=u.upstream_name)
    try:
        outcomes = await dest.apply(u.dest_service, planner.Plan(deletes=p.deletes), ctx)
    except Exception as exc:
        log.warning("cleanup deletes failed", extra={"unit": u.key, "error": f"{type(exc).__name__}: {exc}"})
        return 0, False
    failed = [o for o in outcomes if not o.ok]
    if failed:
        log.warning("cleanup deletes failed; the unit's gateway objects stay",
                    extra={"unit": u.key, "failed": len(failed), "error": failed[0].error})
    return len(outcomes) - len(failed), not failed


async def _retire(dest: base.Connector, task: str, u: unit.Unit) -> int:
    """Let the destination retire the unit's gateway objects; how many it deleted (never raises)."""
    try:
        done = await dest.retire(u.dest_service, base.ApplyContext(task=task, upstream_name=u.upstream_name))
    except Exception as exc:  # a connector bug must not stop the cleanup of the other units
        log.warning("retiring gateway objects failed; nothing more deleted",
                    extra={"unit": u.key, "error": f"{type(exc).__name__}: {exc}"})
        return 0
    for r in done:
        extra = {"unit": u.key, "object": f"{r.kind} {r.name}", "reason": r.reason}
        if r.action == base.DELETED:
            log.info("gateway object of a removed unit deleted", extra=extra)
        elif r.action == base.KEPT:
            log.info("gateway object of a removed unit kept", extra=extra)
        else:
            log.warning("retiring a gateway object failed; nothing more deleted", extra=extra)
    return sum(1 for r in done if r.action == base.DELETED)
