"""Opening the history database and keeping its schema current (Alembic)."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import CursorResult, Engine, create_engine, event, inspect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError

from automator.errors import HistoryError

ENV_URL = "AUTOMATOR_DATABASE_URL"
DEFAULT_BUSY_TIMEOUT = 10.0  # seconds; `?timeout=` in an SQLite URL changes it
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


def safe_url(url: str) -> str:
    """The URL with its password hidden, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<invalid url>"


def _prepare_sqlite_file(url: str, *, create_folder: bool) -> None:
    """Check an SQLite URL's file before SQLite silently creates an empty history there.

    Only the default location (and ``automator db upgrade``, asked to create a history) may
    create folders: a mistyped ``--database-url`` must not start a new, empty history in
    which nothing was ever delivered, so that every item is sent again. A new file in an
    existing folder is created (that is how a new history starts).
    """
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database).expanduser()
    if path.parent.exists() and not path.parent.is_dir():
        raise HistoryError(f"cannot use the history database {path}: {path.parent} is not a folder", hint=HINT)
    if not path.parent.is_dir():
        if not (create_folder or _same_path(path, default_database_path())):
            raise HistoryError(
                f"the folder of the history database {path} does not exist",
                hint=(
                    f"check the database URL; to start a new history there, create the folder "
                    f"(mkdir -p {path.parent}) or run `automator db upgrade`"
                ),
            )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HistoryError(
                f"cannot create the folder for the history database {path}: {exc.strerror}", hint=HINT
            ) from None
    target = path if path.exists() else path.parent
    if not os.access(target, os.W_OK):
        raise HistoryError(f"cannot write the history database {path}: permission denied", hint=HINT)


def _same_path(a: Path, b: Path) -> bool:
    return os.path.abspath(a) == os.path.abspath(b.expanduser())


def _unknown_backend(url: str, parsed: URL, exc: Exception) -> HistoryError:
    """A URL SQLAlchemy has no dialect or driver for, said in the user's words."""
    backend = parsed.get_backend_name()  # the part before "+": naming it loads nothing
    if isinstance(exc, ImportError):
        return HistoryError(
            f"the database driver for {safe_url(url)} is not installed ({exc})",
            hint="install it (for PostgreSQL: pip install 'automator[scale]' and write postgresql+psycopg://...)",
        )
    if backend == "postgres":
        return HistoryError(
            f"unknown database kind 'postgres' in {safe_url(url)}",
            hint="write postgresql:// (or postgresql+psycopg://) instead of postgres://",
        )
    return HistoryError(
        f"unknown database kind {parsed.drivername!r} in {safe_url(url)}",
        hint="use sqlite:///PATH (an embedded file) or postgresql+psycopg://USER@HOST/DB",
    )


def busy_timeout(url: str) -> float:
    """How long one SQLite statement waits for another writer's lock: ``?timeout=`` in the URL, or 10 s."""
    value = make_url(url).query.get("timeout", DEFAULT_BUSY_TIMEOUT)
    try:
        seconds = float(value if isinstance(value, str | int | float) else value[-1])
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= 3600:
        raise HistoryError(
            f"invalid timeout {value!r} in the database URL {safe_url(url)}",
            hint="give seconds from 0 to 3600, such as ?timeout=10",
        )
    return seconds


def is_locked(exc: BaseException) -> bool:
    """A lock another connection holds (SQLite busy, PostgreSQL lock or serialization): worth retrying."""
    orig = getattr(exc, "orig", exc)
    if isinstance(orig, sqlite3.OperationalError):
        text = str(orig).lower()
        return "locked" in text or "busy" in text
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return code in ("55P03", "40001", "40P01")  # lock not available, serialization failure, deadlock


def _sqlite_pragmas(busy_ms: int) -> Callable[[Any, Any], None]:
    def pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        # WAL lets `automator runs` read while the daemon writes; the busy timeout makes
        # writers wait for each other instead of failing with "database is locked".
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return pragmas


def inserted_id(result: CursorResult[Any]) -> int:
    """The primary key of the one row an INSERT added."""
    key = result.inserted_primary_key
    if key is None:  # pragma: no cover - an INSERT of one row always has one
        raise HistoryError("the database returned no id for a new row")
    return int(key[0])


def _to_json(value: Any) -> str:
    # items may carry dates or decimals from their sources; keep them as text
    return json.dumps(value, ensure_ascii=False, default=str)


def open_engine(url: str, *, create_folder: bool = False) -> Engine:
    """An Engine for the history database, with the embedded defaults for SQLite.

    ``create_folder``: an SQLite file's missing folder may be created (``db upgrade``);
    otherwise only the default location's is.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise HistoryError(
            f"invalid database URL {url!r}", hint="write it as sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"
        ) from None
    try:
        if parsed.get_backend_name() == "sqlite":
            _prepare_sqlite_file(url, create_folder=create_folder)
            seconds = busy_timeout(url)
            engine = create_engine(url, connect_args={"timeout": seconds}, json_serializer=_to_json)
            event.listen(engine, "connect", _sqlite_pragmas(int(seconds * 1000)))
        else:
            engine = create_engine(url, pool_pre_ping=True, json_serializer=_to_json)
    except (NoSuchModuleError, ImportError) as exc:
        raise _unknown_backend(url, parsed, exc) from None
    except SQLAlchemyError as exc:
        raise HistoryError(f"cannot open the history database {safe_url(url)}: {exc}", hint=HINT) from None
    return engine


@contextmanager
def database_errors(url: str) -> Iterator[None]:
    """Translate driver errors to a HistoryError with the (password-free) URL."""
    try:
        yield
    except DBAPIError as exc:
        reason = str(exc.orig).strip() or type(exc.orig).__name__
        raise HistoryError(f"history database {safe_url(url)}: {reason}", hint=HINT) from None
    except SQLAlchemyError as exc:
        raise HistoryError(f"history database {safe_url(url)}: {exc}", hint=HINT) from None


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
    from alembic.util import CommandError

    from alembic import command

    with database_errors(str(engine.url)):
        try:
            command.upgrade(_alembic_config(engine), revision)
        except CommandError as exc:  # an unknown --revision, say
            raise HistoryError(
                f"cannot upgrade the history database to {revision!r}: {exc}",
                hint=f"give a known revision (the newest is {head_revision()}) or leave --revision out",
            ) from None


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
        f"the history database {safe_url(str(engine.url))} {state}",
        hint="run `automator db upgrade` first",
    )
