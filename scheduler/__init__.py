"""The cluster scheduler: elects one leader through ZooKeeper; the leader dispatches work to Celery workers.

    election.py   ZooKeeper leadership (kazoo lock); losing the session ends leadership at once
    leader.py     what the leader does: config, units, pull cycles, duties, lost jobs, cleanup
    status.py     /status, /metrics (with the leader's identity), /healthz from the shared store
    main.py       one scheduler process: stand by, lead when elected, stand by again

Layers: the scheduler uses `syncworker.reconcile` (units, cleanup) and
`syncworker.cluster` (store, dispatch by task name); it never imports the Celery
tasks themselves, and workers never import the scheduler.
"""
