"""Plain rows the engine hands to the history, and the fast path that writes many at once."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from operator import itemgetter
from typing import Any

from sqlalchemy import Connection


def now() -> datetime:
    return datetime.now(UTC)


_CHECKED_JSON = json.JSONEncoder(ensure_ascii=False, default=str).encode
# What _CHECKED_JSON writes, from an encoder made once: ``JSONEncoder.encode`` makes its C
# encoder anew at every call, which cost more than encoding an item. It keeps no marks of
# the containers it is in (they would be shared by every call), so a cycle ends in a
# RecursionError instead of "Circular reference detected": _json then asks _CHECKED_JSON,
# which raises the usual error.
_C_ENCODER = (
    c_make_encoder(None, str, encode_basestring, None, ": ", ", ", False, False, True)
    if c_make_encoder is not None
    else None
)


def _json(value: Any) -> str:
    if _C_ENCODER is None or isinstance(value, str):
        return _CHECKED_JSON(value)
    try:
        return "".join(_C_ENCODER(value, 0))
    except RecursionError:
        return _CHECKED_JSON(value)


def _db_json(value: Any) -> str:
    return _json(value)


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
    # itemgetter of one name hands back the value itself (of none, it cannot be made)
    pick: Callable[[dict[str, Any]], tuple[Any, ...]] = (
        itemgetter(*names) if len(names) >= 2 else lambda row: tuple(row[name] for name in names)
    )
    json_at = [i for i, name in enumerate(names) if name in json_keys]
    time_at = [i for i, name in enumerate(names) if name in time_keys]
    if not json_at and not time_at:
        conn.exec_driver_sql(sql, [pick(row) for row in rows])
        return
    stamps: dict[datetime, str] = {}  # a chunk's rows share their stamp: formatted once
    values: list[tuple[Any, ...]] = []
    # the rows stay as given (a work is tried again whole when the database was locked)
    for row in rows:
        line = list(pick(row))
        for i in json_at:
            value = line[i]
            if value is not None:
                line[i] = _json(value)
        for i in time_at:
            stamp = line[i]
            if stamp is not None:
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
    fetch_mark: Any = None  # see models.Chunk.fetch_mark
