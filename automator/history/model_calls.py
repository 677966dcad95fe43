"""The SQL of model calls, cached responses, batch jobs and what they cost.

:class:`ModelCallHistory` implements :class:`automator.history.protocols.ModelCallStore` on a
:class:`~automator.history.store.History`. Model calls are written ahead: a row (``sent``,
with the most the request can cost) is committed before the request leaves, and its usage,
exact cost and status — with the answer's cache entry, in the same transaction — before the
answer is handed on. Writes made while a run goes on use :meth:`History.commit`, so the
calls of concurrent items share commits. A ``sent`` row whose answer a crash lost becomes
``unconfirmed`` at its upper bound (:meth:`ModelCallHistory.confirm_lost`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, and_, case, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql

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
        # a locked database is waited out, as for every history write
        return self.history.write(lambda conn: _cached(conn, key, count_hit=count_hit, run_id=None))

    async def lookup(self, key: str, *, run_id: int | None = None) -> dict[str, Any] | None:
        """A stored answer for this request (counting the hit), sharing a commit with the run's writes.

        ``run_id``: only an answer that run's own calls paid for (a resumed run whose step
        does not read the cache still must not pay twice for what it was answered before).
        """
        return await self.history.commit(lambda conn: _cached(conn, key, count_hit=True, run_id=run_id))

    async def call_sent(self, **fields: Any) -> int:
        """Write a call's row before its request leaves (status ``sent``); its id once durable."""
        fields.setdefault("created_at", now())
        fields.setdefault("status", CallStatus.SENT)
        return await self.history.commit(lambda conn: inserted_id(conn.execute(insert(ModelCall).values(**fields))))

    async def call_ended(self, call_id: int | None, fields: dict[str, Any], cache: dict[str, Any] | None = None) -> int:
        """A call's result (its ``sent`` row updated, or a new row when ``call_id`` is None) and
        the answer's cache entry, in one transaction; returns once it is durable."""

        def work(conn: Connection) -> int:
            if call_id is None:
                row_id = inserted_id(conn.execute(insert(ModelCall).values(created_at=now(), **fields)))
            else:
                conn.execute(update(ModelCall).where(ModelCall.id == call_id).values(**fields))
                row_id = call_id
            if cache is not None:
                _insert_cache(conn, [cache])
            return row_id

        return await self.history.commit(work)

    async def store_answer(self, cache: dict[str, Any]) -> None:
        """An answer into the response cache (kept if one is there already)."""
        await self.history.commit(lambda conn: _insert_cache(conn, [cache]))

    def confirm_lost(self, run_id: int, *, step_id: str | None = None) -> int:
        """The run's calls still ``sent`` become ``unconfirmed``, costed at their upper bound; how many.

        Called when nobody can receive those answers any more: crash recovery, before the
        run is resumed or ended (and a step that ends with calls still open, for its own).
        The provider may have billed them; the bound keeps the reported cost from falling
        below what was paid.
        """
        condition = and_(ModelCall.run_id == run_id, ModelCall.status == CallStatus.SENT)
        if step_id is not None:
            condition = and_(condition, ModelCall.step_id == step_id)

        def work(conn: Connection) -> int:
            result = conn.execute(
                update(ModelCall)
                .where(condition)
                .values(
                    status=CallStatus.UNCONFIRMED,
                    cost_usd=func.coalesce(ModelCall.cost_bound_usd, 0),
                    error="sent, but the answer was lost (the process ended first); costed at its upper bound",
                )
            )
            return int(result.rowcount or 0)

        return self.history.write(work)

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
        """What a workflow's model calls cost since a moment (for the daily budget); calls in
        flight (``sent``) count at their upper bound, as unconfirmed ones do."""
        in_flight = ModelCall.status == CallStatus.SENT
        query = select(
            func.coalesce(func.sum(case((in_flight, ModelCall.cost_bound_usd), else_=ModelCall.cost_usd)), 0)
        ).where(ModelCall.workflow == workflow, ModelCall.created_at >= since)
        with self._errors(), self.history.engine.connect() as conn:
            return Decimal(str(conn.execute(query).scalar_one()))

    def cost_rows(self, since: datetime, by: str) -> list[tuple[Any, ...]]:
        """Spend since a moment grouped ``by`` workflow, day or step: the group's columns, then
        calls, cache hits, tokens in / cached / out, cost, and the upper bound and count of the calls
        whose answer is not recorded (``sent`` ones in flight and ``unconfirmed`` ones a crash lost).

        What the provider billed is at most cost + bound. Cache hits cost nothing."""
        if self.history.engine.dialect.name == "sqlite":
            day_column = func.strftime("%Y-%m-%d", ModelCall.created_at)
        else:
            # the UTC day, as SQLite's: not the day in the server's (or session's) time zone
            day_column = func.to_char(func.timezone("UTC", ModelCall.created_at), "YYYY-MM-DD")
        groupings: dict[str, list[Any]] = {
            "workflow": [ModelCall.workflow],
            "day": [day_column],
            "step": [ModelCall.workflow, ModelCall.step_id],
        }
        keys = groupings[by]
        is_cached = ModelCall.status == CallStatus.CACHED
        unanswered = ModelCall.status.in_((CallStatus.SENT, CallStatus.UNCONFIRMED))
        query = (
            select(
                *keys,
                func.sum(case((is_cached, 0), else_=1)),
                func.sum(case((is_cached, 1), else_=0)),
                func.coalesce(func.sum(ModelCall.input_tokens), 0),
                func.coalesce(func.sum(ModelCall.cached_input_tokens), 0),
                func.coalesce(func.sum(ModelCall.output_tokens), 0),
                func.coalesce(func.sum(case((unanswered, 0), else_=ModelCall.cost_usd)), 0),
                func.coalesce(func.sum(case((unanswered, func.coalesce(ModelCall.cost_bound_usd, 0)), else_=0)), 0),
                func.sum(case((unanswered, 1), else_=0)),
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

    def calls_after(self, call_id: int, *, limit: int = 10000, also: Sequence[int] = ()) -> list[CallUsage]:
        """The model calls recorded after ``call_id``, oldest first, at most ``limit``; and the
        calls ``also`` names (rows seen ``sent`` before, looked at again for their result)."""
        wanted = ModelCall.id > call_id
        if also:
            wanted = or_(wanted, ModelCall.id.in_(list(also)))
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
            .where(wanted)
            .order_by(ModelCall.id)
            .limit(limit + len(also))
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
    _insert_cache(conn, cache)


def _insert_cache(conn: Connection, cache: list[dict[str, Any]]) -> None:
    if not cache:
        return
    keys = [row["key"] for row in cache]
    existing = set(conn.scalars(select(CachedResponse.key).where(CachedResponse.key.in_(keys))))
    fresh = [row for row in cache if row["key"] not in existing]
    if not fresh:
        return
    if conn.dialect.name == "postgresql":
        # another process may be storing the same answer right now, unseen (SQLite's writers
        # take turns, PostgreSQL's don't): the first one stays, and this transaction goes on
        conn.execute(postgresql.insert(CachedResponse).on_conflict_do_nothing(index_elements=["key"]), fresh)
    else:
        conn.execute(insert(CachedResponse), fresh)


def _cached(conn: Connection, key: str, *, count_hit: bool, run_id: int | None) -> dict[str, Any] | None:
    query = select(CachedResponse.response).where(CachedResponse.key == key)
    if run_id is not None:
        paid_here = select(ModelCall.id).where(
            ModelCall.run_id == run_id, ModelCall.request_key == key, ModelCall.status == CallStatus.OK
        )
        query = query.where(paid_here.exists())
    row = conn.execute(query).first()
    if row is None:
        return None
    if count_hit:
        conn.execute(
            update(CachedResponse)
            .where(CachedResponse.key == key)
            .values(hits=CachedResponse.hits + 1, last_hit_at=now())
        )
    return dict(row[0])
