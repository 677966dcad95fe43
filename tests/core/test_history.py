"""The run history: migrations that match the models, from a wheel too; db upgrade; the console script."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, insert, inspect, text

from alembic import command
from automator.history import db
from automator.history.daemon_models import ScheduleState
from automator.history.daemon_store import DaemonStore
from automator.history.llm_models import CachedResponse
from automator.history.store import History
from automator.history.tables import metadata
from tests import postgres
from tests.conftest import REPO, run_console
from tests.daemon.conftest import wait_for

T = TypeVar("T")


@pytest.mark.empty_history
def test_the_migrations_create_exactly_the_models_tables(history_url: str) -> None:
    engine = db.open_engine(history_url)
    db.upgrade(engine)
    with engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), metadata)
    engine.dispose()
    assert differences == [], "add an Alembic migration for these model changes"


@pytest.mark.empty_history
def test_every_migration_goes_down_and_up_again(history_url: str) -> None:
    engine = db.open_engine(history_url)
    db.upgrade(engine)
    command.downgrade(db._alembic_config(engine), "base")
    assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    db.upgrade(engine)
    with engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), metadata)
    engine.dispose()
    assert differences == []


@pytest.mark.empty_history
def test_db_upgrade_and_current(cli, history_url: str) -> None:
    first = cli("db", "upgrade")
    assert first.exit_code == 0
    assert first.stdout.startswith("history database upgraded: empty -> ")
    again = cli("db", "upgrade")
    assert "history database is up to date" in again.stdout
    current = cli("db", "current")
    head = db.head_revision()
    assert f"current: {head}  newest: {head}" in current.stdout
    engine = db.open_engine(history_url)
    tables = set(inspect(engine).get_table_names())
    engine.dispose()
    assert {"runs", "step_attempts", "items", "model_calls", "alembic_version"} <= tables


@pytest.mark.sqlite_only
def test_sqlite_runs_in_wal_mode(history) -> None:
    with history.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10000


@pytest.mark.empty_history
def test_a_server_database_is_not_migrated_behind_the_operators_back(history_url: str) -> None:
    # only the embedded database upgrades itself; others say what to run
    from automator.errors import HistoryError
    from automator.history.store import History

    try:
        History(history_url, auto_upgrade=False if db.is_embedded(history_url) else None)
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


def _ticket_flow(tmp_path: Path) -> Path:
    (tmp_path / "items.jsonl").write_text('{"id": 1}\n')
    flow = tmp_path / "flow.yaml"
    flow.write_text(
        "steps:\n  - id: read\n    uses: file.fetch\n    with: {path: items.jsonl}\n    key: '{{ item.id }}'\n"
    )
    return flow


def test_a_database_url_into_a_missing_folder_is_an_error_not_a_new_history(tmp_path: Path) -> None:
    # a mistyped path must not start an empty history (everything would be delivered again)
    missing = tmp_path / "no" / "such" / "dir"
    done = run_console("--database-url", f"sqlite:///{missing / 'h.db'}", "run", str(_ticket_flow(tmp_path)))
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert f"error: the folder of the history database {missing / 'h.db'} does not exist" in done.stderr
    assert f"mkdir -p {missing}" in done.stderr and "automator db upgrade" in done.stderr
    assert not (tmp_path / "no").exists()


def test_db_upgrade_creates_a_new_history_where_it_is_asked_to(tmp_path: Path) -> None:
    target = tmp_path / "new" / "place" / "h.db"
    url = f"sqlite:///{target}"
    assert run_console("--database-url", url, "db", "upgrade").returncode == 0
    assert target.is_file()
    done = run_console("--database-url", url, "run", str(_ticket_flow(tmp_path)))
    assert done.returncode == 0, done.stderr


def test_a_new_history_file_in_an_existing_folder_is_created(tmp_path: Path) -> None:
    done = run_console("--database-url", f"sqlite:///{tmp_path / 'fresh.db'}", "run", str(_ticket_flow(tmp_path)))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "fresh.db").is_file()


def test_the_default_location_is_created_without_asking(tmp_path: Path) -> None:
    home = tmp_path / "home" / "automator"
    env = {k: v for k, v in os.environ.items() if k != db.ENV_URL} | {"AUTOMATOR_HOME": str(home)}
    done = run_console("run", str(_ticket_flow(tmp_path)), env=env)
    assert done.returncode == 0, done.stderr
    assert (home / "history.db").is_file()


@pytest.mark.parametrize(
    ("url", "message", "hint"),
    [
        (
            "postgres://ops:hunter2@db.example/automator",
            "error: unknown database kind 'postgres' in postgres://ops:***@db.example/automator",
            "hint: write postgresql:// (or postgresql+psycopg://) instead of postgres://",
        ),
        ("nonsense://", "error: unknown database kind 'nonsense' in nonsense://", "hint: use sqlite:///PATH"),
        ("postgresql+nosuch://db/x", "error: unknown database kind 'postgresql+nosuch'", "hint: use sqlite:///PATH"),
        ("mysql://db/x", "error: the database driver for mysql://db/x is not installed", "hint: install it"),
        ("not a url", "error: invalid database URL 'not a url'", "hint: write it as sqlite:///PATH"),
    ],
)
def test_a_database_url_that_cannot_work_says_what_to_write(url: str, message: str, hint: str) -> None:
    done = run_console("--database-url", url, "runs")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert message in done.stderr
    assert hint in done.stderr
    assert "hunter2" not in done.stderr


def test_db_upgrade_to_an_unknown_revision_is_a_clear_error(tmp_path: Path) -> None:
    done = run_console("--database-url", f"sqlite:///{tmp_path / 'h.db'}", "db", "upgrade", "--revision", "nosuch")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "error: cannot upgrade the history database to 'nosuch': Can't locate revision" in done.stderr
    assert f"hint: give a known revision (the newest is {db.head_revision()})" in done.stderr


def test_costs_by_day_count_a_call_on_its_utc_day(cli, history) -> None:
    # the test server's time zone is +13:45 in December: a server database groups by UTC day too
    yesterday = datetime.now(UTC).date() - timedelta(days=1)
    late = datetime.combine(yesterday, time(23, 30), tzinfo=UTC)
    history.record_model_call(
        workflow="tickets",
        step_id="classify",
        model="gpt-4o-mini",
        status="ok",
        input_tokens=10,
        output_tokens=2,
        cost_usd=Decimal("0.000003"),
        created_at=late,
    )
    shown = cli("costs", "--by", "day", "--json")
    assert shown.exit_code == 0, shown.stderr
    assert [(row["day"], row["calls"]) for row in shown.json()] == [(yesterday.isoformat(), 1)]


def test_an_item_key_of_any_length_is_kept(cli, write_workflow, workflow_dir: Path, history) -> None:
    # PostgreSQL enforces a VARCHAR's length, SQLite never did: a long key must work on both
    long = "https://example.com/tickets/" + "x" * 1500
    (workflow_dir / "items.jsonl").write_text(f'{{"url": "{long}"}}\n{{"url": "{long}"}}\n')
    flow = write_workflow(
        """
        name: long-keys
        steps:
          - {id: read, uses: file.fetch, with: {path: items.jsonl}, key: "{{ item.url }}"}
          - {id: save, uses: file.deliver, with: {path: out.jsonl}}
        """
    )
    first = cli("run", flow, "--json")
    assert first.exit_code == 0, first.stderr
    assert first.json()["items"]["delivered"] == 1  # the second is the same key: a duplicate
    again = cli("run", flow, "--json")
    assert again.json()["items"]["delivered"] == 0  # delivered before: found by its long key
    assert [item.key for item in history.items(first.json()["id"])] == [long, long]


only_postgresql = pytest.mark.skipif(
    postgres.backend() != "postgresql", reason="PostgreSQL's writers don't take turns: the PostgreSQL pass runs it"
)


def while_another_process_inserts(history: History, row: Any, write: Callable[[], T]) -> T:
    """``write`` while another connection holds ``row`` inserted and not yet committed: the
    write waits for that transaction, which then commits (as a second daemon or worker would)."""
    other = create_engine(history.url)
    try:
        with ThreadPoolExecutor(1) as pool, other.connect() as first, other.connect() as watcher:
            first.execute(row)
            second = pool.submit(write)
            waiting = text("select count(*) from pg_stat_activity where wait_event_type = 'Lock'")
            wait_for(lambda: watcher.execute(waiting).scalar() or second.done(), what="the second write to wait")
            first.commit()
            return second.result(timeout=30)
    finally:
        other.dispose()


@only_postgresql
def test_two_processes_storing_the_same_answer_both_go_on(history: History) -> None:
    entry = {
        "key": "a" * 64,
        "model": "gpt-4o-mini",
        "workflow": "tickets",
        "step_id": "classify",
        "response": {"content": "billing"},
        "hits": 0,
        "created_at": datetime.now(UTC),
    }
    stored = insert(CachedResponse).values(**entry)
    while_another_process_inserts(history, stored, lambda: history.model_calls.write_calls([], [entry]))
    assert history.model_calls.cached_response("a" * 64, count_hit=False) == {"content": "billing"}


@only_postgresql
def test_two_daemons_registering_the_same_schedule_both_go_on(history: History) -> None:
    first = datetime(2026, 1, 1, tzinfo=UTC)
    registered = insert(ScheduleState).values(
        workflow="tickets", registered_at=first, schedule="every: 1h", updated_at=first
    )
    found = while_another_process_inserts(
        history, registered, lambda: DaemonStore(history).register("tickets", "every: 1h")
    )
    assert found == first  # the first registration stays: fires before it were never due
