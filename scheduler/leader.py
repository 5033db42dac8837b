"""What the elected leader does, until it stops leading.

- Reads the config from its provider (a file, as the embedded run does, or the
  config pushed to Redis) and publishes it to the store for workers. A change is
  applied within a reload interval: removed tasks are cleaned up (the engine's
  `cleanup_units`, under each unit's lock), changed tasks restart (their duties'
  leases are taken back, units they no longer have are cleaned up), the rest
  keep running. The config applied last is in the store, so a new leader
  compares with what its predecessor ran, and cleans up tasks removed meanwhile.
- Expands tasks into units with `reconcile.units.discover` (the embedded
  engine's own expansion), again every `discover_interval` for "*" namespaces.
- Dispatches a pull cycle per task every pull interval, and every unit when it
  starts leading (as the engine marks every unit when it starts a task).
- Keeps every watch and heartbeat duty under a live lease: a duty without one is
  dispatched to any worker.
- Sends again the jobs of workers that vanished (taken but not done).

Every dispatch checks the leadership first; the caller cancels `run()` when
ZooKeeper says it is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from syncworker import errors
from syncworker.cluster import codec, dispatch
from syncworker.cluster import store as store_mod
from syncworker.config import loader, models
from syncworker.config import settings as settings_mod
from syncworker.connectors import base, registry
from syncworker.reconcile import engine, units
from syncworker.reconcile import unit as unit_mod
from syncworker.runtime import provider as provider_mod

log = logging.getLogger("syncworker.leader")

ConnectorFactory = Callable[[base.Endpoint], base.Connector]
#: seconds between sweeps for jobs of vanished workers, and between duty checks
SWEEP_EVERY = 2.0
DUTY_EVERY = 1.0
#: seconds a held unit lock is waited for before a cleanup goes ahead anyway
CLEANUP_LOCK_WAIT = 30.0


# ---- config providers ----------------------------------------------------------------------
class ConfigSource(Protocol):
    def initial(self) -> models.RegistryConfig | None: ...

    def poll(self) -> models.RegistryConfig | None: ...

    def accepted(self) -> None: ...


class FileSource:
    """The task file on the scheduler's disk (`FileProvider`: reload on change, last-good backup)."""

    def __init__(self, path: str, backup: str) -> None:
        self.provider = provider_mod.FileProvider(path, backup)

    def initial(self) -> models.RegistryConfig | None:
        return self.provider.load_initial()

    def poll(self) -> models.RegistryConfig | None:
        return self.provider.poll()

    def accepted(self) -> None:
        with contextlib.suppress(OSError):
            self.provider.save_backup()


class RedisSource:
    """The config pushed with `syncworker config push` (validated before it was stored)."""

    def __init__(self, st: store_mod.Store) -> None:
        self.store = st
        self.version = -1

    def initial(self) -> models.RegistryConfig | None:
        return self._read()

    def poll(self) -> models.RegistryConfig | None:
        if self.store.pushed_version() == self.version:
            return None
        return self._read()

    def _read(self) -> models.RegistryConfig | None:
        stored = self.store.pushed_config()
        if stored is None:
            # none (yet, or Redis restarted empty): the next push, whatever its version, is read
            self.version = 0
            return None
        self.version = stored.version
        try:
            return loader.load_text(stored.text, f"<pushed v{stored.version}>")
        except errors.ConfigError as exc:  # pushed by something that skipped validation
            log.error("pushed config refused; running config stays in force",
                      extra={"version": stored.version, "problems": [str(p) for p in exc.problems]})
            return None

    def accepted(self) -> None:
        return None


# ---- the leader ----------------------------------------------------------------------------
@dataclasses.dataclass
class TaskCtl:
    config: models.TaskConfig
    source: base.Connector
    dest_caps: base.Capabilities
    units: dict[str, unit_mod.Unit] = dataclasses.field(default_factory=dict)
    loops: list[asyncio.Task[None]] = dataclasses.field(default_factory=list)
    discovery_error: str = ""


class Leader:
    def __init__(self, st: store_mod.Store, settings: settings_mod.Settings, identity: str, source: ConfigSource,
                 allowed: Callable[[], bool], factory: ConnectorFactory = registry.create,
                 fallback: models.RegistryConfig | None = None) -> None:
        self.store = st
        self.settings = settings
        self.identity = identity
        self.source = source
        self.factory = factory
        self.dispatch = dispatch.Dispatcher(st, allowed=allowed)
        self.tasks: dict[str, TaskCtl] = {}
        self.config: models.RegistryConfig | None = None
        #: the config this process ran when it led before (used when the store has lost everything)
        self.fallback = fallback
        self._loops: list[asyncio.Task[None]] = []

    # ---- lifecycle -----------------------------------------------------------------------
    async def run(self) -> None:
        """Lead until cancelled; stopping leaves every copy in place."""
        try:
            self.store.set_leader(self.identity, self._leader_ttl())
            await self.apply(self._initial_config())
            self._loops = [self._every(1.0, self._beat, "leader-beat"),
                           self._every(self.settings.reload_interval, self._reload, "reload"),
                           self._every(DUTY_EVERY, self._duties, "duties"),
                           self._every(SWEEP_EVERY, self.sweep, "sweep")]
            await asyncio.gather(*self._loops)
        finally:
            for loop in self._loops:
                loop.cancel()
            for name in list(self.tasks):
                await self._stop_task(name)

    def _initial_config(self) -> models.RegistryConfig:
        config = self.source.initial()
        if config is not None:
            return config
        stored = self.store.applied_config()
        if stored is not None:
            return store_mod.parse_applied(stored)
        if self.fallback is not None:
            log.warning("the store holds no config: running the one this scheduler ran before")
            return self.fallback
        log.info("no config yet: waiting for `syncworker config push`")
        return models.RegistryConfig(tasks=[])

    def _leader_ttl(self) -> float:
        return max(3.0, self.settings.zk_session_timeout)

    @staticmethod
    def _spawn(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        return asyncio.create_task(coro, name=name)

    def _every(self, seconds: float, body: Callable[[], Any], name: str, first: float = 0.0) -> asyncio.Task[None]:
        """A loop that runs `body` (sync or async) every `seconds`; a failed round (Redis or a registry
        away) is logged and the loop goes on. Only a lost leadership ends it."""

        async def loop() -> None:
            await asyncio.sleep(first)
            failing = False
            while True:
                try:
                    result = body()
                    if asyncio.iscoroutine(result):
                        await result
                    failing = False
                except (dispatch.NotLeader, asyncio.CancelledError):
                    raise
                except Exception as exc:
                    if not failing:
                        log.warning("leader loop failed; retrying", extra={"loop": name, "error": str(exc)})
                    failing = True
                await asyncio.sleep(seconds)

        return self._spawn(loop(), name)

    def _beat(self) -> None:
        self.store.set_leader(self.identity, self._leader_ttl())
        if self.config is not None and self.store.applied_version() == 0:
            # Redis restarted empty (no persistence): put back what workers need and resync
            log.warning("the store lost the applied config (Redis restarted?): publishing it again")
            self.store.publish_applied(codec.config_text(self.config), self.identity)
            for name, ctl in self.tasks.items():
                refs = [codec.ref_of(u) for u in ctl.units.values()]
                self.store.set_units(name, refs)
                for ref in refs:
                    self.dispatch.mark(ref)

    async def _reload(self) -> None:
        new = self.source.poll()
        if new is not None:
            await self.apply(new)

    # ---- config --------------------------------------------------------------------------
    async def apply(self, config: models.RegistryConfig) -> dict[str, list[str]]:
        """Make `config` the running one: the engine's `apply_config`, against the store's last applied config."""
        stored = self.store.applied_config()
        old = store_mod.parse_applied(stored) if stored is not None else None
        changes: dict[str, list[str]] = {"added": [], "changed": [], "removed": [], "disabled": [], "kept": []}
        if self.config is not None and old == config and self.tasks:
            return changes
        new = {t.name: t for t in config.enabled_tasks()}
        before = {t.name: t for t in old.enabled_tasks()} if old is not None else {}
        methods_changed = old is not None and old.methods != config.methods
        changed = {name for name, cfg in before.items() if name in new and (cfg != new[name] or methods_changed)}
        # `enable: false` pauses a task: stopped, its copies stay; only a task gone from the config is removed
        paused = {t.name for t in config.tasks if not t.enable}
        # what removed and changed tasks ran is noted before the new config is published: a leader
        # that dies in between leaves the cleanup to the next one
        for name, cfg in before.items():
            if (name not in new and name not in paused) or name in changed:
                self.store.add_cleanup(name, codec.config_text(models.RegistryConfig(tasks=[cfg])),
                                       self.store.units(name).values())
        # published first: from now on workers skip what is gone and run what changed as it is now
        self.store.publish_applied(codec.config_text(config), self.identity)
        self.config = config
        self.source.accepted()
        for name in before:
            if name not in new:
                await self._stop_task(name)
                changes["disabled" if name in paused else "removed"].append(name)
        for name, cfg in new.items():
            if name in self.tasks and name not in changed:
                changes["kept"].append(name)
                continue
            await self._stop_task(name)
            if name in changed:
                for kind in ("watch", "heartbeat"):  # its duties restart with the new config
                    self.store.drop_lease(f"{kind}:{name}")
            await self._start_task(cfg)
            changes["changed" if name in changed else "added" if name not in before else "kept"].append(name)
        await self.finish_cleanups()
        log.info("config applied", extra={"changes": changes, "version": self.store.applied_version()})
        return changes

    def _resolved(self, cfg: models.TaskConfig, refs: Any) -> list[unit_mod.Unit]:
        caps = registry.connector_class(cfg.destination.type).capabilities
        found = (codec.resolve(cfg, caps, ref) for ref in refs)
        return [u for u in found if u is not None]

    def _stored_units(self, cfg: models.TaskConfig) -> list[unit_mod.Unit]:
        return self._resolved(cfg, self.store.units(cfg.name).values())

    async def finish_cleanups(self) -> None:
        """Clean up after every removed or changed task noted in the store (also a former leader's)."""
        for name, entry in self.store.cleanups().items():
            try:
                cfg = store_mod.parse_applied(store_mod.StoredConfig(entry["config"], 0, "")).tasks[0]
                await self._finish_cleanup(name, cfg, self._resolved(cfg, entry["units"]))
            except dispatch.NotLeader:
                raise
            except Exception as exc:  # kept in the store: the next config change or leader tries again
                log.warning("cleanup failed; it stays owed", extra={"task": name, "error": str(exc)})
                continue
            self.store.cleanup_done(name)

    async def _finish_cleanup(self, name: str, old: models.TaskConfig, known: list[unit_mod.Unit]) -> None:
        ctl = self.tasks.get(name)
        if ctl is None:
            # removed: every copy it owns goes (the units it ran, else as configured)
            if not known:
                source = self.factory(units.endpoint_of(old.source))
                caps = registry.connector_class(old.destination.type).capabilities
                try:
                    await source.open()
                    found, _ = await units.discover(old, source, caps, {})
                    known = list(found.values())
                finally:
                    await source.close()
            await self._cleanup(old, known)
            self.store.forget_task(name, [u.key for u in known])
            for kind in ("watch", "heartbeat"):
                self.store.drop_lease(f"{kind}:{name}")
            return
        # changed: copies under destination services it no longer has go
        same_dest = units.same_destination(old.destination, ctl.config.destination)
        kept = {u.dest_service for u in ctl.units.values()} if same_dest else set()
        orphans = [u for u in known if u.dest_service not in kept]
        if orphans and same_dest and ctl.discovery_error:
            # an incomplete listing is not a removal: the cleanup stays owed until one completes
            raise errors.TemporaryError(f"task {name}: its service listing failed ({ctl.discovery_error}); "
                                        f"copies under {len(orphans)} service(s) it may no longer have are kept")
        if orphans:
            await self._cleanup(old, orphans)

    async def _cleanup(self, cfg: models.TaskConfig, gone: list[unit_mod.Unit]) -> int:
        """`engine.cleanup_units` once no worker runs these units (their locks are held meanwhile)."""
        locks: list[store_mod.Lock] = []
        ttl = max(self.settings.lock_ttl, 300.0)
        try:
            for u in gone:
                deadline = time.monotonic() + CLEANUP_LOCK_WAIT
                while (lock := self.store.try_lock(u.key, self.identity, ttl)) is None:
                    if time.monotonic() > deadline:
                        log.warning("unit still locked; cleaning up anyway", extra={"unit": u.key})
                        break
                    await asyncio.sleep(0.1)
                if lock is not None:
                    locks.append(lock)
            return await engine.cleanup_units(self.factory, cfg, gone)
        finally:
            for lock in locks:
                self.store.release_lock(lock)
            self.store.drop_states(u.key for u in gone)

    # ---- tasks and units -----------------------------------------------------------------
    async def _start_task(self, cfg: models.TaskConfig) -> TaskCtl:
        source = self.factory(units.endpoint_of(cfg.source))
        ctl = TaskCtl(cfg, source, registry.connector_class(cfg.destination.type).capabilities)
        self.tasks[cfg.name] = ctl
        try:
            await source.open()
        except Exception as exc:  # discovery retries; explicit services need no listing
            log.warning("source did not open", extra={"task": cfg.name, "error": str(exc)})
        ctl.units = {u.key: u for u in self._stored_units(cfg)}
        await self._discover(ctl)
        for u in ctl.units.values():
            self.dispatch.mark(codec.ref_of(u))
        every = self.settings.discover_interval
        if any(m.service == "*" for m in cfg.match):
            ctl.loops.append(self._every(every, lambda: self._discover_new(ctl), f"discover-{cfg.name}", every))
        assert self.config is not None
        pull = self.config.method("pull")
        if pull is not None:
            interval = models.parse_duration(pull.interval)
            ctl.loops.append(self._every(interval, lambda: self._pull(ctl), f"pull-{cfg.name}", interval))
        return ctl

    async def _stop_task(self, name: str) -> None:
        ctl = self.tasks.pop(name, None)
        if ctl is None:
            return
        for loop in ctl.loops:
            loop.cancel()
        for loop in ctl.loops:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await loop
        with contextlib.suppress(Exception):
            await ctl.source.close()

    async def _discover(self, ctl: TaskCtl) -> list[unit_mod.Unit]:
        """The task's units now (the engine's `_discover`); returns the new ones."""
        # units a watch added since the last listing
        for ref in self.store.units(ctl.config.name).values():
            u = codec.resolve(ctl.config, ctl.dest_caps, ref)
            if u is not None:
                ctl.units.setdefault(u.key, u)
        found, problems = await units.discover(ctl.config, ctl.source, ctl.dest_caps, ctl.units)
        # a service no longer listed keeps its unit until its copies are gone
        for key, u in ctl.units.items():
            if key not in found:
                state = self.store.load_state(key)
                if state is None or engine.still_has_copies(state):
                    found[key] = u
        added = [u for k, u in found.items() if k not in ctl.units]
        ctl.units = found
        ctl.discovery_error = "; ".join(problems)
        if problems:
            log.warning("discovery incomplete", extra={"task": ctl.config.name, "error": ctl.discovery_error})
        self.store.set_units(ctl.config.name, [codec.ref_of(u) for u in found.values()])
        return added

    async def _discover_new(self, ctl: TaskCtl) -> None:
        for u in await self._discover(ctl):
            self.dispatch.mark(codec.ref_of(u))

    def _pull(self, ctl: TaskCtl) -> None:
        for ref in self.store.units(ctl.config.name).values():
            self.dispatch.mark(ref)

    # ---- duties and lost jobs ------------------------------------------------------------
    def needed_duties(self, ctl: TaskCtl) -> list[str]:
        assert self.config is not None
        kinds = []
        if self.config.method("watch") is not None and ctl.source.capabilities.watch:
            kinds.append("watch")
        if ctl.dest_caps.needs_heartbeats:
            kinds.append("heartbeat")
        return kinds

    def _duties(self) -> None:
        """Dispatch every duty that has no live lease (its holder died, or it never started)."""
        debounce = self.settings.lease_ttl + 5.0
        for name, ctl in list(self.tasks.items()):
            for kind in self.needed_duties(ctl):
                if self.store.lease(f"{kind}:{name}") is None:
                    self.dispatch.duty(kind, name, debounce)

    def sweep(self) -> int:
        """Dispatch again every job taken by a worker that is gone, or queued too long; returns how many."""
        alive = set(self.store.members())
        now = time.time()
        again: dict[str, str] = {}
        backlog: int | None = None
        for key, entry in self.store.queued().items():
            worker = entry.get("worker") or ""
            overdue = now - float(entry["due"])
            if worker and worker not in alive:
                again[key] = f"taken by {worker}, gone"
            elif not worker and overdue > self.settings.alive_ttl:
                # not noted by any worker: still in the broker's queue, unless the queue is empty (then a
                # worker fetched it and died before it could say so)
                backlog = self.store.broker_backlog() if backlog is None else backlog
                if backlog and overdue < self.settings.queue_timeout:
                    continue
                again[key] = f"queued {now - float(entry['at']):.0f}s ago, not taken, {backlog} waiting"
            else:
                continue
            self.dispatch.redispatch(entry["ref"])
        for key, entry in self.store.running().items():
            if entry.get("worker") not in alive:
                self.store.clear_running(key)
                self.dispatch.redispatch(entry["ref"])
                again[key] = f"running on {entry.get('worker')}, gone"
        if again:
            log.info("lost jobs dispatched again",
                     extra={"jobs": len(again), "units": dict(list(again.items())[:10])})
        return len(again)
