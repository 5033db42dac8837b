"""Leader election through ZooKeeper: a kazoo lock under `<zk_root>/leader`.

Every scheduler queues for the lock (an ephemeral sequential node holding its
identity); the first in the queue leads, the others block until the node before
theirs goes. A leader whose process dies loses its node when its session
expires (`zk_session_timeout`), and the next in line leads.

Leadership ends the moment the connection is in doubt: a SUSPENDED or LOST state
sets `lost`, which the dispatcher checks before every send. Pausing on SUSPENDED
is what makes this safe: another scheduler can only be elected after the
session expired on the server, which is later than this client notices the
connection is gone.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import CancelledError, KazooException, NoNodeError
from kazoo.recipe.lock import Lock
from kazoo.retry import KazooRetry

log = logging.getLogger("syncworker.election")


class Election:
    def __init__(self, hosts: str, root: str, identity: str, session_timeout: float) -> None:
        self.identity = identity
        self.path = f"{root.rstrip('/')}/leader"
        self.client = KazooClient(hosts=hosts, timeout=session_timeout,
                                  connection_retry=KazooRetry(max_tries=-1, delay=0.2, max_delay=1.0))
        #: set whenever this process does not (or may not) lead
        self.lost = threading.Event()
        self.lost.set()
        self._mutex = threading.Lock()
        self._lock: Lock | None = None
        self.client.add_listener(self._on_state)

    def _on_state(self, state: str) -> None:
        if state != KazooState.CONNECTED:
            with self._mutex:
                self.lost.set()
            log.warning("zookeeper connection %s: not leading", state.lower())

    def start(self, timeout: float = 30.0) -> None:
        self.client.start(timeout=timeout)

    def leading(self) -> bool:
        return not self.lost.is_set()

    def campaign(self) -> bool:
        """Block until this process leads (True), or the campaign was cancelled or failed (False)."""
        if self.client.state != KazooState.CONNECTED:
            time.sleep(0.5)  # the caller tries again; a node made now could not be cleaned up
            return False
        try:
            self._drop_stale()
        except KazooException as exc:
            log.warning("election attempt failed", extra={"error": str(exc)})
            return False
        with self._mutex:
            self._lock = self.client.Lock(self.path, self.identity)
            lock = self._lock
        try:
            got = lock.acquire(blocking=True)
        except CancelledError:
            return False
        except KazooException as exc:
            log.warning("election attempt failed", extra={"error": str(exc)})
            return False
        if not got:
            return False
        with self._mutex:
            if self.client.state == KazooState.CONNECTED:
                self.lost.clear()
                return True
        self.resign()
        return False

    def _drop_stale(self) -> None:
        """Delete queue nodes this process left behind (a session that survived a disconnection keeps
        them, and a new campaign would wait behind its own old node forever)."""
        try:
            children = self.client.get_children(self.path)
        except NoNodeError:
            return
        for child in children:
            node = f"{self.path}/{child}"
            try:
                data, _ = self.client.get(node)
                if data.decode(errors="replace") == self.identity:
                    self.client.delete(node)
                    log.info("stale election node removed", extra={"node": child})
            except NoNodeError:
                continue

    def cancel(self) -> None:
        """Stop a campaign blocked in `campaign()` (on shutdown)."""
        with self._mutex:
            if self._lock is not None:
                self._lock.cancel()

    def resign(self) -> None:
        """Stop leading and leave the queue (best effort: a lost session has removed the node already)."""
        self.lost.set()
        with self._mutex:
            lock, self._lock = self._lock, None
        # released only while connected (a release retries until it reaches the server); without a
        # connection the node goes with the session
        if lock is not None and self.client.state == KazooState.CONNECTED:
            with contextlib.suppress(KazooException, Exception):
                lock.release()

    def contenders(self) -> list[str]:
        """Identities in the queue, the leader first."""
        try:
            return list(self.client.Lock(self.path).contenders())
        except KazooException:
            return []

    def stop(self) -> None:
        self.resign()
        with contextlib.suppress(Exception):
            self.client.stop()
            self.client.close()
