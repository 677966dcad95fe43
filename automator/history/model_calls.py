"""The SQL of model calls, cached responses, batch jobs and what they cost.

:class:`ModelCallHistory` implements :class:`automator.history.protocols.ModelCallStore` on a
:class:`~automator.history.store.History`. The queueing of call rows (written together,
off the event loop) is :class:`automator.llm.records.CallRecorder`'s; the statements are
here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, and_, case, func, insert, select, update

from automator.history.db import inserted_id
from automator.history.llm_models import CachedResponse, ModelBatch
from automator.history.models import LedgerItem, ModelCall
from automator.history.states import CallStatus, Outcome
from automator.history.store import History, now

COST_GROUPS = ("workflow", "day", "step")


@dataclass(frozen=True)
class CallUsage:
    """One recorded model call's usage, as the daemon's metrics count it."""

    id: int
    workflow: str
    model: str
    status: str
    input_tokens: int | None
    cached_input_tokens: int | None
    output_tokens: int | None
    cost_usd: Decimal | None


class ModelCallHistory:
    """Model calls, batch jobs, the response cache and costs in the run history."""

    def __init__(self, history: History) -> None:
        self.history = history

    def _errors(self) -> Any:
        return self.history._errors()

    # -- writing ------------------------------------------------------------------------

    def write_calls(self, calls: Sequence[dict[str, Any]], cache: Sequence[dict[str, Any]]) -> None:
        """Model call rows and new cache entries in one transaction (retried whole when locked)."""
        self.history.write(lambda conn: _insert_calls(conn, list(calls), list(cache)))

    def cached_response(self, key: str, *, count_hit: bool = True) -> dict[str, Any] | None:
        """A stored answer for this request, counting the hit."""

        def lookup(conn: Connection) -> dict[str, Any] | None:
            row = conn.execute(select(CachedResponse.response).where(CachedResponse.key == key)).first()
            if row is None or not count_hit:
                return None if row is None else dict(row[0])
            conn.execute(
                update(CachedResponse)
                .where(CachedResponse.key == key)
                .values(hits=CachedResponse.hits + 1, last_hit_at=now())
            )
            return dict(row[0])

        return self.history.write(lookup)  # a locked database is waited out, as for every history write

    # -- batches ------------------------------------------------------------------------

    def add_batch(self, **fields: Any) -> int:
        """Record a batch job (before it is created at the provider); its row id."""
        stamp = now()
        with self._errors(), self.history.engine.begin() as conn:
            result = conn.execute(insert(ModelBatch).values(created_at=stamp, updated_at=stamp, **fields))
            return inserted_id(result)

    def update_batch(self, row_id: int, **fields: Any) -> None:
        """Change a batch job's row (its provider id, status, error)."""
        with self._errors(), self.history.engine.begin() as conn:
            conn.execute(update(ModelBatch).where(ModelBatch.id == row_id).values(updated_at=now(), **fields))

    def run_batches(self, run_id: int, step_id: str) -> list[ModelBatch]:
        """The batches one step of one run submitted, collected or not (a resumed run finds them here)."""
        query = (
            select(ModelBatch).where(ModelBatch.run_id == run_id, ModelBatch.step_id == step_id).order_by(ModelBatch.id)
        )
        with self._errors(), self.history.session() as session:
            return list(session.scalars(query))

    def last_calls(self, run_id: int, step_id: str) -> dict[int, tuple[str, str | None]]:
        """Each item's latest model call in one step of one run: (status, error).

        A resumed run reads here how an item of an already-collected batch ended when its
        answer was an error or was rejected, rather than sending it again.
        """
        query = (
            select(ModelCall.item_seq, ModelCall.status, ModelCall.error)
            .where(ModelCall.run_id == run_id, ModelCall.step_id == step_id, ModelCall.item_seq.is_not(None))
            .order_by(ModelCall.id)
        )
        with self._errors(), self.history.engine.connect() as conn:
            return {int(seq): (status, error) for seq, status, error in conn.execute(query) if seq is not None}

    # -- costs --------------------------------------------------------------------------

    def spent_since(self, workflow: str, since: datetime) -> Decimal:
        """What a workflow's model calls cost since a moment (for the daily budget)."""
        query = select(func.coalesce(func.sum(ModelCall.cost_usd), 0)).where(
            ModelCall.workflow == workflow, ModelCall.created_at >= since
        )
        with self._errors(), self.history.engine.connect() as conn:
            return Decimal(str(conn.execute(query).scalar_one()))

    def cost_rows(self, since: datetime, by: str) -> list[tuple[Any, ...]]:
        """Spend since a moment grouped ``by`` workflow, day or step: the group's columns, then
        calls, cache hits, tokens in / cached / out and cost. Cache hits cost nothing."""
        if self.history.engine.dialect.name == "sqlite":
            day_column = func.strftime("%Y-%m-%d", ModelCall.created_at)
        else:
            day_column = func.to_char(ModelCall.created_at, "YYYY-MM-DD")
        groupings: dict[str, list[Any]] = {
            "workflow": [ModelCall.workflow],
            "day": [day_column],
            "step": [ModelCall.workflow, ModelCall.step_id],
        }
        keys = groupings[by]
        is_cached = ModelCall.status == CallStatus.CACHED
        query = (
            select(
                *keys,
                func.sum(case((is_cached, 0), else_=1)),
                func.sum(case((is_cached, 1), else_=0)),
                func.coalesce(func.sum(ModelCall.input_tokens), 0),
                func.coalesce(func.sum(ModelCall.cached_input_tokens), 0),
                func.coalesce(func.sum(ModelCall.output_tokens), 0),
                func.coalesce(func.sum(ModelCall.cost_usd), 0),
            )
            .where(ModelCall.created_at >= since)
            .group_by(*keys)
            .order_by(*keys)
        )
        with self._errors(), self.history.engine.connect() as conn:
            return [tuple(row) for row in conn.execute(query)]

    def last_call_id(self) -> int:
        """The newest model call's id (0 when there is none)."""
        with self._errors(), self.history.engine.connect() as conn:
            return int(conn.execute(select(func.coalesce(func.max(ModelCall.id), 0))).scalar() or 0)

    def calls_after(self, call_id: int, *, limit: int = 10000) -> list[CallUsage]:
        """The model calls recorded after ``call_id``, oldest first, at most ``limit``."""
        query = (
            select(
                ModelCall.id,
                ModelCall.workflow,
                ModelCall.model,
                ModelCall.status,
                ModelCall.input_tokens,
                ModelCall.cached_input_tokens,
                ModelCall.output_tokens,
                ModelCall.cost_usd,
            )
            .where(ModelCall.id > call_id)
            .order_by(ModelCall.id)
            .limit(limit)
        )
        with self._errors(), self.history.engine.connect() as conn:
            return [CallUsage(*row) for row in conn.execute(query)]

    # -- export -------------------------------------------------------------------------

    def delivered_prompts(self, workflow: str, step_id: str) -> list[tuple[Any, Any]]:
        """(prompt, response) of a step's answered calls whose item was delivered, oldest first."""
        query = (
            select(ModelCall.prompt, ModelCall.response)
            .join(
                LedgerItem,
                and_(LedgerItem.run_id == ModelCall.run_id, LedgerItem.seq == ModelCall.item_seq),
            )
            .where(
                ModelCall.workflow == workflow,
                ModelCall.step_id == step_id,
                ModelCall.status == CallStatus.OK,
                ModelCall.prompt.is_not(None),
                LedgerItem.outcome == Outcome.DELIVERED,
            )
            .order_by(ModelCall.id)
        )
        with self._errors(), self.history.engine.connect() as conn:
            return [(prompt, response) for prompt, response in conn.execute(query)]


def _insert_calls(conn: Connection, calls: list[dict[str, Any]], cache: list[dict[str, Any]]) -> None:
    # one transaction, tried again whole by History.write when the database is locked
    if calls:
        conn.execute(insert(ModelCall), calls)
    if cache:
        keys = [row["key"] for row in cache]
        existing = set(conn.scalars(select(CachedResponse.key).where(CachedResponse.key.in_(keys))))
        fresh = [row for row in cache if row["key"] not in existing]
        if fresh:
            conn.execute(insert(CachedResponse), fresh)
