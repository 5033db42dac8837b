"""A queue of dirty units: a burst of marks on one unit collapses into one run.

A unit is queued at most once. A mark that arrives while the unit is running
sets a rerun flag instead, so the unit runs once more after the current run and
never twice at once (the per-unit lock of the design). Marks may carry a delay
(retry backoff, held deletes); the earliest one wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time


class DirtyQueue:
    def __init__(self) -> None:
        self._queued: set[str] = set()
        self._running: set[str] = set()
        self._rerun: set[str] = set()
        self._ready: asyncio.Queue[str] = asyncio.Queue()
        self._delayed: list[tuple[float, int, str]] = []
        #: key -> when its one live delayed mark is due (older heap entries are stale)
        self._due: dict[str, float] = {}
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self.marks = 0
        self.coalesced = 0

    def mark(self, key: str, delay: float = 0.0) -> None:
        self.marks += 1
        if delay > 0:
            due = time.monotonic() + delay
            if self._due.get(key, due + 1) <= due:
                self.coalesced += 1
                return
            self._due[key] = due
            heapq.heappush(self._delayed, (due, next(self._seq), key))
            self._wake.set()
            return
        if key in self._running:
            if key in self._rerun:
                self.coalesced += 1
            self._rerun.add(key)
            return
        if key in self._queued:
            self.coalesced += 1
            return
        self._queued.add(key)
        self._ready.put_nowait(key)

    async def get(self) -> str:
        key = await self._ready.get()
        self._queued.discard(key)
        self._running.add(key)
        return key

    def done(self, key: str) -> None:
        self._running.discard(key)
        if key in self._rerun:
            self._rerun.discard(key)
            self.mark(key)

    def pending(self) -> int:
        return len(self._queued) + len(self._rerun) + len(self._due)

    def running(self, key: str) -> bool:
        return key in self._running

    def ready(self, key: str) -> bool:
        """Whether `key` waits for a worker now (not running, not a delayed retry)."""
        return key in self._queued

    async def run_timers(self) -> None:
        """Move delayed marks to the ready queue when due; runs for the engine's lifetime."""
        while True:
            now = time.monotonic()
            while self._delayed and self._delayed[0][0] <= now:
                due, _, key = heapq.heappop(self._delayed)
                if self._due.get(key) != due:
                    continue  # superseded by an earlier mark
                del self._due[key]
                self.mark(key)
            timeout = self._delayed[0][0] - now if self._delayed else None
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
