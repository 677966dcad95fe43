"""Fixtures for the core's tests: a fresh history database per test, the CLI in-process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect, text

from automator.cli.main import main
from automator.engine.runner import RunResult
from automator.history.store import History
from automator.plugins.manager import Plugins, load_plugins
from automator.testing import CliResult
from tests import postgres
from tests.postgres import PostgresServer, start_server

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    try:
        postgres.backend()
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.addinivalue_line(
        "markers", "sqlite_only: the test is about the embedded SQLite file; its history stays SQLite on every backend"
    )
    config.addinivalue_line(
        "markers", "empty_history: under PostgreSQL, the test's database has no tables yet (it runs the migrations)"
    )
    config.addinivalue_line(
        "markers", "no_history: the test is about workflow files, not the history: the PostgreSQL pass leaves it out"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On PostgreSQL, only the tests that keep a history there: the rest ran on SQLite already
    (one pass of the whole suite and one of these fit in CI's time)."""
    if postgres.backend() != "postgresql":
        return
    keep, drop = [], []
    for item in items:
        on_server = "history_url" in getattr(item, "fixturenames", ()) and not any(
            item.get_closest_marker(name) for name in ("sqlite_only", "no_history")
        )
        (keep if on_server else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server (AUTOMATOR_TEST_DATABASE=postgresql); a failed start fails the tests."""
    server = start_server()
    yield server
    server.stop()


@pytest.fixture
def history_url(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh history for this test, also what the CLI uses: an SQLite file, or a PostgreSQL database
    when AUTOMATOR_TEST_DATABASE=postgresql (see tests/postgres.py)."""
    server: PostgresServer | None = None
    if postgres.backend() == "postgresql" and request.node.get_closest_marker("sqlite_only") is None:
        server = request.getfixturevalue("postgres_server")
        url = server.create_database(empty=request.node.get_closest_marker("empty_history") is not None)
    else:
        url = f"sqlite:///{tmp_path / 'history.db'}"
    monkeypatch.setenv("AUTOMATOR_DATABASE_URL", url)
    monkeypatch.setenv("COLUMNS", "200")
    yield url
    if server is not None:
        server.drop_database(url)


@pytest.fixture
def history(history_url: str) -> Iterator[History]:
    store = History(history_url)
    yield store
    store.close()


@pytest.fixture
def plugins() -> Plugins:
    return load_plugins(None)


@dataclass
class Cli:
    """Runs ``automator ...`` in this process, as the console script would."""

    capsys: pytest.CaptureFixture[str]

    def __call__(self, *args: str | Path) -> CliResult:
        self.capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = self.capsys.readouterr()
        return CliResult(code, out, err)


@pytest.fixture
def cli(history_url: str, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(capsys)


@pytest.fixture
def workflow_dir(tmp_path: Path) -> Path:
    """A folder for workflow files (with plugins/ beside it, as in a real project)."""
    folder = tmp_path / "project" / "workflows"
    folder.mkdir(parents=True)
    return folder


@pytest.fixture
def write_workflow(workflow_dir: Path):
    """Write a workflow file from (dedented) YAML text; returns its path."""

    def write(text: str, name: str = "flow.yaml") -> Path:
        path = workflow_dir / name
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return path

    return write


def history_rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    """The rows of a plain SQL query on a history database, SQLite or PostgreSQL: a test's own look."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(text(sql))]
    finally:
        engine.dispose()


def dump_history(url: str) -> str:
    """Every row of every table of a history database, as text: to look for what must not be there."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return "\n".join(
                repr(tuple(row))
                for table in inspect(conn).get_table_names()
                for row in conn.execute(text(f'select * from "{table}"'))
            )
    finally:
        engine.dispose()


def run_console(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """The real console script in a subprocess: for exit codes and 'no traceback' checks."""
    return subprocess.run(
        [sys.executable, "-m", "automator.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
        check=False,
    )


def run_until_killed(flow: Path, history_url: str) -> None:
    """Run a workflow in its own process that is expected to die by SIGKILL mid-run."""
    done = subprocess.run(
        [sys.executable, "-m", "automator.cli.main", "run", str(flow)],
        env={**os.environ, "AUTOMATOR_DATABASE_URL": history_url},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == -9, done.stderr


def resume_crashed(flow: Path, plugins_dir: Path, history: History) -> tuple[int, RunResult]:
    """Resume the newest run, still ``running`` after its process died: (run id, result)."""
    import asyncio

    from automator import load_workflow
    from automator.engine.runner import Run

    crashed = history.list_runs()[0]
    assert crashed.status == "running"  # nobody was left to say otherwise
    plugins = load_plugins(plugins_dir)
    return crashed.id, asyncio.run(Run(load_workflow(flow, plugins), history, plugins).resume(crashed.id))
