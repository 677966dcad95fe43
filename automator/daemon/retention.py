"""Pruning history older than ``--keep``, in small batches that never hold the database long.

One thing survives pruning: the ledger rows of items *delivered with a key* (their data
emptied). They are the workflow's memory of what it already sent; without them a feed
that repeats an old entry after the retention period would post it again.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from sqlalchemy import and_, delete, not_, select, update

from automator.history.daemon_models import RunRecovery, TriggerRequest
from automator.history.models import LedgerItem, ModelCall, Run, StepAttempt
from automator.history.store import History, now

log = logging.getLogger("automator.daemon")

BATCH = 200


class Retention:
    def __init__(self, history: History, keep: timedelta, *, batch: int = BATCH, pause: float = 0.05) -> None:
        self.history = history
        self.keep = keep
        self.batch = batch
        self.pause = pause
        # runs up to this id are pruned already (kept only for their delivered keys)
        self._cursor = 0

    def prune(self) -> int:
        """Remove what is older than ``keep``; returns how many runs were removed."""
        cutoff = now() - self.keep
        removed = 0
        started = False
        engine = self.history.engine
        while True:
            with engine.begin() as conn:
                ids = list(
                    conn.scalars(
                        select(Run.id)
                        .where(Run.id > self._cursor, Run.finished_at.is_not(None), Run.finished_at < cutoff)
                        .order_by(Run.id)
                        .limit(self.batch)
                    )
                )
                if not ids:
                    break
                if not started:
                    started = True
                    log.info("retention: pruning runs that finished before %s", cutoff.isoformat(timespec="seconds"))
                keyed = LedgerItem.outcome.in_(["delivered"]) & LedgerItem.key.is_not(None)
                keepers = set(
                    conn.scalars(select(LedgerItem.run_id).where(LedgerItem.run_id.in_(ids), keyed).distinct())
                )
                conn.execute(delete(StepAttempt).where(StepAttempt.run_id.in_(ids)))
                conn.execute(delete(ModelCall).where(ModelCall.run_id.in_(ids)))
                conn.execute(delete(RunRecovery).where(RunRecovery.run_id.in_(ids)))
                conn.execute(delete(LedgerItem).where(LedgerItem.run_id.in_(ids), not_(keyed)))
                if keepers:
                    conn.execute(update(LedgerItem).where(LedgerItem.run_id.in_(keepers)).values(data={}, result=None))
                gone = [run_id for run_id in ids if run_id not in keepers]
                if gone:
                    conn.execute(delete(Run).where(Run.id.in_(gone)))
                removed += len(gone)
                self._cursor = ids[-1]
            time.sleep(self.pause)  # let runs write between batches
        with engine.begin() as conn:
            conn.execute(delete(ModelCall).where(and_(ModelCall.run_id.is_(None), ModelCall.created_at < cutoff)))
            conn.execute(delete(TriggerRequest).where(TriggerRequest.requested_at < cutoff))
        if removed:
            log.info("retention: removed %d run(s) older than %s", removed, cutoff.isoformat(timespec="seconds"))
        return removed
