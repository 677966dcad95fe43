"""The rows a model call leaves in the history, and the moments costs are counted from.

Nothing is queued here: a model call's row is written (``sent``) before its request
leaves, and its result with the answer's cache entry before the answer is handed on
(:class:`automator.llm.calls.ModelCalls`, through the history's group commit). A crash
therefore loses no paid call: an answer that arrived is recorded, and one that did not
is recorded on recovery as ``unconfirmed`` at its upper bound.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any


def now() -> datetime:
    return datetime.now(UTC)


def cache_entry(key: str, *, model: str, workflow: str, step_id: str, response: dict[str, Any]) -> dict[str, Any]:
    """A response-cache row for an accepted answer."""
    return {
        "key": key,
        "model": model,
        "workflow": workflow,
        "step_id": step_id,
        "response": response,
        "hits": 0,
        "created_at": now(),
        "last_hit_at": None,
    }


def start_of_day(moment: datetime | None = None) -> datetime:
    moment = moment or now()
    return moment.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def since(delta: timedelta) -> datetime:
    return now() - delta
