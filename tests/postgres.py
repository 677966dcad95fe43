"""A throwaway PostgreSQL server for one test session: the history's second backend.

``AUTOMATOR_TEST_DATABASE=postgresql python3 -m pytest`` runs every test that asks for
``history_url`` against its own fresh database on a real PostgreSQL (Debian's package;
``.ci/run`` installs it). The server is started once per session in a temporary folder,
on a free loopback port, with durability off (a test's database dies with the session),
and stopped at the end. ``initdb`` and ``pg_ctl`` refuse to run as root: as root, they run
as the package's ``postgres`` user (or ``automator-pg``, created when neither exists).

Each test's database is a copy of a template that the migrations brought to the newest
revision once (an operator's ``automator db upgrade``): the server database never upgrades
itself. A test that needs an empty one (``automator db upgrade`` itself) gets a copy of
``template0`` instead.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

BACKEND_ENV = "AUTOMATOR_TEST_DATABASE"
BACKENDS = ("sqlite", "postgresql")
# where a PostgreSQL other than Debian's is (its bin/ folder, with initdb and pg_ctl)
BINDIR_ENV = "AUTOMATOR_TEST_PG_BINDIR"
SUPERUSER = "automator"
TEMPLATE = "automator_template"
# the cluster's files are only ever this session's: durability costs time and buys nothing
SETTINGS = (
    "-c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off "
    "-c max_connections=300 -c timezone=Pacific/Chatham"
)


def backend() -> str:
    """The history backend this test session runs on (``$AUTOMATOR_TEST_DATABASE``, SQLite by default)."""
    value = os.environ.get(BACKEND_ENV, "").strip().lower() or "sqlite"
    if value not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={value!r}: give one of {', '.join(BACKENDS)}")
    return value


class PostgresStartError(RuntimeError):
    """The PostgreSQL server could not be started: the PostgreSQL pass fails, never skips."""


def _bindir() -> Path:
    explicit = os.environ.get(BINDIR_ENV)
    if explicit:
        return Path(explicit)

    def version(initdb: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", initdb.parent.parent.name))

    # Debian keeps each major version's server programs apart, off the PATH
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=version)
    if found:
        return found[-1].parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    raise PostgresStartError(
        "PostgreSQL's initdb was not found: install it (apt-get install postgresql) "
        f"or set {BINDIR_ENV} to the folder that has initdb and pg_ctl"
    )


def _server_user() -> str | None:
    """Who runs the server: None for this process's user, unless that is root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "automator-pg"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "automator-pg"],
        check=True,
        capture_output=True,
    )
    return "automator-pg"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PostgresServer:
    """One PostgreSQL cluster in a temporary folder, for one test session."""

    bindir: Path
    user: str | None
    root: Path = field(init=False)
    port: int = 0
    _names: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="automator-pg-"))
        if self.user is not None:
            shutil.chown(self.root, self.user)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _run(self, program: str, *args: str) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / program), *args]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False, cwd=self.root)

    def _fail(self, what: str, done: subprocess.CompletedProcess[str]) -> PostgresStartError:
        log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
        return PostgresStartError(f"{what} failed ({done.returncode}): {done.stdout}{done.stderr}\n{log}".strip())

    def start(self) -> None:
        done = self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",  # byte order for text, as SQLite compares it
            "--no-sync",
            "--no-instructions",
        )
        if done.returncode != 0:
            raise self._fail("initdb", done)
        for _ in range(3):  # a free port can be taken by another program before the server binds it
            self.port = _free_port()
            options = f"-p {self.port} -k {self.root} {SETTINGS}"
            done = self._run(
                "pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options
            )
            if done.returncode == 0:
                break
        else:
            raise self._fail("pg_ctl start", done)
        ready = self._run("pg_isready", "-h", "127.0.0.1", "-p", str(self.port), "-t", "30")
        if ready.returncode != 0:
            raise self._fail("pg_isready", ready)
        self._migrate_template()

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w")
        shutil.rmtree(self.root, ignore_errors=True)

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=self.port, user=SUPERUSER, dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(sql)

    def _migrate_template(self) -> None:
        from automator.history import db

        self._admin(f"CREATE DATABASE {TEMPLATE}")
        engine = db.open_engine(self.url(TEMPLATE))
        try:
            db.upgrade(engine)
        finally:
            engine.dispose()  # a template with a connection open cannot be copied

    def create_database(self, *, empty: bool = False) -> str:
        """A new database: a copy of the migrated template (or an empty one); its URL."""
        name = f"test_{next(self._names)}"
        # FILE_COPY: a copy of a few MB in one piece, without writing it through the WAL
        self._admin(f"CREATE DATABASE {name} TEMPLATE {'template0' if empty else TEMPLATE} STRATEGY FILE_COPY")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop a test's database, ending the connections a test left open (its daemon's, say)."""
        name = url.rsplit("/", 1)[1]
        self._admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def start_server() -> PostgresServer:
    server = PostgresServer(_bindir(), _server_user())
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    return server
