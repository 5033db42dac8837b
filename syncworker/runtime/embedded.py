"""The embedded default: the whole product in one process, no ZooKeeper, no Redis.

The local process is the leader, the work queue is the engine's in-process dirty
queue, and the store is the engine's memory. It reloads the config file when it
changes, cleans up tasks that were removed (also while it was down, from the
last-good backup), reports status, and stops on SIGINT/SIGTERM without deleting
anything it wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path

from syncworker.config import models
from syncworker.connectors import registry
from syncworker.reconcile import engine as engine_mod
from syncworker.runtime import provider as provider_mod
from syncworker.runtime import status_http

log = logging.getLogger("syncworker.run")

StatusSink = Callable[[list[dict[str, object]]], None]


async def removed_while_down(eng: engine_mod.Engine, previous: models.RegistryConfig | None,
                             current: models.RegistryConfig) -> list[str]:
    if previous is None:
        return []
    now = {t.name for t in current.tasks}  # a disabled task is paused, not removed
    gone = [t for t in previous.enabled_tasks() if t.name not in now]
    for cfg in gone:
        await eng.cleanup_task(cfg)
    return [t.name for t in gone]


def write_report(path: Path, rows: list[dict[str, object]]) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"ts": time.time(), "units": rows}, default=str) + "\n")


async def run(config_path: str, backup_path: str, *, workers: int = 16, reload_interval: float = 1.0,
              report_file: str = "", status_sink: StatusSink | None = None,
              status_interval: float = 1.0, stop_event: asyncio.Event | None = None,
              status_port: int | None = None, status_host: str = "127.0.0.1") -> None:
    prov = provider_mod.FileProvider(config_path, backup_path)
    config = prov.load_initial()
    previous = prov.previous()
    eng = engine_mod.Engine(registry.create, workers=workers)
    stop = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    cleaned = await removed_while_down(eng, previous, config)
    if cleaned:
        log.info("tasks removed while stopped were cleaned up", extra={"tasks": cleaned})
    await eng.start(config)
    prov.save_backup()
    server = None
    if status_port is not None:
        server = status_http.StatusServer(eng.status, host=status_host, port=status_port)
        port = await server.start()
        log.info("status endpoint", extra={"url": f"http://{status_host}:{port}/status", "metrics": "/metrics"})
    log.info("running", extra={"config": config_path, "tasks": [t.name for t in config.enabled_tasks()]})
    report_every = models.parse_duration(config.report.interval) if config.report.targets else 0.0
    reporting = report_file and any(t.enable and t.type == "file" for t in config.report.targets)
    last_report = 0.0
    last_status = 0.0
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), reload_interval)
            new = prov.poll()
            if new is not None:
                await eng.apply_config(new)
                prov.save_backup()
                config = new
            now = time.monotonic()
            if status_sink and now - last_status >= status_interval:
                status_sink(eng.status())
                last_status = now
            if reporting and now - last_report >= report_every:
                write_report(Path(report_file), eng.status())
                last_report = now
    finally:
        if server is not None:
            await server.stop()
        await eng.stop()
        log.info("stopped; copies left in place")
