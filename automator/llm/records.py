"""Writing model calls, cached responses and batch jobs to the history, in the background.

A run of thousands of items makes thousands of model calls; writing each in its own
transaction on the event loop would stall every other call. ``CallRecorder`` queues
rows and writes them together from a worker thread every quarter second (and at
close), so at most that much is lost if the process dies — the calls are then
answered from the provider again, never from a half-written record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, func, insert, select, update

from automator.errors import HistoryError
from automator.history.db import inserted_id
from automator.history.llm_models import CachedResponse, ModelBatch
from automator.history.models import ModelCall
from automator.history.store import History

FLUSH_SECONDS = 0.25
log = logging.getLogger("automator.llm")


def now() -> datetime:
    return datetime.now(UTC)


class CallRecorder:
    """Queues ModelCall rows and cache entries; writes them in batches off the event loop."""

    def __init__(self, history: History) -> None:
        self.history = history
        self._calls: list[dict[str, Any]] = []
        self._cache: dict[str, dict[str, Any]] = {}
        self._task: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()

    def call(self, **fields: Any) -> None:
        fields.setdefault("created_at", now())
        fields.setdefault("cost_usd", Decimal(0))
        self._calls.append(fields)
        self._ensure_task()

    def cache(self, key: str, *, model: str, workflow: str, step_id: str, response: dict[str, Any]) -> None:
        self._cache[key] = {
            "key": key,
            "model": model,
            "workflow": workflow,
            "step_id": step_id,
            "response": response,
            "hits": 0,
            "created_at": now(),
            "last_hit_at": None,
        }
        self._ensure_task()

    def pending_cache(self, key: str) -> dict[str, Any] | None:
        row = self._cache.get(key)
        return None if row is None else row["response"]

    def _ensure_task(self) -> None:
        if self._task is None or self._task.done():
            with contextlib.suppress(RuntimeError):  # no running loop: close() writes it
                self._task = asyncio.get_running_loop().create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        await asyncio.sleep(FLUSH_SECONDS)
        try:
            await self.flush()
        except HistoryError as exc:
            # the rows stay queued: the next flush (at the latest close()) writes them or
            # reports the failure; a background task must not die with an unretrieved error
            log.warning("model calls not recorded yet (will try again): %s", exc.message)

    async def flush(self) -> None:
        async with self._write_lock:
            calls, self._calls = self._calls, []
            cache, self._cache = list(self._cache.values()), {}
            if calls or cache:
                try:
                    await asyncio.to_thread(self._write, calls, cache)
                except Exception:  # re-raised below; a cancel leaves the thread writing them
                    # paid calls are never dropped: back in the queue, before what came since
                    self._calls = calls + self._calls
                    self._cache = {row["key"]: row for row in cache} | self._cache
                    raise

    def _write(self, calls: list[dict[str, Any]], cache: list[dict[str, Any]]) -> None:
        self.history.write(lambda conn: self._insert(conn, calls, cache))

    @staticmethod
    def _insert(conn: Connection, calls: list[dict[str, Any]], cache: list[dict[str, Any]]) -> None:
        # one transaction, tried again whole by History.write when the database is locked
        if calls:
            conn.execute(insert(ModelCall), calls)
        if cache:
            keys = [row["key"] for row in cache]
            existing = set(conn.scalars(select(CachedResponse.key).where(CachedResponse.key.in_(keys))))
            fresh = [row for row in cache if row["key"] not in existing]
            if fresh:
                conn.execute(insert(CachedResponse), fresh)

    async def close(self) -> None:
        if self._task is not None:
            if not self._task.done():
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task  # its outcome is retrieved here, whatever it was
        await self.flush()


def cached_response(history: History, key: str, *, count_hit: bool = True) -> dict[str, Any] | None:
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

    return history.write(lookup)  # a locked database is waited out, as for every history write


def spent_since(history: History, workflow: str, since: datetime) -> Decimal:
    """What a workflow's model calls cost since a moment (for the daily budget)."""
    query = select(func.coalesce(func.sum(ModelCall.cost_usd), 0)).where(
        ModelCall.workflow == workflow, ModelCall.created_at >= since
    )
    with history._errors(), history.engine.connect() as conn:
        return Decimal(str(conn.execute(query).scalar_one()))


def start_of_day(moment: datetime | None = None) -> datetime:
    moment = moment or now()
    return moment.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def since(delta: timedelta) -> datetime:
    return now() - delta


# -- batches --------------------------------------------------------------------------


def add_batch(history: History, **fields: Any) -> int:
    stamp = now()
    with history._errors(), history.engine.begin() as conn:
        result = conn.execute(insert(ModelBatch).values(created_at=stamp, updated_at=stamp, **fields))
        return inserted_id(result)


def update_batch(history: History, row_id: int, **fields: Any) -> None:
    with history._errors(), history.engine.begin() as conn:
        conn.execute(update(ModelBatch).where(ModelBatch.id == row_id).values(updated_at=now(), **fields))


OPEN_BATCH = ("submitted", "validating", "in_progress", "finalizing", "completed")


def open_batches(history: History, workflow: str, step_id: str) -> list[ModelBatch]:
    """Batches of this step not yet collected (a restarted process picks them up)."""
    query = (
        select(ModelBatch)
        .where(ModelBatch.workflow == workflow, ModelBatch.step_id == step_id, ModelBatch.status.in_(OPEN_BATCH))
        .order_by(ModelBatch.id)
    )
    with history._errors(), history.session() as session:
        return list(session.scalars(query))


def run_batches(history: History, run_id: int, step_id: str) -> list[ModelBatch]:
    """The batches one step of one run submitted, collected or not (a resumed run finds them here)."""
    query = select(ModelBatch).where(ModelBatch.run_id == run_id, ModelBatch.step_id == step_id).order_by(ModelBatch.id)
    with history._errors(), history.session() as session:
        return list(session.scalars(query))


def last_calls(history: History, run_id: int, step_id: str) -> dict[int, tuple[str, str | None]]:
    """Each item's latest model call in one step of one run: (status, error).

    A resumed run reads here how an item of an already-collected batch ended when its
    answer was an error or was rejected, rather than sending it again.
    """
    query = (
        select(ModelCall.item_seq, ModelCall.status, ModelCall.error)
        .where(ModelCall.run_id == run_id, ModelCall.step_id == step_id, ModelCall.item_seq.is_not(None))
        .order_by(ModelCall.id)
    )
    with history._errors(), history.engine.connect() as conn:
        return {int(seq): (status, error) for seq, status, error in conn.execute(query) if seq is not None}
