"""Marking units dirty across the cluster: one queued Celery job per unit, however many marks.

A mark records the unit in the store's queued set and sends `syncworker.reconcile`
only when no job due as early is already queued: a burst of watch events, a pull
tick and a rerun all collapse into that one job, which clears the entry when it
starts (so a change after that start is a new mark). Marks that arrive while the
unit runs go through the same path and end as a rerun flag on the lock.

The leader dispatches through a `Dispatcher` whose `allowed` check is its
leadership: the moment ZooKeeper says the session is gone, nothing more is sent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from celery import Celery

from syncworker.cluster import celery_app, codec
from syncworker.cluster import store as store_mod

log = logging.getLogger("syncworker.dispatch")


class NotLeader(RuntimeError):
    """A dispatch was refused: this process no longer holds the leadership."""


class Dispatcher:
    def __init__(self, store: store_mod.Store, app: Celery | None = None,
                 allowed: Callable[[], bool] = lambda: True) -> None:
        self.store = store
        self.app = app or celery_app.app
        self.allowed = allowed
        self.sent = 0
        self.coalesced = 0

    def _check(self) -> None:
        if not self.allowed():
            raise NotLeader("leadership lost: dispatching stopped")

    def mark(self, ref: Mapping[str, Any], delay: float = 0.0) -> bool:
        """Queue a reconcile of the unit `ref` in `delay` seconds; False when it coalesced into a queued one."""
        self._check()
        due = time.time() + max(0.0, delay)
        if not self.store.queue(ref, due):
            self.coalesced += 1
            return False
        self._send(ref, delay)
        return True

    def redispatch(self, ref: Mapping[str, Any], delay: float = 0.0) -> None:
        """Send again a job whose worker vanished (its queued entry is replaced)."""
        self._check()
        self.store.dequeue(codec.key_of(ref))
        self.store.queue(ref, time.time() + delay)
        self._send(ref, delay)

    def _send(self, ref: Mapping[str, Any], delay: float) -> None:
        self.app.send_task(celery_app.RECONCILE, kwargs=dict(ref), countdown=delay if delay > 0 else None,
                           queue=self.store.prefix)
        self.sent += 1

    def duty(self, kind: str, task: str, debounce: float) -> bool:
        """Send a duty job unless one was sent less than `debounce` seconds ago and not yet taken up."""
        self._check()
        name = f"{kind}:{task}"
        if not self.store.duty_sent(name, debounce):
            return False
        self.app.send_task(celery_app.DUTY_TASKS[kind], kwargs={"task": task, "duty": kind},
                           queue=self.store.prefix)
        log.info("duty dispatched", extra={"duty": name})
        return True
