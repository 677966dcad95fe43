"""Writing and reading the run history: the one place that talks SQL."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, bindparam, func, insert, select, update
from sqlalchemy.orm import Session, selectinload

from automator.history import db
from automator.history.models import LedgerItem, ModelCall, Run, StepAttempt

OUTCOMES = ("delivered", "skipped", "quarantined", "failed")
_COLUMNS = LedgerItem.__table__.c
COUNT_FIELDS = ("fetched", *OUTCOMES)


def now() -> datetime:
    return datetime.now(UTC)


_JSON = json.JSONEncoder(ensure_ascii=False, default=str).encode  # built once: it is per item


def _db_json(value: Any) -> str:
    return _JSON(value)


def _sqlite_datetime(value: datetime) -> str:
    # what UTCDateTime stores on SQLite: naive UTC text
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def _executemany(
    conn: Connection,
    statement: Any,
    rows: list[dict[str, Any]],
    *,
    json_keys: tuple[str, ...] = (),
    time_keys: tuple[str, ...] = (),
) -> None:
    """Many rows at once. On SQLite, straight to the driver with the values converted here
    (SQLAlchemy's per-row parameter handling cost more than the database); elsewhere, Core."""
    if conn.dialect.name != "sqlite":
        conn.execute(statement, rows)
        return
    for row in rows:
        for key in json_keys:
            if row[key] is not None:
                row[key] = _db_json(row[key])
        for key in time_keys:
            row[key] = _sqlite_datetime(row[key])
    compiled = statement.compile(dialect=conn.dialect, column_keys=list(rows[0]))
    names = compiled.positiontup or []
    conn.exec_driver_sql(compiled.string, [tuple(row[n] for n in names) for row in rows])


@dataclass(frozen=True)
class ItemRow:
    seq: int
    key: str | None
    fetched_by: str
    data: Any


@dataclass(frozen=True)
class OutcomeRow:
    seq: int
    outcome: str
    step_id: str | None
    reason: str | None
    result: Any = None


class History:
    """The run history database (SQLite by default, any SQLAlchemy URL)."""

    def __init__(self, url: str | None = None, *, auto_upgrade: bool | None = None) -> None:
        self.url = db.database_url(url)
        self.engine = db.open_engine(self.url)
        if auto_upgrade is None:
            auto_upgrade = db.is_embedded(self.url)
        db.ensure_schema(self.engine, auto_upgrade=auto_upgrade)

    def close(self) -> None:
        self.engine.dispose()

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def _errors(self) -> Any:
        return db.database_errors(self.url)

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
            status="running",
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
        with self._errors(), self.session() as session:
            session.add(run)
            session.commit()
        return run

    def heartbeat(self, run_id: int) -> None:
        with self._errors(), self.engine.begin() as conn:
            conn.execute(update(Run).where(Run.id == run_id).values(heartbeat_at=now()))

    def finish_run(
        self, run_id: int, *, status: str, error: str | None, error_step: str | None, counts: dict[str, int]
    ) -> None:
        values = {k: counts.get(k, 0) for k in COUNT_FIELDS}
        with self._errors(), self.engine.begin() as conn:
            conn.execute(
                update(Run)
                .where(Run.id == run_id)
                .values(status=status, error=error, error_step=error_step, finished_at=now(), **values)
            )

    def update_counts(self, run_id: int, counts: dict[str, int]) -> None:
        with self._errors(), self.engine.begin() as conn:
            conn.execute(
                update(Run)
                .where(Run.id == run_id)
                .values(heartbeat_at=now(), **{k: counts.get(k, 0) for k in COUNT_FIELDS})
            )

    # -- steps ------------------------------------------------------------------------

    def start_step(self, run_id: int, *, step_id: str, step_type: str, phase: str, attempt: int, items_in: int) -> int:
        with self._errors(), self.engine.begin() as conn:
            result = conn.execute(
                insert(StepAttempt).values(
                    run_id=run_id,
                    step_id=step_id,
                    step_type=step_type,
                    phase=phase,
                    attempt=attempt,
                    status="running",
                    started_at=now(),
                    items_in=items_in,
                )
            )
            return int(result.inserted_primary_key[0])

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
        with self._errors(), self.engine.begin() as conn:
            conn.execute(
                update(StepAttempt)
                .where(StepAttempt.id == attempt_id)
                .values(
                    status=status,
                    error=error,
                    items_out=items_out,
                    retries=retries,
                    summary=summary,
                    finished_at=now(),
                )
            )

    # -- the item ledger --------------------------------------------------------------

    # The ledger is written once per item, twice per run: these go straight to the driver's
    # executemany (SQLAlchemy's per-row parameter handling cost more than the database).

    def add_items(self, run_id: int, workflow: str, rows: Sequence[ItemRow]) -> None:
        if not rows:
            return
        stamp = now()
        with self._errors(), self.engine.begin() as conn:
            _executemany(
                conn,
                insert(LedgerItem),
                [
                    {
                        "run_id": run_id,
                        "workflow": workflow,
                        "seq": r.seq,
                        "key": r.key,
                        "fetched_by": r.fetched_by,
                        "outcome": "pending",
                        "data": r.data,
                        "updated_at": stamp,
                    }
                    for r in rows
                ],
                json_keys=("data",),
                time_keys=("updated_at",),
            )

    def set_outcomes(self, run_id: int, rows: Iterable[OutcomeRow]) -> None:
        rows = list(rows)
        if not rows:
            return
        statement = (
            update(LedgerItem)
            .where(LedgerItem.run_id == bindparam("b_run"), LedgerItem.seq == bindparam("b_seq"))
            .values(
                outcome=bindparam("b_outcome"),
                step_id=bindparam("b_step"),
                reason=bindparam("b_reason"),
                result=bindparam("b_result", type_=_COLUMNS.result.type),
                updated_at=bindparam("b_stamp", type_=_COLUMNS.updated_at.type),
            )
        )
        stamp = now()
        with self._errors(), self.engine.begin() as conn:
            _executemany(
                conn,
                statement,
                [
                    {
                        "b_run": run_id,
                        "b_seq": r.seq,
                        "b_outcome": r.outcome,
                        "b_step": r.step_id,
                        "b_reason": r.reason,
                        "b_result": r.result,
                        "b_stamp": stamp,
                    }
                    for r in rows
                ],
                json_keys=("b_result",),
                time_keys=("b_stamp",),
            )

    def set_delivered_by(self, run_id: int, rows: Iterable[tuple[int, list[str]]]) -> None:
        """Record which deliver steps items passed (items still pending, in a longer workflow)."""
        rows = list(rows)
        if not rows:
            return
        statement = (
            update(LedgerItem)
            .where(LedgerItem.run_id == bindparam("b_run"), LedgerItem.seq == bindparam("b_seq"))
            .values(
                delivered_by=bindparam("b_steps", type_=_COLUMNS.delivered_by.type),
                updated_at=bindparam("b_stamp", type_=_COLUMNS.updated_at.type),
            )
        )
        stamp = now()
        with self._errors(), self.engine.begin() as conn:
            _executemany(
                conn,
                statement,
                [{"b_run": run_id, "b_seq": seq, "b_steps": steps, "b_stamp": stamp} for seq, steps in rows],
                json_keys=("b_steps",),
                time_keys=("b_stamp",),
            )

    def delivered_keys(self, workflow: str, keys: Iterable[str]) -> dict[str, int]:
        """Which of ``keys`` an earlier run of ``workflow`` delivered, and in which run."""
        wanted = list(dict.fromkeys(keys))
        found: dict[str, int] = {}
        with self._errors(), self.engine.connect() as conn:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                rows = conn.execute(
                    select(LedgerItem.key, func.min(LedgerItem.run_id))
                    .where(
                        LedgerItem.workflow == workflow,
                        LedgerItem.outcome == "delivered",
                        LedgerItem.key.in_(chunk),
                    )
                    .group_by(LedgerItem.key)
                )
                found.update({key: run_id for key, run_id in rows})
        return found

    # -- model calls ------------------------------------------------------------------

    def record_model_call(self, **fields: Any) -> None:
        fields.setdefault("created_at", now())
        fields.setdefault("cost_usd", Decimal(0))
        with self._errors(), self.engine.begin() as conn:
            conn.execute(insert(ModelCall).values(**fields))

    # -- reading ----------------------------------------------------------------------

    def list_runs(self, *, workflow: str | None = None, status: str | None = None, limit: int = 20) -> list[Run]:
        query = select(Run).order_by(Run.id.desc()).limit(limit)
        if workflow:
            query = query.where(Run.workflow == workflow)
        if status:
            query = query.where(Run.status == status)
        with self._errors(), self.session() as session:
            return list(session.scalars(query))

    def get_run(self, run_id: int) -> Run | None:
        with self._errors(), self.session() as session:
            return session.scalars(select(Run).where(Run.id == run_id).options(selectinload(Run.steps))).one_or_none()

    def items(self, run_id: int, outcomes: Sequence[str] | None = None) -> list[LedgerItem]:
        query = select(LedgerItem).where(LedgerItem.run_id == run_id).order_by(LedgerItem.seq)
        if outcomes:
            query = query.where(LedgerItem.outcome.in_(outcomes))
        with self._errors(), self.session() as session:
            return list(session.scalars(query))

    def model_usage(self, run_id: int) -> dict[str, dict[str, Any]]:
        """Per step: calls, tokens and cost of the run's model calls."""
        query = (
            select(
                ModelCall.step_id,
                func.count(),
                func.coalesce(func.sum(ModelCall.input_tokens), 0),
                func.coalesce(func.sum(ModelCall.cached_input_tokens), 0),
                func.coalesce(func.sum(ModelCall.output_tokens), 0),
                func.coalesce(func.sum(ModelCall.cost_usd), 0),
            )
            .where(ModelCall.run_id == run_id, ModelCall.status != "cached")
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
