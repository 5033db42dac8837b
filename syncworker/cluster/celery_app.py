"""The Celery app of cluster mode: broker and result backend are the cluster's Redis.

Delivery is at least once and a lost worker's job comes back: late acks, a job
whose worker died is rejected back to the queue, one message prefetched per
worker slot. Every reconcile is idempotent and runs under the unit's lock, so a
job delivered twice costs one extra read. The broker's visibility timeout (after
which an unacknowledged message goes to another worker) is sized to the longest
job, a duty that hands its lease back after `duty_max` seconds; a dead worker's
reconcile does not wait for it, the leader dispatches it again sooner.

The broker connection is retried for ever, at start and after a loss. An idle
worker reconnects by itself when Redis comes back; one that loses the connection
while jobs run exits (a Celery/kombu 5.7 bug, see `supervise`), and `syncworker
worker` starts it again.

Task names are readable (`syncworker.reconcile`, `syncworker.watch`,
`syncworker.heartbeat`) and their kwargs name the task and the unit, so Flower
lists jobs such as `syncworker.reconcile(task="nacos-to-polaris", unit="public/foo")`.
"""

from __future__ import annotations

from celery import Celery

from syncworker.config import settings as settings_mod

RECONCILE = "syncworker.reconcile"
WATCH = "syncworker.watch"
HEARTBEAT = "syncworker.heartbeat"
DUTY_TASKS = {"watch": WATCH, "heartbeat": HEARTBEAT}


def visibility_timeout(st: settings_mod.Settings) -> int:
    """Longer than any job runs: a duty's whole term plus a lease of slack and a minute."""
    return int(st.duty_max + 2 * st.lease_ttl + 60)


def make_app(st: settings_mod.Settings | None = None) -> Celery:
    st = st or settings_mod.Settings()
    url = st.redis_url.get_secret_value()
    app = Celery("syncworker", broker=url, backend=url, include=["syncworker.cluster.tasks"])
    transport = {"visibility_timeout": visibility_timeout(st)}
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        # reconnect after a lost broker connection, and wait for the broker at start, for ever; what
        # Celery 5.7 cannot survive (a connection lost with jobs running) `syncworker worker` restarts
        broker_connection_retry=True,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        task_default_queue=st.redis_prefix,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=3600,
        task_track_started=True,
        task_send_sent_event=True,
        worker_send_task_events=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        timezone="UTC",
    )
    return app


app = make_app()
