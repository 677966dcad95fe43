"""The daemon: every workflow of a folder on its schedule, for months.

- ``triggers``   schedules (cron, every, at) as APScheduler triggers, DST-correct
- ``catchup``    which fires were missed while the daemon was down
- ``folder``     the workflow files: loading, hot reload, last good versions
- ``dispatch``   fires become runs: per-workflow and global limits, queue or skip
- ``runs``       each run in its own thread and event loop, cancellable
- ``recovery``   heartbeats; runs whose owner is gone are marked crashed, resumed or failed
- ``control``    ``automator trigger NAME``: requests in the database the daemon claims
- ``metrics``    Prometheus series (``automator_*``) and the lifecycle observer feeding them
- ``http``       ``/healthz`` and ``/metrics``
- ``retention``  pruning old history in batches
- ``store``      the daemon's SQL (schedule state, requests, recoveries)
- ``service``    the daemon itself: start, the loop, graceful shutdown
- ``logs``       JSON lines when not on a terminal
"""
