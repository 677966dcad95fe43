"""Pruning history older than ``--keep``, in small batches that never hold the database long.

One thing survives pruning: the ledger rows of items *delivered with a key* (their data
emptied). They are the workflow's memory of what it already sent; without them a feed
that repeats an old entry after the retention period would post it again. The SQL is
:meth:`automator.history.daemon_store.DaemonStore.prune_runs`.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta

from automator.history.protocols import SchedulerStore

log = logging.getLogger("automator.daemon")

BATCH = 200


class Retention:
    def __init__(self, store: SchedulerStore, keep: timedelta, *, batch: int = BATCH, pause: float = 0.05) -> None:
        self.store = store
        self.keep = keep
        self.batch = batch
        self.pause = pause
        # runs up to this id are pruned already (kept only for their delivered keys)
        self._cursor = 0

    def prune(self) -> int:
        """Remove what is older than ``keep``; returns how many runs were removed."""
        cutoff = datetime.now(UTC) - self.keep
        removed = 0
        started = False
        while True:
            last, gone = self.store.prune_runs(finished_before=cutoff, after_id=self._cursor, limit=self.batch)
            if last is None:
                break
            if not started:
                started = True
                log.info("retention: pruning runs that finished before %s", cutoff.isoformat(timespec="seconds"))
            removed += gone
            self._cursor = last
            time.sleep(self.pause)  # let runs write between batches
        self.store.prune_unattached(before=cutoff)
        if removed:
            log.info("retention: removed %d run(s) older than %s", removed, cutoff.isoformat(timespec="seconds"))
        return removed
