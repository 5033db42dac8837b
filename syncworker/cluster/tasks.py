"""The Celery tasks a worker runs: reconcile one unit, and the watch and heartbeat duties.

`syncworker.reconcile` runs `reconcile.unit.reconcile` (the embedded engine's own
function) under the unit's cluster-wide lock, with the unit's state loaded from
and saved to the store. A job that finds the unit locked flags a rerun for the
holder and ends: the holder runs the unit once more after its run, so a unit
never runs twice at once and marks are never lost. A failed run is retried with
the engine's backoff; held deletes come back when their grace runs out.

`syncworker.watch` and `syncworker.heartbeat` are long jobs held under a lease
in the store: the holder renews it, and hands it back when its term
(`duty_max`) ends, when the task's config changes, or when the worker shuts
down; the leader dispatches a duty whose lease is gone to any worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from celery import Task, bootsteps, signals

from syncworker import model
from syncworker.cluster import celery_app, codec, dispatch, process
from syncworker.cluster import store as store_mod
from syncworker.config import models
from syncworker.connectors import base, registry
from syncworker.reconcile import engine, units
from syncworker.reconcile import unit as unit_mod

log = logging.getLogger("syncworker.tasks")
app = celery_app.app


# ---- reconcile ---------------------------------------------------------------------------
@app.task(name=celery_app.RECONCILE, bind=True, max_retries=None)
def reconcile_unit(self: Task, task: str, unit: str, service: list[str], **_: Any) -> dict[str, object]:
    """Converge one unit (kwargs: the task's name, the unit, its source service)."""
    st = process.store()
    cfg = process.settings()
    me = process.identity()
    ref = {"task": task, "unit": unit, "service": list(service)}
    key = codec.key_of(ref)
    runs = 0
    outcome = "no run"
    while True:
        got = st.start_run(ref, me, cfg.lock_ttl)
        if isinstance(got, store_mod.Busy):
            if got.holder and not st.alive(got.holder):
                # the holder died: its lock runs out in got.ttl seconds, then this job runs
                st.queue(ref, time.time() + got.ttl + 0.2)
                raise self.retry(countdown=got.ttl + 0.2)
            return {"unit": key, "outcome": f"running on {got.holder}: rerun flagged", "runs": runs}
        start = time.time()
        result: unit_mod.Result | None = None
        state: unit_mod.UnitState | None = None
        try:
            outcome, result, state = process.run(_hold(st, got, cfg.lock_ttl, _reconcile(st, ref, key, me)))
        except Exception as exc:
            outcome = f"crashed: {type(exc).__name__}: {exc}"
            log.exception("reconcile crashed", extra={"unit": key})
        finally:
            end = time.time()
            rerun = st.finish_run(got)
            st.record_run(key, me, start, end, outcome)
        runs += 1
        if (result is not None and not result.ok) or outcome.startswith(("crashed", "lock lost")):
            failures = state.failures if state is not None else 1
            delay = engine.backoff(failures)
            log.warning("unit failed", extra={"unit": key, "error": outcome, "retry_in": round(delay, 2)})
            st.queue(ref, time.time() + delay)
            raise self.retry(countdown=delay)
        if result is not None and result.recheck_in is not None:
            dispatch.Dispatcher(st).mark(ref, result.recheck_in + 0.05)
        if not rerun:
            return {"unit": key, "outcome": outcome, "runs": runs, "worker": me,
                    "ops": result.plan.counts() if result else {}}


async def _hold(st: store_mod.Store, lock: store_mod.Lock, ttl: float,
                job: Awaitable[tuple[str, unit_mod.Result | None, unit_mod.UnitState | None]]
                ) -> tuple[str, unit_mod.Result | None, unit_mod.UnitState | None]:
    """Run `job` while renewing the lock; a lock that cannot be renewed cancels the job."""
    running = asyncio.ensure_future(job)
    while True:
        done, _ = await asyncio.wait({running}, timeout=ttl / 3)
        if done:
            return running.result()
        if not st.renew_lock(lock, ttl):
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await running
            return "lock lost: run cancelled", None, None


async def _reconcile(st: store_mod.Store, ref: Mapping[str, Any], key: str, me: str
                     ) -> tuple[str, unit_mod.Result | None, unit_mod.UnitState | None]:
    version, config = process.config(st)
    tcfg = process.task_config(config, ref["task"])
    if tcfg is None:
        return f"skipped: task not in config v{version}", None, None
    source = await process.connector(tcfg.source)
    dest = await process.connector(tcfg.destination)
    u = codec.resolve(tcfg, dest.capabilities, ref)
    if u is None:
        return f"skipped: unit not in config v{version}", None, None
    state = st.load_state(key) or unit_mod.UnitState()

    async def throttle(n: int) -> None:
        while (wait := st.take_tokens(tcfg.name, n, tcfg.rate_limit)) > 0:
            await asyncio.sleep(wait)

    # wall-clock time: held deletes are timed across workers
    result = await unit_mod.reconcile(u, source, dest, state, units.policy_of(tcfg), throttle=throttle,
                                      clock=time.time)
    if result.ok:
        state.failures = 0
    st.save_state(key, state, task=tcfg.name, service=str(u.source_service), destination=str(u.dest_service),
                  worker=me, config_version=version)
    return state.outcome if result.ok else f"error: {result.error}", result, state


# ---- duties ------------------------------------------------------------------------------
Body = Callable[[store_mod.Store, models.TaskConfig], Awaitable[str]]


@app.task(name=celery_app.WATCH, bind=True)
def watch_duty(self: Task, task: str, duty: str = "watch", **_: Any) -> dict[str, object]:
    """Hold the task's watch: each source event marks the units it concerns."""
    return _duty("watch", task, _watch)


@app.task(name=celery_app.HEARTBEAT, bind=True)
def heartbeat_duty(self: Task, task: str, duty: str = "heartbeat", **_: Any) -> dict[str, object]:
    """Keep the task's ephemeral copies alive at a destination that needs heartbeats."""
    return _duty("heartbeat", task, _heartbeat)


def duty_slots(concurrency: int) -> int:
    """Duties one worker holds at most, so reconciles always keep pool slots."""
    return max(1, concurrency // 2)


def _duty(kind: str, task: str, body: Body) -> dict[str, object]:
    st = process.store()
    cfg = process.settings()
    me = process.identity()
    name = f"{kind}:{task}"
    mine = sum(1 for lease in st.leases().values() if lease.get("owner") == me)
    if mine >= duty_slots(_concurrency):
        return {"duty": name, "outcome": f"refused: this worker already holds {mine} duties"}
    lease = st.acquire_lease(name, me, cfg.lease_ttl)
    if lease is None:
        holder = (st.lease(name) or {}).get("owner", "?")
        return {"duty": name, "outcome": f"held by {holder}"}
    st.duty_started(name)
    log.info("duty taken", extra={"duty": name})
    try:
        reason = process.run(_supervise(st, lease, task, kind, body, cfg.lease_ttl, cfg.duty_max))
    finally:
        st.release_lease(lease)
    log.info("duty handed back", extra={"duty": name, "reason": reason})
    return {"duty": name, "outcome": reason, "worker": me}


async def _supervise(st: store_mod.Store, lease: store_mod.Lock, task: str, kind: str, body: Body,
                     ttl: float, term: float) -> str:
    _, config = process.config(st)
    tcfg = process.task_config(config, task)
    if tcfg is None:
        return "task not in the config"
    job = asyncio.ensure_future(body(st, tcfg))
    deadline = time.monotonic() + term
    try:
        while True:
            done, _ = await asyncio.wait({job}, timeout=min(ttl / 3, 2.0))
            if done:
                return job.result()
            if not st.renew_lease(lease, ttl):
                return "lease lost"
            if process.SHUTDOWN.is_set():
                return "worker shutting down"
            if time.monotonic() > deadline:
                return "term over"
            _, now = process.config(st)
            if process.task_config(now, task) != tcfg or (kind == "watch" and now.methods != config.methods):
                return "config changed"
    finally:
        job.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await job


class _Units:
    """A watch's view of its task's units: refreshed from the store when an event names an unknown service."""

    def __init__(self, st: store_mod.Store, tcfg: models.TaskConfig) -> None:
        self.st = st
        self.tcfg = tcfg
        self.refs: dict[str, dict[str, Any]] = {}
        self.loaded = 0.0

    def refresh(self) -> None:
        self.refs = self.st.units(self.tcfg.name)
        self.loaded = time.monotonic()

    def of(self, svc: model.ServiceKey) -> list[dict[str, Any]]:
        hits = [r for r in self.refs.values() if codec.service_of(r) == svc]
        if not hits and time.monotonic() - self.loaded > 1.0:
            self.refresh()
            hits = [r for r in self.refs.values() if codec.service_of(r) == svc]
        return hits


async def _watch(st: store_mod.Store, tcfg: models.TaskConfig) -> str:
    source = registry.create(units.endpoint_of(tcfg.source))
    dest_caps = registry.connector_class(tcfg.destination.type).capabilities
    marks = dispatch.Dispatcher(st)
    known = _Units(st, tcfg)
    failures = 0
    await source.open()
    try:
        while True:
            known.refresh()
            services = sorted({codec.service_of(r) for r in known.refs.values()})
            namespaces = [m.namespace for m in tcfg.match if m.service == "*"]
            try:
                async for event in source.watch(services, namespaces):
                    failures = 0
                    _on_event(event, tcfg, dest_caps, known, marks)
                return "watch ended"
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                delay = engine.backoff(failures)
                log.warning("watch failed", extra={"task": tcfg.name, "error": str(exc), "retry_in": delay})
                await asyncio.sleep(delay)
                known.refresh()
                for ref in known.refs.values():  # events may have been missed: resync
                    marks.mark(ref)
    finally:
        await source.close()


def _on_event(event: base.WatchEvent, tcfg: models.TaskConfig, dest_caps: base.Capabilities, known: _Units,
              marks: dispatch.Dispatcher) -> None:
    """The engine's `_on_event`, with the store for memory: mark the units of a changed service."""
    if event is None:
        known.refresh()
        for ref in known.refs.values():
            marks.mark(ref)
        return
    hits = known.of(event)
    if hits:
        for ref in hits:
            marks.mark(ref)
        return
    for m in tcfg.match:
        if m.service == "*" and m.namespace == event.namespace:
            new = [codec.ref_of(u) for u in units.units_for(tcfg, dest_caps, [event], m).values()]
            known.st.add_units(tcfg.name, new)
            known.refs.update({codec.key_of(r): r for r in new})
            for ref in new:
                marks.mark(ref)


async def _heartbeat(st: store_mod.Store, tcfg: models.TaskConfig) -> str:
    """The engine's `_heartbeat_loop`, with the copies from the store."""
    dest = registry.create(units.endpoint_of(tcfg.destination))
    interval = process.settings().heartbeat_interval
    marks = dispatch.Dispatcher(st)
    await dest.open()
    try:
        while True:
            for key, ref in st.units(tcfg.name).items():
                state = st.load_state(key)
                copies = [c for c in state.copies if c.ephemeral] if state else []
                u = codec.resolve(tcfg, dest.capabilities, ref) if copies else None
                if u is None:
                    continue
                try:
                    await dest.heartbeat(u.dest_service, copies)
                except Exception as exc:
                    # a copy the registry dropped comes back with a reconcile now, not at the next pull
                    log.warning("heartbeat failed; reconciling", extra={"unit": key, "error": str(exc)})
                    marks.mark(ref)
            await asyncio.sleep(interval)
    finally:
        await dest.close()


# ---- worker process signals ---------------------------------------------------------------
_concurrency = 1


class _DutiesStop(bootsteps.StartStopStep):
    """Stops the duties before the pool waits for its jobs, on every way a worker stops (a signal, or
    an unrecoverable broker error, after which Celery stops without the `worker_shutting_down`
    signal); otherwise a duty would keep the process alive for the rest of its term."""

    requires = ("celery.worker.components:Pool",)

    def stop(self, worker: Any) -> None:
        process.SHUTDOWN.set()

    def shutdown(self, worker: Any) -> None:
        process.SHUTDOWN.set()


app.steps["worker"].add(_DutiesStop)


@signals.worker_init.connect
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    global _concurrency
    _concurrency = int(getattr(sender, "concurrency", 1) or 1)
    process.identity()  # fixed now, before any pool child is forked


@signals.worker_ready.connect
def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    st = process.store()
    node = getattr(sender, "hostname", "")
    process.start_beat(st, process.settings().alive_ttl, node=node, concurrency=_concurrency)
    log.info("worker ready", extra={"worker": process.identity(), "node": node, "concurrency": _concurrency,
                                    "queue": st.prefix})


@signals.worker_shutting_down.connect
def _on_worker_shutting_down(**_: Any) -> None:
    process.SHUTDOWN.set()


@signals.task_received.connect
def _on_task_received(request: Any = None, **_: Any) -> None:
    if request is None or getattr(request, "name", "") != celery_app.RECONCILE:
        return
    kwargs = getattr(request, "kwargs", None) or {}
    if "task" in kwargs and "unit" in kwargs:
        try:
            process.store().received(codec.key_of(kwargs), process.identity())
        except Exception as exc:  # bookkeeping only: the job itself still runs
            log.warning("could not note a received job", extra={"error": str(exc)})
