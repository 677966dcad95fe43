"""Opening the history database and keeping its schema current (Alembic)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError

from automator.errors import HistoryError

ENV_URL = "AUTOMATOR_DATABASE_URL"
HINT = f"set {ENV_URL} or --database-url to a database you can write"


def default_database_path() -> Path:
    base = os.environ.get("AUTOMATOR_HOME")
    if base:
        return Path(base) / "history.db"
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "automator" / "history.db"


def database_url(explicit: str | None = None) -> str:
    """The history database: --database-url, then $AUTOMATOR_DATABASE_URL, then the embedded default."""
    if explicit:
        return explicit
    from_env = os.environ.get(ENV_URL)
    if from_env:
        return from_env
    return f"sqlite:///{default_database_path()}"


def is_embedded(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def _safe(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<invalid url>"


def _prepare_sqlite_file(url: str) -> None:
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HistoryError(
            f"cannot create the folder for the history database {path}: {exc.strerror}", hint=HINT
        ) from None
    target = path if path.exists() else path.parent
    if not os.access(target, os.W_OK):
        raise HistoryError(f"cannot write the history database {path}: permission denied", hint=HINT)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets `automator runs` read while the daemon writes; the busy timeout makes
    # writers wait for each other instead of failing with "database is locked".
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _to_json(value: Any) -> str:
    # items may carry dates or decimals from their sources; keep them as text
    return json.dumps(value, ensure_ascii=False, default=str)


def open_engine(url: str) -> Engine:
    """An Engine for the history database, with the embedded defaults for SQLite."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise HistoryError(f"invalid database URL {url!r}", hint=HINT) from None
    try:
        if parsed.get_backend_name() == "sqlite":
            _prepare_sqlite_file(url)
            engine = create_engine(url, connect_args={"timeout": 10}, json_serializer=_to_json)
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            engine = create_engine(url, pool_pre_ping=True, json_serializer=_to_json)
    except (SQLAlchemyError, ImportError) as exc:
        raise HistoryError(f"cannot open the history database {_safe(url)}: {exc}", hint=HINT) from None
    return engine


@contextmanager
def database_errors(url: str) -> Iterator[None]:
    """Translate driver errors to a HistoryError with the (password-free) URL."""
    try:
        yield
    except DBAPIError as exc:
        reason = str(exc.orig).strip() or type(exc.orig).__name__
        raise HistoryError(f"history database {_safe(url)}: {reason}", hint=HINT) from None
    except SQLAlchemyError as exc:
        raise HistoryError(f"history database {_safe(url)}: {exc}", hint=HINT) from None


def migrations_dir() -> Path:
    """Where the Alembic scripts are: inside the installed package, or the checkout's alembic/."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "migrations", package.parent / "alembic"):
        if (candidate / "env.py").is_file():
            return candidate
    raise HistoryError("the history migrations are missing from this installation; reinstall automator")


def _alembic_config(engine: Engine) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema up to ``revision`` (normally the newest)."""
    from alembic import command

    with database_errors(str(engine.url)):
        command.upgrade(_alembic_config(engine), revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.migration import MigrationContext

    with database_errors(str(engine.url)), engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(migrations_dir())).get_current_head()


def ensure_schema(engine: Engine, *, auto_upgrade: bool) -> None:
    """Make sure the schema is current: upgrade it (embedded SQLite) or say how to."""
    if current_revision(engine) == head_revision():
        return
    if auto_upgrade:
        upgrade(engine)
        return
    with database_errors(str(engine.url)):
        has_tables = bool(inspect(engine).get_table_names())
    state = "is out of date" if has_tables else "has no automator tables yet"
    raise HistoryError(
        f"the history database {_safe(str(engine.url))} {state}",
        hint="run `automator db upgrade` first",
    )
