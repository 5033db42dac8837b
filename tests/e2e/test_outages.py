"""Outages: the source registry killed for a minute, and the sync process itself killed and restarted.

Neither may make a copy disappear: a failed read deletes nothing, and a crashed sync
leaves its copies where they are (Nacos copies are ephemeral with long preserved timeouts,
so a sync down for less than a minute leaves them untouched). After the outage the sync
goes on by itself, and a restarted sync adopts its copies without rewriting them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from syncworker import model
from syncworker.sandbox import base as sandbox_base
from syncworker.sandbox import catalog, harness
from tests.e2e.conftest import StartSync
from tests.e2e.helpers import (
    N2P,
    NACOS,
    P2N,
    POLARIS,
    Natives,
    RawReader,
    RecordKey,
    Side,
    converge,
    copy_records,
    env_seconds,
    fresh_namespace,
    nacos_endpoint,
    nacos_view,
    polaris_endpoint,
    polaris_view,
    total_ops,
    two_way,
    two_way_problems,
)

pytestmark = pytest.mark.peers

View = Callable[[Mapping[str, Any]], tuple[object, ...]]


def inst(host: str, port: int, **fields: Any) -> model.Instance:
    return model.Instance(host=host, port=port, **fields)


def lost_or_changed(before: Mapping[RecordKey, Mapping[str, Any]], now: Mapping[RecordKey, Mapping[str, Any]],
                    view: View, where: str) -> list[str]:
    out = []
    for key, rec in before.items():
        cur = now.get(key)
        if cur is None:
            out.append(f"{where}: copy {key} disappeared")
        elif view(cur) != view(rec):
            out.append(f"{where}: copy {key} changed: {view(rec)} -> {view(cur)}")
    return out


class Watcher:
    """Polls copies every `interval` seconds and collects every moment one is missing or changed."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.polls = 0
        self.max_gap = 0.0
        self.problems: list[str] = []

    async def watch(self, seconds: float, look: Callable[[], Any]) -> None:
        end = time.monotonic() + seconds
        last = time.monotonic()
        while time.monotonic() < end:
            for problem in await look():
                self.problems.append(f"t+{seconds - (end - time.monotonic()):.1f}s {problem}")
            self.polls += 1
            now = time.monotonic()
            self.max_gap = max(self.max_gap, now - last)
            last = now
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - now)))


def test_source_killed_60s_deletes_nothing(nacos: sandbox_base.Running, peers: harness.PeerPool,
                                           start_sync: StartSync) -> None:
    """A private Polaris (the source of Nacos's copies) is SIGKILLed for a minute: no copy goes; after its
    restart, new changes propagate with no manual step."""
    outage = env_seconds("SYNCWORKER_OUTAGE_SECONDS", 60.0)
    source = peers.fresh("polaris")
    ns = fresh_namespace("outage")
    n_ep, p_ep = nacos_endpoint(nacos), polaris_endpoint(source)
    config = two_way(n_ep, p_ep, ns, pull="5s")
    report: dict[str, object] = {}

    async def scenario() -> None:
        n = await Side(NACOS, n_ep, ns, P2N).open()
        p = await Side(POLARIS, p_ep, ns, N2P).open()
        raw = RawReader(nacos, source)
        natives: dict[str, Natives] = {NACOS: {}, POLARIS: {}}

        async def put(side: Side, service: str, native: model.Instance) -> None:
            natives[side.name].setdefault(service, {})[native.address] = native
            await side.put(service, native)

        try:
            await asyncio.gather(*(put(p, svc, inst(f"127.0.21.{i}", 7000 + j))
                                   for j, svc in enumerate(["src-a", "src-b"]) for i in range(1, 4)))
            await put(n, "back", inst("127.0.22.1", 7100))
            child = start_sync(config)
            await converge(lambda: two_way_problems(n, p, natives), 60.0, "initial sync")
            before = copy_records(await raw.nacos(ns))
            assert len(before) == 6, before

            source.kill()
            killed = time.monotonic()
            watcher = Watcher(0.15)

            async def look() -> list[str]:
                return lost_or_changed(before, copy_records(await raw.nacos(ns)), nacos_view, "nacos")

            seen: set[tuple[str, str]] = set()

            async def meanwhile() -> None:
                # a change on the other side during the outage, for after it
                await asyncio.sleep(min(5.0, outage / 4))
                await put(n, "back", inst("127.0.22.2", 7100))
                await asyncio.sleep(min(10.0, outage / 3))
                seen.update((r["task"], r["outcome"]) for r in await asyncio.to_thread(child.status) or [])

            await asyncio.gather(watcher.watch(outage - (time.monotonic() - killed), look), meanwhile())
            report["down (s)"] = round(time.monotonic() - killed, 1)
            report["polls"], report["max gap (s)"] = watcher.polls, round(watcher.max_gap, 3)
            assert child.alive(), child.log_tail()
            assert not watcher.problems, "during the outage:\n  " + "\n  ".join(watcher.problems[:20])
            report["status during the outage"] = sorted(seen)
            assert (P2N, "error") in seen, f"the outage went unnoticed: {report}"

            await asyncio.to_thread(source.restart)
            await asyncio.to_thread(catalog.get("polaris").wait_ready, source)
            back = time.monotonic()
            report["restart (s)"] = round(back - killed - outage, 1)
            # new changes at the source after its return, and the one made in Nacos meanwhile
            await put(p, "src-a", inst("127.0.21.9", 7000, weight=2.0))
            await put(p, "src-b", inst("127.0.21.1", 7001, metadata={"after": "outage"}))
            report["converged after restart (s)"] = round(await converge(
                lambda: two_way_problems(n, p, natives), 60.0, "changes after the source came back"), 1)
            assert not lost_or_changed({k: v for k, v in before.items() if k[0] == "src-a"},
                                       copy_records(await raw.nacos(ns)), nacos_view, "nacos")
        finally:
            await asyncio.gather(n.close(), p.close(), raw.close())

    try:
        asyncio.run(scenario())
    finally:
        source.stop()
    print(f"source outage: {report}")


def test_sync_killed_and_restarted_no_copy_disappears(nacos: sandbox_base.Running, polaris: sandbox_base.Running,
                                                      start_sync: StartSync) -> None:
    """SIGKILL the sync, keep it down, restart it: no copy ever disappears, and the restart rewrites nothing."""
    down = env_seconds("SYNCWORKER_SYNC_DOWN_SECONDS", 15.0)
    ns = fresh_namespace("crash")
    n_ep, p_ep = nacos_endpoint(nacos), polaris_endpoint(polaris)
    config = two_way(n_ep, p_ep, ns, pull="5s")
    report: dict[str, object] = {}

    async def scenario() -> None:
        n = await Side(NACOS, n_ep, ns, P2N).open()
        p = await Side(POLARIS, p_ep, ns, N2P).open()
        raw = RawReader(nacos, polaris)
        natives: dict[str, Natives] = {
            NACOS: {"k-a": {(f"127.0.23.{i}", 7200): inst(f"127.0.23.{i}", 7200, weight=0.5 * i) for i in (1, 2)},
                    "k-b": {(f"127.0.23.{i}", 7201): inst(f"127.0.23.{i}", 7201, enabled=i == 1) for i in (1, 2)}},
            POLARIS: {"k-a": {(f"127.0.24.{i}", 7200): inst(f"127.0.24.{i}", 7200, healthy=i == 1) for i in (1, 2)},
                      "k-c": {(f"127.0.24.{i}", 7202): inst(f"127.0.24.{i}", 7202, metadata={"i": str(i)})
                              for i in (1, 2)}},
        }
        try:
            await asyncio.gather(*(side.put(svc, i) for side in (n, p) for svc, m in natives[side.name].items()
                                   for i in m.values()))
            child = start_sync(config)
            await converge(lambda: two_way_problems(n, p, natives), 60.0, "initial sync")
            await asyncio.sleep(1.0)  # Nacos serves reads from a cache refreshed about 0.5 s after a write
            n_before, p_before = copy_records(await raw.nacos(ns)), copy_records(await raw.polaris(ns))
            assert len(n_before) == 4 and len(p_before) == 4, (n_before, p_before)

            async def look() -> list[str]:
                n_now, p_now = await asyncio.gather(raw.nacos(ns), raw.polaris(ns))
                return (lost_or_changed(n_before, copy_records(n_now), nacos_view, "nacos")
                        + lost_or_changed(p_before, copy_records(p_now), polaris_view, "polaris"))

            child.kill()
            watcher = Watcher(0.1)
            await watcher.watch(down, look)
            report["down: polls"], report["down: max gap (s)"] = watcher.polls, round(watcher.max_gap, 3)
            assert not watcher.problems, "while the sync was down:\n  " + "\n  ".join(watcher.problems[:20])

            child.start()
            restarted = time.monotonic()

            async def until_settled() -> None:
                """Until every unit of the new process has run and ended ok."""
                while True:
                    rows = await asyncio.to_thread(child.status)
                    if rows and all(r["runs"] >= 1 and r["outcome"] == "ok" for r in rows):
                        report["restart: all units ok after (s)"] = round(time.monotonic() - restarted, 1)
                        return
                    assert child.alive(), child.log_tail()
                    assert time.monotonic() - restarted < 60, f"units not ok after the restart: {rows}"
                    await asyncio.sleep(0.1)

            after = Watcher(0.1)
            watching = asyncio.create_task(after.watch(3600, look))
            try:
                await until_settled()
                await asyncio.sleep(6.0)  # and more than a pull period on top
            finally:
                watching.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watching
            report["after restart: polls"] = after.polls
            assert not after.problems, "after the restart:\n  " + "\n  ".join(after.problems[:20])
            assert not await look()
            ops = total_ops(child.status() or [])
            assert not any(ops.values()), f"the restarted sync wrote {ops} although nothing had changed"
            assert await two_way_problems(n, p, natives) == []
        finally:
            await asyncio.gather(n.close(), p.close(), raw.close())

    asyncio.run(scenario())
    print(f"sync crash: {report}")
