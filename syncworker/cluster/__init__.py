"""Cluster mode: the Celery app, the tasks workers run, and the shared store in Redis.

The scheduler (top-level `scheduler/` package) elects a leader and dispatches;
workers run `tasks` under the locks and leases of `store`. The reconcile itself
is `syncworker.reconcile.unit.reconcile`, the very function the embedded engine
runs; this package only plugs Redis and Celery in where the engine uses memory.
"""
