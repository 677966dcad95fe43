"""The run history: migrations that match the models, from a wheel too; db upgrade; the console script."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from automator.history import db
from automator.history.tables import metadata
from tests.conftest import REPO, run_console


def test_the_migrations_create_exactly_the_models_tables(history_url: str) -> None:
    engine = db.open_engine(history_url)
    db.upgrade(engine)
    with engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), metadata)
    engine.dispose()
    assert differences == [], "add an Alembic migration for these model changes"


def test_db_upgrade_and_current(cli, history_url: str) -> None:
    first = cli("db", "upgrade")
    assert first.exit_code == 0
    assert first.stdout.startswith("history database upgraded: empty -> ")
    again = cli("db", "upgrade")
    assert "history database is up to date" in again.stdout
    current = cli("db", "current")
    head = db.head_revision()
    assert f"current: {head}  newest: {head}" in current.stdout
    tables = {
        row[0]
        for row in sqlite3.connect(history_url.removeprefix("sqlite:///")).execute(
            "select name from sqlite_master where type='table'"
        )
    }
    assert {"runs", "step_attempts", "items", "model_calls", "alembic_version"} <= tables


def test_sqlite_runs_in_wal_mode(history) -> None:
    with history.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10000


def test_a_server_database_is_not_migrated_behind_the_operators_back(tmp_path: Path) -> None:
    # only the embedded database upgrades itself; others say what to run
    from automator.errors import HistoryError
    from automator.history.store import History

    url = f"sqlite:///{tmp_path / 'h.db'}"
    try:
        History(url, auto_upgrade=False)
    except HistoryError as exc:
        assert "has no automator tables yet" in exc.message
        assert exc.hint == "run `automator db upgrade` first"
    else:
        raise AssertionError("expected a HistoryError")


def test_an_invalid_database_url(tmp_path: Path) -> None:
    done = run_console("--database-url", "nonsense://", "runs")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ")


def test_the_wheel_ships_plugins_and_migrations(tmp_path: Path) -> None:
    """A non-editable install works from anywhere: standard plugins, migrations and all."""
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheel_dir),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = wheel_dir.glob("automator-*.whl")
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert (target / "automator" / "migrations" / "env.py").is_file()
    assert (target / "automator_standard" / "file_fetch.py").is_file()
    assert not (target / "plugins").exists()  # no top-level package named plugins
    env = {**os.environ, "PYTHONPATH": str(target), "AUTOMATOR_DATABASE_URL": f"sqlite:///{tmp_path / 'w.db'}"}
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "automator.cli.main", "run", str(REPO / "workflows" / "ticket-digest.yaml"), "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=workdir,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    shown = subprocess.run(
        [sys.executable, "-c", "import automator; print(automator.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=workdir,
        timeout=60,
        check=True,
    )
    assert shown.stdout.startswith(str(target))


def test_the_console_script_exit_codes(tmp_path: Path) -> None:
    env = {**os.environ, "AUTOMATOR_DATABASE_URL": f"sqlite:///{tmp_path / 'c.db'}"}
    ok = run_console("run", str(REPO / "workflows" / "ticket-digest.yaml"), env=env)
    assert ok.returncode == 0, ok.stderr
    assert "details: automator runs show 1" in ok.stdout
    invalid = tmp_path / "bad.yaml"
    invalid.write_text("steps: [\n")
    bad = run_console("run", str(invalid), env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert f"{invalid}:2:1: invalid YAML" in bad.stderr
