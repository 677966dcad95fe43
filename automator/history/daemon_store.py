"""The daemon's SQL: schedule state, manual trigger requests, skipped fires, recoveries, pruning.

The run history itself (runs, steps, the ledger) is written by the engine through
:class:`automator.history.store.History`; this module adds what only the daemon (and the
command line's clean-up of abandoned runs) needs, on the same engine. It implements
:class:`automator.history.protocols.SchedulerStore`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, insert, not_, select, update
from sqlalchemy.exc import IntegrityError

from automator.history.daemon_models import RunRecovery, ScheduleState, TriggerRequest
from automator.history.db import inserted_id
from automator.history.models import LedgerItem, ModelCall, Run, StepAttempt
from automator.history.states import Outcome, RequestStatus, RunStatus, StepStatus
from automator.history.store import COUNT_FIELDS, History, now

FIRE_TRIGGERS = ("schedule", "catch_up")


class DaemonStore:
    """The scheduler's state in the run history (a :class:`~automator.history.protocols.SchedulerStore`)."""

    def __init__(self, history: History) -> None:
        self.history = history
        self.engine = history.engine

    def _errors(self) -> Any:
        return self.history._errors()

    # -- schedule state ---------------------------------------------------------------

    def last_fires(self) -> dict[str, tuple[datetime | None, datetime]]:
        """Per workflow: (last fire handled, registered at)."""
        with self._errors(), self.engine.connect() as conn:
            rows = conn.execute(select(ScheduleState.workflow, ScheduleState.last_fire_at, ScheduleState.registered_at))
            return {name: (last, registered) for name, last, registered in rows}

    def last_scheduled_run(self, workflow: str) -> datetime | None:
        """The newest ``scheduled_for`` among the workflow's scheduled runs (a second opinion)."""
        with self._errors(), self.engine.connect() as conn:
            return conn.execute(
                select(func.max(Run.scheduled_for)).where(Run.workflow == workflow, Run.trigger.in_(FIRE_TRIGGERS))
            ).scalar()

    def register(self, workflow: str, schedule: str) -> datetime:
        """Make sure the workflow has a state row; returns when it was first registered."""
        stamp = now()
        with self._errors():
            try:
                return self._register(workflow, schedule, stamp)
            except IntegrityError:
                # another daemon registered it meanwhile (PostgreSQL's writers don't take turns
                # as SQLite's do): its row is there now, and stays the first registration
                return self._register(workflow, schedule, stamp)

    def _register(self, workflow: str, schedule: str, stamp: datetime) -> datetime:
        with self.engine.begin() as conn:
            found = conn.execute(
                select(ScheduleState.registered_at).where(ScheduleState.workflow == workflow)
            ).scalar_one_or_none()
            if found is not None:
                conn.execute(
                    update(ScheduleState)
                    .where(ScheduleState.workflow == workflow)
                    .values(schedule=schedule, updated_at=stamp)
                )
                return found
            conn.execute(
                insert(ScheduleState).values(
                    workflow=workflow, last_fire_at=None, registered_at=stamp, schedule=schedule, updated_at=stamp
                )
            )
            return stamp

    def save_fires(self, fires: dict[str, datetime]) -> None:
        """Remember the last fire handled per workflow (one transaction for all)."""
        if not fires:
            return
        stamp = now()
        with self._errors(), self.engine.begin() as conn:
            for workflow, fired in fires.items():
                conn.execute(
                    update(ScheduleState)
                    .where(ScheduleState.workflow == workflow)
                    .values(last_fire_at=fired, updated_at=stamp)
                )

    # -- runs the daemon records itself -------------------------------------------------

    def record_skipped(
        self,
        *,
        workflow: str,
        version: str,
        path: str,
        trigger: str,
        scheduled_for: datetime | None,
        reason: str,
        owner: str,
    ) -> int:
        """A fire that did not run (overlap, full queue): a run row with status ``skipped``."""
        stamp = now()
        with self._errors(), self.engine.begin() as conn:
            result = conn.execute(
                insert(Run).values(
                    workflow=workflow,
                    workflow_version=version,
                    workflow_path=path,
                    trigger=trigger,
                    status=RunStatus.SKIPPED,
                    scheduled_for=scheduled_for,
                    started_at=stamp,
                    finished_at=stamp,
                    owner=owner,
                    error=reason,
                    params={},
                    **dict.fromkeys(COUNT_FIELDS, 0),
                )
            )
            return inserted_id(result)

    def heartbeat(self, run_ids: Sequence[int]) -> None:
        """Stamp the runs this process executes as alive."""
        if not run_ids:
            return
        with self._errors(), self.engine.begin() as conn:
            conn.execute(update(Run).where(Run.id.in_(list(run_ids))).values(heartbeat_at=now()))

    # -- crash recovery ---------------------------------------------------------------

    def mark_crashed(self, run_id: int, owner: str | None, *, detected_by: str, reason: str) -> bool:
        """running → crashed, if nobody else got there first; records the recovery."""
        with self._errors(), self.engine.begin() as conn:
            changed = conn.execute(
                update(Run)
                .where(Run.id == run_id, Run.status == RunStatus.RUNNING, Run.owner == owner)
                .values(status=RunStatus.CRASHED, error=reason)
            ).rowcount
            if changed:
                conn.execute(
                    insert(RunRecovery).values(
                        run_id=run_id,
                        detected_at=now(),
                        detected_by=detected_by,
                        previous_owner=owner,
                        action="detected",
                        reason=reason,
                    )
                )
            return bool(changed)

    def claim_for_resume(self, run_id: int, owner: str) -> bool:
        """crashed → running under ``owner`` (atomic: two daemons never resume the same run)."""
        stamp = now()
        with self._errors(), self.engine.begin() as conn:
            changed = conn.execute(
                update(Run)
                .where(Run.id == run_id, Run.status == RunStatus.CRASHED)
                .values(status=RunStatus.RUNNING, owner=owner, heartbeat_at=stamp, error=None, finished_at=None)
            ).rowcount
            if changed:
                conn.execute(
                    insert(RunRecovery).values(
                        run_id=run_id, detected_at=stamp, detected_by=owner, action="resumed", reason=None
                    )
                )
            return bool(changed)

    def end_run(self, run_id: int, *, status: RunStatus, reason: str, by: str | None = None) -> None:
        """Close a run the engine could not close: pending items fail, counts are recounted."""
        stamp = now()
        with self._errors(), self.engine.begin() as conn:
            conn.execute(
                update(LedgerItem)
                .where(LedgerItem.run_id == run_id, LedgerItem.outcome == Outcome.PENDING)
                .values(outcome=Outcome.FAILED, reason=f"not processed: {reason}", updated_at=stamp)
            )
            # nor a step row left running by the process that is gone
            conn.execute(
                update(StepAttempt)
                .where(StepAttempt.run_id == run_id, StepAttempt.status == StepStatus.RUNNING)
                .values(status=_step_status(status), error=reason, finished_at=stamp)
            )
            counts = dict.fromkeys(COUNT_FIELDS, 0)
            for outcome, count in conn.execute(
                select(LedgerItem.outcome, func.count()).where(LedgerItem.run_id == run_id).group_by(LedgerItem.outcome)
            ):
                counts["fetched"] += count
                if outcome in counts:
                    counts[outcome] = count
            conn.execute(
                update(Run)
                .where(Run.id == run_id)
                .values(status=status, error=reason, finished_at=stamp, heartbeat_at=stamp, **counts)
            )
            if by is not None:
                conn.execute(
                    insert(RunRecovery).values(
                        run_id=run_id, detected_at=stamp, detected_by=by, action="failed", reason=reason
                    )
                )

    def recoveries(self, run_id: int) -> list[tuple[str, str | None]]:
        """What recovery did to a run, oldest first: (action, reason)."""
        with self._errors(), self.engine.connect() as conn:
            rows = conn.execute(
                select(RunRecovery.action, RunRecovery.reason)
                .where(RunRecovery.run_id == run_id)
                .order_by(RunRecovery.id)
            )
            return [(action, reason) for action, reason in rows]

    # -- manual triggers --------------------------------------------------------------

    def request_trigger(self, workflow: str, params: dict[str, Any]) -> int:
        """Queue a manual run of ``workflow`` for a daemon to pick up; the request's id."""
        with self._errors(), self.engine.begin() as conn:
            result = conn.execute(
                insert(TriggerRequest).values(
                    workflow=workflow, params=params, status=RequestStatus.PENDING, requested_at=now()
                )
            )
            return inserted_id(result)

    def pending_requests(self) -> list[TriggerRequest]:
        """Trigger requests no daemon has claimed yet, oldest first."""
        with self._errors(), self.history.session() as session:
            return list(
                session.scalars(
                    select(TriggerRequest)
                    .where(TriggerRequest.status == RequestStatus.PENDING)
                    .order_by(TriggerRequest.id)
                )
            )

    def claim_request(self, request_id: int, owner: str) -> bool:
        """pending → claimed by ``owner``; False when another daemon (or a cancel) got there first."""
        with self._errors(), self.engine.begin() as conn:
            return bool(
                conn.execute(
                    update(TriggerRequest)
                    .where(TriggerRequest.id == request_id, TriggerRequest.status == RequestStatus.PENDING)
                    .values(status=RequestStatus.CLAIMED, claimed_at=now(), claimed_by=owner)
                ).rowcount
            )

    def settle_request(
        self, request_id: int, *, status: RequestStatus, run_id: int | None = None, error: str | None = None
    ) -> None:
        """Record how a claimed request ended (started as a run, or rejected with an error)."""
        with self._errors(), self.engine.begin() as conn:
            conn.execute(
                update(TriggerRequest)
                .where(TriggerRequest.id == request_id)
                .values(status=status, run_id=run_id, error=error)
            )

    def get_request(self, request_id: int) -> TriggerRequest | None:
        """One trigger request, or None."""
        with self._errors(), self.history.session() as session:
            return session.get(TriggerRequest, request_id)

    def cancel_request(self, request_id: int) -> bool:
        """pending → cancelled; False when a daemon claimed it meanwhile."""
        with self._errors(), self.engine.begin() as conn:
            return bool(
                conn.execute(
                    update(TriggerRequest)
                    .where(TriggerRequest.id == request_id, TriggerRequest.status == RequestStatus.PENDING)
                    .values(status=RequestStatus.CANCELLED)
                ).rowcount
            )

    # -- retention ----------------------------------------------------------------------

    def prune_runs(self, *, finished_before: datetime, after_id: int, limit: int) -> tuple[int | None, int]:
        """Remove up to ``limit`` runs (ids above ``after_id``) that finished before the cutoff.

        One transaction, so it never holds the database long. The ledger rows of items
        delivered with a key survive, their data emptied (with their run row): they are the
        workflow's memory of what it already sent. Returns (the last run id looked at, or
        None when there is none left; how many run rows were deleted).
        """
        with self._errors(), self.engine.begin() as conn:
            ids = list(
                conn.scalars(
                    select(Run.id)
                    .where(Run.id > after_id, Run.finished_at.is_not(None), Run.finished_at < finished_before)
                    .order_by(Run.id)
                    .limit(limit)
                )
            )
            if not ids:
                return None, 0
            keyed = (LedgerItem.outcome == Outcome.DELIVERED) & LedgerItem.key.is_not(None)
            keepers = set(conn.scalars(select(LedgerItem.run_id).where(LedgerItem.run_id.in_(ids), keyed).distinct()))
            conn.execute(delete(StepAttempt).where(StepAttempt.run_id.in_(ids)))
            conn.execute(delete(ModelCall).where(ModelCall.run_id.in_(ids)))
            conn.execute(delete(RunRecovery).where(RunRecovery.run_id.in_(ids)))
            conn.execute(delete(LedgerItem).where(LedgerItem.run_id.in_(ids), not_(keyed)))
            if keepers:
                conn.execute(update(LedgerItem).where(LedgerItem.run_id.in_(keepers)).values(data={}, result=None))
            gone = [run_id for run_id in ids if run_id not in keepers]
            if gone:
                conn.execute(delete(Run).where(Run.id.in_(gone)))
            return ids[-1], len(gone)

    def prune_unattached(self, *, before: datetime) -> None:
        """Remove model calls made outside any run, and trigger requests, older than the cutoff."""
        with self._errors(), self.engine.begin() as conn:
            conn.execute(delete(ModelCall).where(ModelCall.run_id.is_(None), ModelCall.created_at < before))
            conn.execute(delete(TriggerRequest).where(TriggerRequest.requested_at < before))

    # -- health -----------------------------------------------------------------------

    def ping(self) -> None:
        """Raise if the database cannot be reached (for /healthz)."""
        with self._errors(), self.engine.connect() as conn:
            conn.execute(select(1))


def _step_status(run_status: RunStatus) -> StepStatus:
    """What a step row left running becomes when its run is ended from outside."""
    if run_status in (RunStatus.INTERRUPTED, RunStatus.CRASHED):
        return StepStatus(run_status)
    return StepStatus.FAILED
