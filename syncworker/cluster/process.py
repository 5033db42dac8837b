"""What one worker process keeps between jobs: identity, liveness, config, event loops, connectors.

Celery runs jobs in pool threads (the default `threads` pool). Connectors hold
clients bound to an event loop, so each pool thread keeps one loop and its own
connectors, reused from job to job (keyed by the endpoint's whole configuration,
so a changed endpoint gets a fresh connector). The applied config is parsed once
per version. A beat thread tells the store this process is alive; the leader
sends a dead worker's jobs elsewhere when the beat stops.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from syncworker.cluster import store as store_mod
from syncworker.cluster import supervise
from syncworker.config import models
from syncworker.config import settings as settings_mod
from syncworker.connectors import base, registry
from syncworker.reconcile import units

log = logging.getLogger("syncworker.worker")

T = TypeVar("T")

#: set when the worker begins to shut down: duties hand their leases back
SHUTDOWN = threading.Event()
#: connectors kept per pool thread
CONNECTORS_KEPT = 32

_identity = ""
_settings: settings_mod.Settings | None = None
_store: store_mod.Store | None = None
_config: tuple[int, models.RegistryConfig] | None = None
_config_lock = threading.Lock()
_local = threading.local()


def identity() -> str:
    """host:pid of the worker process (set before the pool starts, so pool children share it)."""
    global _identity
    if not _identity:
        _identity = f"{socket.gethostname()}:{os.getpid()}"
    return _identity


def settings() -> settings_mod.Settings:
    global _settings
    if _settings is None:
        _settings = settings_mod.Settings()
    return _settings


def store() -> store_mod.Store:
    global _store
    if _store is None:
        _store = store_mod.Store.from_settings(settings())
    return _store


def config(st: store_mod.Store) -> tuple[int, models.RegistryConfig]:
    """The config the leader applied, parsed once per version."""
    global _config
    version = st.applied_version()
    with _config_lock:
        if _config is not None and _config[0] == version:
            return _config
        stored = st.applied_config()
        if stored is None:
            _config = (0, models.RegistryConfig(tasks=[]))
        else:
            _config = (stored.version, store_mod.parse_applied(stored))
        return _config


def task_config(config: models.RegistryConfig, name: str) -> models.TaskConfig | None:
    return next((t for t in config.enabled_tasks() if t.name == name), None)


# ---- per-thread event loop and connectors ----------------------------------------------
def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on this thread's own event loop (kept for the thread's life)."""
    loop: asyncio.AbstractEventLoop | None = getattr(_local, "loop", None)
    if loop is None or loop.is_closed():
        loop = asyncio.new_event_loop()
        _local.loop = loop
        _local.connectors = collections.OrderedDict()
    return loop.run_until_complete(coro)


def _endpoint_key(ep: base.Endpoint) -> str:
    raw = json.dumps([ep.name, ep.type, list(ep.addresses), ep.token, ep.user, ep.password, dict(ep.options)],
                     sort_keys=True, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()


async def connector(cfg: models.EndpointConfig) -> base.Connector:
    """An opened connector for this endpoint, shared by the jobs of this thread."""
    ep = units.endpoint_of(cfg)
    cache: collections.OrderedDict[str, base.Connector] = _local.connectors
    key = _endpoint_key(ep)
    conn = cache.get(key)
    if conn is not None:
        cache.move_to_end(key)
        return conn
    conn = registry.create(ep)
    await conn.open()
    cache[key] = conn
    while len(cache) > CONNECTORS_KEPT:
        _, old = cache.popitem(last=False)
        try:
            await old.close()
        except Exception as exc:  # closing a stale client must not fail a job
            log.debug("closing a connector failed", extra={"error": str(exc)})
    return conn


# ---- liveness ----------------------------------------------------------------------------
def start_beat(st: store_mod.Store, ttl: float, **info: object) -> threading.Thread:
    """Say 'alive' every third of `ttl` until the process ends (also while it shuts down: its jobs finish)."""
    me = identity()
    if (parent := supervise.supervisor_pid()) is not None:
        info = {**info, "supervisor": parent}  # the `syncworker worker` that restarts this process

    def beat() -> None:
        while True:
            try:
                st.say_alive(me, ttl, role="worker", pid=os.getpid(), **info)
            except Exception as exc:
                log.warning("liveness beat failed", extra={"error": str(exc)})
            time.sleep(ttl / 3)

    thread = threading.Thread(target=beat, name="syncworker-alive", daemon=True)
    thread.start()
    return thread
