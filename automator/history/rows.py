"""Plain rows the engine hands to the history, and the fast path that writes many at once."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection


def now() -> datetime:
    return datetime.now(UTC)


_JSON = json.JSONEncoder(ensure_ascii=False, default=str).encode  # built once: it is per item


def _db_json(value: Any) -> str:
    return _JSON(value)


def _sqlite_datetime(value: datetime) -> str:
    # what UTCDateTime stores on SQLite: naive UTC text
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def executemany(
    conn: Connection,
    statement: Any,
    rows: list[dict[str, Any]],
    *,
    json_keys: tuple[str, ...] = (),
    time_keys: tuple[str, ...] = (),
) -> None:
    """Many rows at once. On SQLite, straight to the driver with the values converted here
    (SQLAlchemy's per-row parameter handling cost more than the database); elsewhere, Core."""
    if not rows:
        return
    if conn.dialect.name != "sqlite":
        conn.execute(statement, rows)
        return
    sql, names = _compiled(statement, conn, tuple(rows[0]))
    json_at = [i for i, name in enumerate(names) if name in json_keys]
    time_at = [i for i, name in enumerate(names) if name in time_keys]
    stamps: dict[datetime, str] = {}  # a chunk's rows share their stamp: formatted once
    values: list[tuple[Any, ...]] = []
    # the rows stay as given (a work is tried again whole when the database was locked)
    for row in rows:
        line = [row[name] for name in names]
        for i in json_at:
            if line[i] is not None:
                line[i] = _JSON(line[i])
        for i in time_at:
            stamp = line[i]
            text = stamps.get(stamp)
            if text is None:
                text = stamps[stamp] = _sqlite_datetime(stamp)
            line[i] = text
        values.append(tuple(line))
    conn.exec_driver_sql(sql, values)


# compiling a statement costs more than writing a chunk's rows: once per statement and keys
_COMPILED: dict[tuple[int, str, tuple[str, ...]], tuple[Any, str, list[str]]] = {}


def _compiled(statement: Any, conn: Connection, keys: tuple[str, ...]) -> tuple[str, list[str]]:
    cache_key = (id(statement), conn.dialect.name, keys)
    found = _COMPILED.get(cache_key)
    if found is None or found[0] is not statement:
        compiled = statement.compile(dialect=conn.dialect, column_keys=list(keys))
        # the statement is kept with its entry: an id is only unique while its object lives
        found = _COMPILED[cache_key] = (statement, compiled.string, list(compiled.positiontup or []))
    return found[1], found[2]


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


@dataclass(frozen=True)
class ChunkRow:
    """A chunk of a run's items: the unit of work and of recovery (items ``first`` .. ``first + size - 1``)."""

    seq: int
    first: int
    size: int
    fetched_by: str
    status: str
    owner: str | None = None
