"""Writing model calls and cached responses to the history, in the background.

A run of thousands of items makes thousands of model calls; writing each in its own
transaction on the event loop would stall every other call. ``CallRecorder`` queues
rows and writes them together from a worker thread every quarter second (and at
close), so at most that much is lost if the process dies — the calls are then
answered from the provider again, never from a half-written record. The statements
are :class:`automator.history.model_calls.ModelCalls`'.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from automator.errors import HistoryError
from automator.history.protocols import ModelCallStore

FLUSH_SECONDS = 0.25
log = logging.getLogger("automator.llm")


def now() -> datetime:
    return datetime.now(UTC)


class CallRecorder:
    """Queues ModelCall rows and cache entries; writes them in batches off the event loop."""

    def __init__(self, store: ModelCallStore) -> None:
        self.store = store
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
                    await asyncio.to_thread(self.store.write_calls, calls, cache)
                except Exception:  # re-raised below; a cancel leaves the thread writing them
                    # paid calls are never dropped: back in the queue, before what came since
                    self._calls = calls + self._calls
                    self._cache = {row["key"]: row for row in cache} | self._cache
                    raise

    async def close(self) -> None:
        if self._task is not None:
            if not self._task.done():
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task  # its outcome is retrieved here, whatever it was
        await self.flush()


def start_of_day(moment: datetime | None = None) -> datetime:
    moment = moment or now()
    return moment.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def since(delta: timedelta) -> datetime:
    return now() - delta
