"""`syncworker worker` keeps its Celery worker running: a child process, started again when it exits.

Celery/kombu 5.7 with the Redis broker exits the worker process when the broker
connection drops while it holds unacknowledged messages (every running job here
is one: jobs are acknowledged late, and duties run for minutes). The consumer
first `collect()`s the broken connection, which drops the transport, then closes
it, and restoring the unacked messages on that closed transport raises
`AttributeError: 'NoneType' object has no attribute 'hostname'` in
`kombu.transport.redis.Channel._connparams`: Celery logs `Unrecoverable error`
and stops. No broker setting avoids it (`broker_connection_retry`,
`broker_connection_max_retries`, the transport's retry and health-check options
only act on the reconnect that never comes). An idle worker reconnects by
itself.

So `syncworker worker` runs the Celery worker as a child process (the same
command with `--no-supervise`) and starts it again when it exits without being
asked to: after 1 s, doubling up to 30 s while it keeps failing quickly, back to
1 s once it ran a minute. A fresh worker waits for the broker as long as it
takes (`broker_connection_retry_on_startup`, no retry limit), so a Redis outage
costs one restart, not a loop. The new child is a new worker for the cluster (its
identity is `host:pid` of the child): the leader sends again what the old one
held, and its duties move when their leases lapse, as for any dead worker.

SIGTERM or SIGINT asks the child for Celery's warm shutdown (SIGTERM: running
jobs finish, duties hand their leases back), and the supervisor exits with the
child's code; a second one asks for a cold shutdown (SIGQUIT). A child that
exits with a usage or configuration error is not started again. If the
supervisor itself is killed, the child gets SIGTERM (Linux parent-death signal).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from types import FrameType

log = logging.getLogger("syncworker.supervise")

#: set in the child's environment: the supervisor's pid (also tells the child it is supervised)
SUPERVISOR_ENV = "SYNCWORKER_WORKER_SUPERVISOR"
#: restart delays: first, cap; a child that ran this long starts the backoff over
FIRST_DELAY = 1.0
MAX_DELAY = 30.0
HEALTHY_RUN = 60.0
#: exit codes that mean "this command cannot work": usage (click 2, EX_USAGE 64), EX_CONFIG 78
FATAL_CODES = frozenset({2, 64, 78})

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child before exec
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class Supervisor:
    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.env = dict(os.environ if env is None else env)
        self.env[SUPERVISOR_ENV] = str(os.getpid())
        self.child: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()
        self.stops = 0
        self.restarts = 0

    # ---- signals -----------------------------------------------------------------------
    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stops += 1
        self.stopping.set()
        child = self.child
        if child is None or child.poll() is not None:
            return
        sig = signal.SIGTERM if self.stops == 1 else signal.SIGQUIT
        log.info("stopping the celery worker", extra={"signal": signal.Signals(signum).name,
                                                       "sent": sig.name, "pid": child.pid})
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(sig)

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)

    # ---- the loop ----------------------------------------------------------------------
    def _spawn(self) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.DEVNULL,
                                 preexec_fn=_die_with_parent)  # the supervisor runs no threads
        self.child = child
        if self.stopping.is_set():  # a stop asked for while the child was being started
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)
        return child

    def run(self) -> int:
        """Run the child until a stop is asked for; returns the exit code for the supervisor."""
        delay = FIRST_DELAY
        while not self.stopping.is_set():
            started = time.monotonic()
            child = self._spawn()
            log.info("celery worker started", extra={"pid": child.pid, "restarts": self.restarts})
            code = child.wait()
            ran = time.monotonic() - started
            if self.stopping.is_set():
                log.info("celery worker stopped", extra={"pid": child.pid, "code": code})
                return code if code >= 0 else 128 - code
            if code in FATAL_CODES:
                log.error("celery worker cannot start; not restarting it", extra={"pid": child.pid, "code": code})
                return code
            if ran >= HEALTHY_RUN:
                delay = FIRST_DELAY
            how = f"code {code}"
            if code < 0:
                with contextlib.suppress(ValueError):
                    how = f"signal {signal.Signals(-code).name}"
            log.warning("celery worker exited unexpectedly; starting it again",
                        extra={"pid": child.pid, "exit": how, "ran_s": round(ran, 1), "retry_in": delay})
            if self.stopping.wait(delay):
                return 0
            delay = min(MAX_DELAY, delay * 2)
            self.restarts += 1
        return 0


def supervise(argv: Sequence[str]) -> int:
    sup = Supervisor(argv)
    sup.install()
    return sup.run()


def supervisor_pid() -> int | None:
    """The pid of the supervising `syncworker worker`, in its Celery child; None when unsupervised."""
    raw = os.environ.get(SUPERVISOR_ENV, "")
    return int(raw) if raw.isdigit() else None
