"""Writing and reading the run history: runs, step attempts and the item ledger.

:class:`History` implements :class:`~automator.history.protocols.RunStore` and
:class:`~automator.history.protocols.LedgerStore`; its :attr:`History.model_calls` is the
:class:`~automator.history.protocols.ModelCallStore`. Only ``automator.history`` talks SQL.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Connection, func, insert, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, selectinload
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt

from automator.errors import HistoryError
from automator.history import db
from automator.history import ledger as works
from automator.history.group_commit import GroupCommit
from automator.history.models import LedgerItem, ModelCall, Run, StepAttempt
from automator.history.rows import ItemRow, OutcomeRow, now
from automator.history.states import FINAL_OUTCOMES, CallStatus, Outcome, RunStatus, StepStatus

if TYPE_CHECKING:
    from automator.history.model_calls import ModelCallHistory

OUTCOMES: tuple[str, ...] = tuple(outcome.value for outcome in FINAL_OUTCOMES)
# every status a run row can have: `running` until the engine (or recovery) ends it
RUN_STATUSES: tuple[str, ...] = tuple(status.value for status in RunStatus)
COUNT_FIELDS = ("fetched", *OUTCOMES)
LOCK_RETRIES = 5
T = TypeVar("T")
log = logging.getLogger("automator.history")


@dataclass(frozen=True)
class UnfinishedRun:
    """A run not ended (see :meth:`History.unfinished_runs`) and who owns it."""

    id: int
    workflow: str
    version: str
    path: str | None
    status: str
    owner: str | None  # host:pid
    started_at: datetime
    heartbeat_at: datetime | None
    error: str | None  # a crashed run's: why it was found crashed


def _usage_sums() -> tuple[Any, ...]:
    """Calls, tokens in / cached / out and cost of a group of model calls."""
    return (
        func.count(),
        func.coalesce(func.sum(ModelCall.input_tokens), 0),
        func.coalesce(func.sum(ModelCall.cached_input_tokens), 0),
        func.coalesce(func.sum(ModelCall.output_tokens), 0),
        func.coalesce(func.sum(ModelCall.cost_usd), 0),
    )


class History:
    """The run history database (SQLite by default, any SQLAlchemy URL)."""

    def __init__(self, url: str | None = None, *, auto_upgrade: bool | None = None) -> None:
        self.url = db.database_url(url)
        self.engine = db.open_engine(self.url)
        # another program's lock (a sqlite3 shell, a backup) is waited out: each try waits
        # the busy timeout, then a pause that grows up to it, LOCK_RETRIES times
        self.lock_wait = db.busy_timeout(self.url) if db.is_embedded(self.url) else db.DEFAULT_BUSY_TIMEOUT
        if auto_upgrade is None:
            auto_upgrade = db.is_embedded(self.url)
        db.ensure_schema(self.engine, auto_upgrade=auto_upgrade)
        self._group = GroupCommit(self)

    def close(self) -> None:
        self._group.close()
        self.engine.dispose()

    async def commit(self, work: Callable[[Connection], T]) -> T:
        """``work`` in a transaction on the writer thread, shared with the writes queued meanwhile.

        The one way the engine writes while a run goes on: the event loop does not wait on
        the database, and concurrent writes share one commit (see :mod:`.group_commit`).
        A locked database is retried as :meth:`write` retries it.
        """
        # shielded: a write once queued is done, even if the run that waits for it is
        # cancelled meanwhile (its end, say, written while a signal stops it)
        return await asyncio.shield(self._group.commit(work))

    def submit(self, work: Callable[[Connection], T]) -> Future[T]:
        """Queue ``work`` for the writer thread without waiting (a write the caller checks later)."""
        return self._group.submit(work)

    @property
    def model_calls(self) -> ModelCallHistory:
        """The model calls, batch jobs, response cache and costs in this history."""
        from automator.history.model_calls import ModelCallHistory  # it builds on this module

        return ModelCallHistory(self)

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def _errors(self) -> Any:
        return db.database_errors(self.url)

    def write(self, work: Callable[[Connection], T]) -> T:
        """Run ``work`` in one transaction; a locked database is retried, bounded, then a HistoryError.

        The whole transaction is tried again (never half of it), so ``work`` must only
        talk to the database.
        """
        return self._retrying(lambda: self._in_transaction(work))

    def read(self, work: Callable[[Session], T]) -> T:
        """Run ``work`` with a session (objects stay usable after it); a locked database is retried."""

        def attempt() -> T:
            with self.session() as session:
                return work(session)

        return self._retrying(attempt)

    def connect(self, work: Callable[[Connection], T]) -> T:
        """Run ``work`` (reads) on a connection; a locked database is retried."""

        def attempt() -> T:
            with self.engine.connect() as conn:
                return work(conn)

        return self._retrying(attempt)

    def _in_transaction(self, work: Callable[[Connection], T]) -> T:
        with self.engine.begin() as conn:
            return work(conn)

    def _retrying(self, attempt: Callable[[], T]) -> T:
        def pause(state: RetryCallState) -> float:
            return min(self.lock_wait * 2 ** (state.attempt_number - 3), self.lock_wait)

        def say(state: RetryCallState) -> None:
            seconds = state.next_action.sleep if state.next_action else 0.0
            log.warning(
                "history database locked, retrying (%d/%d) in %.2gs", state.attempt_number, LOCK_RETRIES, seconds
            )

        retrying = Retrying(
            stop=stop_after_attempt(LOCK_RETRIES + 1),
            wait=pause,
            retry=retry_if_exception(lambda exc: isinstance(exc, DBAPIError) and db.is_locked(exc)),
            before_sleep=say,
            reraise=True,
        )
        with self._errors():
            try:
                return retrying(attempt)
            except DBAPIError as exc:
                if not db.is_locked(exc):
                    raise
                waited = (LOCK_RETRIES + 1) * self.lock_wait
                raise HistoryError(
                    f"the history database {db.safe_url(self.url)} stayed locked by another program "
                    f"for over {waited:g}s ({LOCK_RETRIES} retries): {str(exc.orig).strip() or 'locked'}",
                    hint="close the program that holds it (a sqlite3 shell, a backup); "
                    "a run it left unfinished is resumed by the next `automator run` of its workflow "
                    "or by `automator resume ID`",
                ) from None

    # -- runs -------------------------------------------------------------------------

    def start_run(
        self,
        *,
        workflow: str,
        version: str,
        path: str | None,
        trigger: str,
        params: dict[str, Any] | None = None,
        scheduled_for: datetime | None = None,
        owner: str | None = None,
    ) -> Run:
        started = now()
        run = Run(
            workflow=workflow,
            workflow_version=version,
            workflow_path=path,
            trigger=trigger,
            status=RunStatus.RUNNING,
            scheduled_for=scheduled_for,
            started_at=started,
            heartbeat_at=started,
            owner=owner,
            params=params or {},
            fetched=0,
            delivered=0,
            skipped=0,
            quarantined=0,
            failed=0,
        )

        def work(session: Session) -> None:
            session.add(run)
            session.commit()

        self.read(work)  # a session's write: retried like the rest when the database is locked
        return run

    def heartbeat(self, run_id: int) -> None:
        def work(conn: Connection) -> Any:
            conn.execute(update(Run).where(Run.id == run_id).values(heartbeat_at=now()))

        self.write(work)

    def finish_run(
        self, run_id: int, *, status: str, error: str | None, error_step: str | None, counts: dict[str, int]
    ) -> None:
        self.write(self.finish_run_work(run_id, status=status, error=error, error_step=error_step, counts=counts))

    @staticmethod
    def finish_run_work(
        run_id: int, *, status: str, error: str | None, error_step: str | None, counts: dict[str, int]
    ) -> Callable[[Connection], None]:
        values = {k: counts.get(k, 0) for k in COUNT_FIELDS}

        def work(conn: Connection) -> None:
            conn.execute(
                update(Run)
                .where(Run.id == run_id)
                .values(status=status, error=error, error_step=error_step, finished_at=now(), **values)
            )

        return work

    def update_counts(self, run_id: int, counts: dict[str, int]) -> None:
        self.write(self.counts_work(run_id, counts))

    @staticmethod
    def counts_work(run_id: int, counts: dict[str, int]) -> Callable[[Connection], None]:
        values = {k: counts.get(k, 0) for k in COUNT_FIELDS}

        def work(conn: Connection) -> None:
            conn.execute(update(Run).where(Run.id == run_id).values(heartbeat_at=now(), **values))

        return work

    # -- written ahead while a run goes on: through the writer thread (see commit) ----

    async def step_started(
        self, run_id: int, *, step_id: str, step_type: str, phase: str, attempt: int, items_in: int
    ) -> int:
        """As :meth:`start_step`, in a shared commit; the row's id once durable."""
        work = self.start_step_work(
            run_id, step_id=step_id, step_type=step_type, phase=phase, attempt=attempt, items_in=items_in
        )
        return await self.commit(work)

    async def step_finished(self, attempt_id: int, **fields: Any) -> None:
        """As :meth:`finish_step` (``items_in`` too), in a shared commit."""
        await self.commit(self.finish_step_work(attempt_id, **fields))

    async def run_finished(
        self, run_id: int, *, status: str, error: str | None, error_step: str | None, counts: dict[str, int]
    ) -> None:
        """As :meth:`finish_run`, in a shared commit after the writes queued before it."""
        await self.commit(
            self.finish_run_work(run_id, status=status, error=error, error_step=error_step, counts=counts)
        )

    def step_finished_soon(self, attempt_id: int, **fields: Any) -> None:
        """As :meth:`step_finished`, queued but not waited for (from code that is not a coroutine)."""
        self.submit(self.finish_step_work(attempt_id, **fields))

    async def save_counts(self, run_id: int, counts: dict[str, int]) -> None:
        """As :meth:`update_counts`, in a shared commit."""
        await self.commit(self.counts_work(run_id, counts))

    def unfinished_runs(self, workflow: str | None = None) -> list[UnfinishedRun]:
        """Runs not ended: ``running``, or ``crashed`` and neither resumed nor failed yet.

        Whether their owner is still at work is for crash recovery to tell
        (:mod:`automator.engine.recovery`). Optionally only the runs of one workflow.
        """
        undecided = (Run.status == RunStatus.CRASHED) & Run.finished_at.is_(None)
        query = select(
            Run.id,
            Run.workflow,
            Run.workflow_version,
            Run.workflow_path,
            Run.status,
            Run.owner,
            Run.started_at,
            Run.heartbeat_at,
            Run.error,
        ).where((Run.status == RunStatus.RUNNING) | undecided)
        if workflow is not None:
            query = query.where(Run.workflow == workflow)
        with self._errors(), self.engine.connect() as conn:
            return [UnfinishedRun(*row) for row in conn.execute(query.order_by(Run.id))]

    def take_crashed_run(self, run_id: int, *, previous_owner: str | None, owner: str) -> bool:
        """A crashed, undecided run becomes ``owner``'s to resume or fail; False if another got it.

        Atomic, and stamped as alive: two processes never both decide what becomes of a
        run, and one that took it and died leaves it for the next.
        """

        def work(conn: Connection) -> bool:
            query = update(Run).where(
                Run.id == run_id,
                Run.status == RunStatus.CRASHED,
                Run.finished_at.is_(None),
                Run.owner.is_(None) if previous_owner is None else Run.owner == previous_owner,
            )
            return bool(conn.execute(query.values(owner=owner, heartbeat_at=now())).rowcount)

        return self.write(work)

    # -- steps ------------------------------------------------------------------------

    def start_step(self, run_id: int, *, step_id: str, step_type: str, phase: str, attempt: int, items_in: int) -> int:
        return self.write(
            self.start_step_work(
                run_id, step_id=step_id, step_type=step_type, phase=phase, attempt=attempt, items_in=items_in
            )
        )

    @staticmethod
    def start_step_work(
        run_id: int, *, step_id: str, step_type: str, phase: str, attempt: int, items_in: int
    ) -> Callable[[Connection], int]:
        def work(conn: Connection) -> int:
            result = conn.execute(
                insert(StepAttempt).values(
                    run_id=run_id,
                    step_id=step_id,
                    step_type=step_type,
                    phase=phase,
                    attempt=attempt,
                    status=StepStatus.RUNNING,
                    started_at=now(),
                    items_in=items_in,
                )
            )
            return db.inserted_id(result)

        return work

    def finish_step(
        self,
        attempt_id: int,
        *,
        status: str,
        error: str | None = None,
        items_out: int = 0,
        retries: int = 0,
        summary: str | None = None,
    ) -> None:
        self.write(
            self.finish_step_work(
                attempt_id, status=status, error=error, items_out=items_out, retries=retries, summary=summary
            )
        )

    @staticmethod
    def finish_step_work(
        attempt_id: int,
        *,
        status: str,
        error: str | None = None,
        items_in: int | None = None,
        items_out: int = 0,
        retries: int = 0,
        summary: str | None = None,
    ) -> Callable[[Connection], None]:
        values: dict[str, Any] = {
            "status": status,
            "error": error,
            "items_out": items_out,
            "retries": retries,
            "summary": summary,
            "finished_at": now(),
        }
        if items_in is not None:
            values["items_in"] = items_in  # a streamed step counts its items as they come

        def work(conn: Connection) -> None:
            conn.execute(update(StepAttempt).where(StepAttempt.id == attempt_id).values(**values))

        return work

    def close_open_steps(self, run_id: int, *, status: str, error: str) -> int:
        """End the run's step rows still ``running`` (their process is gone); how many there were."""

        def work(conn: Connection) -> Any:
            return int(
                conn.execute(
                    update(StepAttempt)
                    .where(StepAttempt.run_id == run_id, StepAttempt.status == StepStatus.RUNNING)
                    .values(status=status, error=error, finished_at=now())
                ).rowcount
            )

        return self.write(work)

    # -- the item ledger --------------------------------------------------------------

    # The ledger is written once per item, twice per run: these go straight to the driver's
    # executemany (SQLAlchemy's per-row parameter handling cost more than the database).

    def add_items(self, run_id: int, workflow: str, rows: Sequence[ItemRow]) -> None:
        if rows:
            self.write(works.add_items(run_id, workflow, rows))

    def set_outcomes(self, run_id: int, rows: Iterable[OutcomeRow]) -> None:
        rows = list(rows)
        if rows:
            self.write(works.set_outcomes(run_id, rows))

    def set_delivered_by(self, run_id: int, rows: Iterable[tuple[int, list[str]]]) -> None:
        """Record which deliver steps items passed (items still pending, in a longer workflow)."""
        rows = list(rows)
        if rows:
            self.write(works.set_passed(run_id, rows))

    @property
    def ledger(self) -> works.Ledger:
        """The write-ahead ledger of chunks and items the engine writes through while a run goes on."""
        return works.Ledger(self)

    def delivered_keys(self, workflow: str, keys: Iterable[str], *, other_than: int | None = None) -> dict[str, int]:
        """Which of ``keys`` a run of ``workflow`` delivered, and in which run (the first).

        ``other_than``: not counting that run (a resumed run asks what any other run
        delivered since it started).
        """
        wanted = list(dict.fromkeys(keys))
        found: dict[str, int] = {}
        with self._errors(), self.engine.connect() as conn:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                query = (
                    select(LedgerItem.key, func.min(LedgerItem.run_id))
                    .where(
                        LedgerItem.workflow == workflow,
                        LedgerItem.outcome == Outcome.DELIVERED,
                        LedgerItem.key.in_(chunk),
                    )
                    .group_by(LedgerItem.key)
                )
                if other_than is not None:
                    query = query.where(LedgerItem.run_id != other_than)
                rows = conn.execute(query)
                found.update({key: run_id for key, run_id in rows if key is not None})
        return found

    # -- model calls ------------------------------------------------------------------

    def record_model_call(self, **fields: Any) -> None:
        fields.setdefault("created_at", now())
        fields.setdefault("cost_usd", Decimal(0))

        def work(conn: Connection) -> Any:
            conn.execute(insert(ModelCall).values(**fields))

        self.write(work)

    # -- reading ----------------------------------------------------------------------

    def list_runs(self, *, workflow: str | None = None, status: str | None = None, limit: int = 20) -> list[Run]:
        query = select(Run).order_by(Run.id.desc()).limit(limit)
        if workflow:
            query = query.where(Run.workflow == workflow)
        if status:
            query = query.where(Run.status == status)
        return self.read(lambda session: list(session.scalars(query)))

    def get_run(self, run_id: int) -> Run | None:
        query = select(Run).where(Run.id == run_id).options(selectinload(Run.steps))
        return self.read(lambda session: session.scalars(query).one_or_none())

    def items(self, run_id: int, outcomes: Sequence[str] | None = None) -> list[LedgerItem]:
        query = select(LedgerItem).where(LedgerItem.run_id == run_id).order_by(LedgerItem.seq)
        if outcomes:
            query = query.where(LedgerItem.outcome.in_(outcomes))
        return self.read(lambda session: list(session.scalars(query)))

    def model_usage_by_attempt(self, run_id: int) -> dict[int, dict[str, Any]]:
        """Per step row: the model calls made while it ran, each call counted once.

        A call belongs to the newest row of its step that started before it; a resumed
        run's step has two rows, and each shows only its own calls.
        """
        attempt = (
            select(func.max(StepAttempt.id))
            .where(
                StepAttempt.run_id == ModelCall.run_id,
                StepAttempt.step_id == ModelCall.step_id,
                StepAttempt.started_at <= ModelCall.created_at,
            )
            .correlate(ModelCall)
            .scalar_subquery()
        )
        first = select(StepAttempt.step_id, func.min(StepAttempt.id)).where(StepAttempt.run_id == run_id)
        query = (
            select(
                attempt,
                ModelCall.step_id,
                *_usage_sums(),
            )
            .where(ModelCall.run_id == run_id, ModelCall.status != CallStatus.CACHED)
            .group_by(attempt, ModelCall.step_id)
        )
        usage: dict[int, dict[str, Any]] = {}
        with self._errors(), self.engine.connect() as conn:
            first_row: dict[str, int] = {step: row for step, row in conn.execute(first.group_by(StepAttempt.step_id))}
            for attempt_id, step, calls, inp, cached, out, cost in conn.execute(query):
                # a call stamped before its step's first row (clocks of two hosts): the first row
                row = attempt_id if attempt_id is not None else first_row.get(step)
                if row is None:
                    continue  # a step of the run with no row at all: nothing to show it on
                total = usage.setdefault(
                    row,
                    {"calls": 0, "input_tokens": 0, "cached_input_tokens": 0, "output_tokens": 0, "cost": Decimal(0)},
                )
                total["calls"] += calls
                total["input_tokens"] += int(inp)
                total["cached_input_tokens"] += int(cached)
                total["output_tokens"] += int(out)
                total["cost"] += Decimal(str(cost))
        for total in usage.values():
            total["cost_usd"] = float(total.pop("cost").quantize(Decimal("0.000000001")))
        return usage

    def model_usage(self, run_id: int) -> dict[str, dict[str, Any]]:
        """Per step: calls, tokens and cost of the run's model calls."""
        query = (
            select(
                ModelCall.step_id,
                *_usage_sums(),
            )
            .where(ModelCall.run_id == run_id, ModelCall.status != CallStatus.CACHED)
            .group_by(ModelCall.step_id)
        )
        with self._errors(), self.engine.connect() as conn:
            return {
                step: {
                    "calls": calls,
                    "input_tokens": int(inp),
                    "cached_input_tokens": int(cached),
                    "output_tokens": int(out),
                    "cost_usd": float(Decimal(str(cost)).quantize(Decimal("0.000000001"))),
                }
                for step, calls, inp, cached, out, cost in conn.execute(query)
            }
