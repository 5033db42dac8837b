"""The dirty queue: bursts coalesce, a unit never runs twice at once, delayed marks."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import pytest

from syncworker.reconcile import dirtyqueue

from .helpers import run


async def nothing_ready(q: dirtyqueue.DirtyQueue, wait: float = 0.05) -> bool:
    try:
        key = await asyncio.wait_for(q.get(), wait)
    except TimeoutError:
        return True
    q.done(key)
    return False


def test_a_burst_of_marks_is_queued_once() -> None:
    async def main() -> None:
        q = dirtyqueue.DirtyQueue()
        for _ in range(100):
            q.mark("u")
        q.mark("v")
        assert q.pending() == 2 and q.marks == 101 and q.coalesced == 99
        assert {await q.get(), await q.get()} == {"u", "v"}
        q.done("u")
        q.done("v")
        assert await nothing_ready(q)
    run(main())


def test_a_mark_during_a_run_reruns_once_after_it_never_beside_it() -> None:
    async def main() -> None:
        q = dirtyqueue.DirtyQueue()
        q.mark("u")
        assert await q.get() == "u" and q.running("u")
        for _ in range(5):
            q.mark("u")
        assert q.pending() == 1
        assert await nothing_ready(q)  # not handed out while it runs
        q.done("u")
        assert await asyncio.wait_for(q.get(), 1) == "u"
        q.done("u")
        assert await nothing_ready(q)  # five marks, one rerun
    run(main())


def test_many_workers_never_run_a_unit_twice_at_once_and_lose_no_mark() -> None:
    async def main() -> None:
        q = dirtyqueue.DirtyQueue()
        keys = [f"u{i}" for i in range(5)]
        active: dict[str, int] = dict.fromkeys(keys, 0)
        worst = 0
        last_mark: dict[str, float] = {}
        last_start: dict[str, float] = {}

        async def worker() -> None:
            nonlocal worst
            while True:
                key = await q.get()
                active[key] += 1
                worst = max(worst, active[key])
                last_start[key] = time.monotonic()
                await asyncio.sleep(random.uniform(0, 0.004))
                active[key] -= 1
                q.done(key)

        workers = [asyncio.create_task(worker()) for _ in range(4)]
        rng = random.Random(7)
        for _ in range(300):
            key = rng.choice(keys)
            last_mark[key] = time.monotonic()
            q.mark(key)
            if rng.random() < 0.3:
                await asyncio.sleep(0)
        while q.pending() or any(q.running(k) for k in keys):
            await asyncio.sleep(0.005)
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        assert worst == 1
        # level-triggered: every unit started a run after its last mark
        assert all(last_start[k] >= last_mark[k] for k in last_mark)
    run(main())


def test_delayed_mark_becomes_ready_when_due() -> None:
    async def main() -> None:
        q = dirtyqueue.DirtyQueue()
        timers = asyncio.create_task(q.run_timers())
        try:
            start = time.monotonic()
            q.mark("u", 0.3)
            assert q.pending() == 1
            assert await nothing_ready(q, 0.1)
            assert await asyncio.wait_for(q.get(), 2) == "u"
            assert time.monotonic() - start >= 0.29
            q.done("u")
        finally:
            timers.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await timers
    run(main())


@pytest.mark.parametrize("order", [(0.05, 0.4), (0.4, 0.05)])
def test_of_two_delayed_marks_the_earliest_wins(order: tuple[float, float]) -> None:
    """The queue's contract: a unit waiting on a delayed mark is not run again for a later one (each
    run schedules its own recheck), and pending() reflects one waiting unit."""
    async def main() -> int:
        q = dirtyqueue.DirtyQueue()
        timers = asyncio.create_task(q.run_timers())
        runs = 0
        try:
            for delay in order:
                q.mark("u", delay)
            assert q.pending() == 1
            deadline = time.monotonic() + 0.7
            while time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    key = await asyncio.wait_for(q.get(), max(0.01, deadline - time.monotonic()))
                    runs += 1
                    q.done(key)
            assert q.pending() == 0
        finally:
            timers.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await timers
        return runs
    assert run(main()) == 1
