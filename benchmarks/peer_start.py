"""Warm start of every peer together: how long until all of them answer.

    python -m benchmarks.peer_start [NAME ...]

Peers must be installed already (`syncworker sandbox install`). They are started
one after another in this process (JVMs would fight over 2 cores if started at
once), each timed to readiness, then all stopped. Prints a JSON summary.
"""

from __future__ import annotations

import json
import sys
import time

from syncworker.sandbox import base, catalog, harness


def main(names: list[str]) -> dict[str, object]:
    pool = harness.PeerPool()
    times: dict[str, object] = {}
    t0 = time.monotonic()
    try:
        for name in names:
            t = time.monotonic()
            try:
                pool.get(name)
                times[name] = round(time.monotonic() - t, 2)
            except base.PeerError as exc:
                times[name] = f"failed: {str(exc).splitlines()[0][:160]}"
        total = round(time.monotonic() - t0, 1)
    finally:
        t = time.monotonic()
        pool.stop_all()
        stop = round(time.monotonic() - t, 1)
    left = harness.leftover_processes()
    return {"benchmark": "peer_start", "date": time.strftime("%Y-%m-%d"), "warm_start_s": times,
            "all_ready_s": total, "stop_all_s": stop, "left_running": len(left)}


if __name__ == "__main__":
    chosen = sys.argv[1:] or sorted(catalog.PEERS)
    print(json.dumps(main(chosen), indent=2))
