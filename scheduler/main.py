"""One scheduler process: join the election, lead when elected, stand by again when leadership ends.

Any number of schedulers may run; one leads. Each says it is alive in the
store and may serve the status endpoint. Leadership ends when ZooKeeper's
session is in doubt (the leader's loops are cancelled and its dispatcher
refuses at once), when the leader's loop fails (it resigns, and the election
picks a leader again), or on SIGINT/SIGTERM (it resigns, so a standby takes
over at once instead of after the session timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket

from scheduler import election as election_mod
from scheduler import leader as leader_mod
from scheduler import status as status_mod
from syncworker.cluster import store as store_mod
from syncworker.config import models
from syncworker.config import settings as settings_mod

log = logging.getLogger("syncworker.scheduler")


def identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def config_source(st: store_mod.Store, settings: settings_mod.Settings, config_path: str | None
                  ) -> leader_mod.ConfigSource:
    if settings.config_provider == "redis":
        return leader_mod.RedisSource(st)
    path = config_path or settings.config_file
    return leader_mod.FileSource(path, settings.backup_path(path))


async def run(settings: settings_mod.Settings, config_path: str | None = None, status_port: int | None = None,
              stop: asyncio.Event | None = None) -> None:
    me = identity()
    st = store_mod.Store.from_settings(settings)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    elect = election_mod.Election(settings.zookeeper, settings.zk_root, me, settings.zk_session_timeout)
    server = None
    if status_port is not None:
        server = status_mod.ClusterStatusServer(st, elect.leading, host=settings.status_host, port=status_port)
        port = await server.start()
        log.info("status endpoint", extra={"url": f"http://{settings.status_host}:{port}/status",
                                           "also": ["/metrics", "/cluster", "/healthz"]})
    beat = asyncio.create_task(_alive(st, settings, me, elect), name="alive")
    await asyncio.to_thread(elect.start)
    ran: models.RegistryConfig | None = None
    log.info("scheduler up; standing by", extra={"identity": me, "zk_root": settings.zk_root,
                                                  "provider": settings.config_provider})
    try:
        while not stop.is_set():
            campaign = asyncio.ensure_future(asyncio.to_thread(elect.campaign))
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({campaign, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set():
                elect.cancel()
                with contextlib.suppress(Exception):
                    await campaign
                break
            stopping.cancel()
            if not campaign.result():
                await asyncio.sleep(0.5)
                continue
            ran = await _lead(st, settings, me, elect, config_source(st, settings, config_path), stop, ran)
    finally:
        beat.cancel()
        if server is not None:
            await server.stop()
        await asyncio.to_thread(elect.stop)
        log.info("scheduler stopped; copies left in place")


async def _lead(st: store_mod.Store, settings: settings_mod.Settings, me: str, elect: election_mod.Election,
                source: leader_mod.ConfigSource, stop: asyncio.Event, ran: models.RegistryConfig | None
                ) -> models.RegistryConfig | None:
    """Lead until leadership ends; returns the config it ran (a fallback should Redis lose everything)."""
    log.info("leading", extra={"identity": me})
    leader = leader_mod.Leader(st, settings, me, source, allowed=elect.leading, fallback=ran)
    job = asyncio.create_task(leader.run(), name="leader")
    while elect.leading() and not stop.is_set() and not job.done():
        await asyncio.sleep(0.05)
    job.cancel()
    try:
        await job
    except asyncio.CancelledError:
        pass
    except Exception:
        log.exception("leader loop failed; resigning")
        await asyncio.sleep(1.0)  # a store or registry outage: do not churn the election
    graceful = stop.is_set() and elect.leading()
    await asyncio.to_thread(elect.resign)
    if graceful:
        with contextlib.suppress(Exception):
            st.drop_leader(me)
    log.info("no longer leading", extra={"identity": me})
    return leader.config or ran


async def _alive(st: store_mod.Store, settings: settings_mod.Settings, me: str,
                 elect: election_mod.Election) -> None:
    while True:
        try:
            st.say_alive(me, settings.alive_ttl, role="scheduler", pid=os.getpid(), leading=elect.leading())
        except Exception as exc:
            log.warning("liveness beat failed", extra={"error": str(exc)})
        await asyncio.sleep(settings.alive_ttl / 3)
