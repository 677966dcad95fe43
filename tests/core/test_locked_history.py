"""A history database another program locks: the run waits it out, or ends with a clear error.

The lock is real: a second sqlite3 connection holding ``BEGIN EXCLUSIVE``, as a sqlite3
shell or a backup tool would.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from werkzeug import Request, Response

from tests.conftest import run_console

# SQLite's own locking (a second sqlite3 connection): these tests stay on SQLite on every backend
pytestmark = pytest.mark.sqlite_only

ITEMS = 50


class Locker:
    """A second connection to the history that takes an exclusive lock when told to."""

    def __init__(self, path: Path) -> None:
        self.connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.held = threading.Event()
        self.taken = False
        self._mutex = threading.Lock()

    def take_once(self) -> None:
        with self._mutex:
            if not self.taken:
                self.connection.execute("BEGIN EXCLUSIVE")
                self.taken = True
                self.held.set()

    def release(self) -> None:
        with self._mutex:
            if self.held.is_set():
                self.connection.execute("ROLLBACK")
                self.held.clear()

    def close(self) -> None:
        self.release()
        self.connection.close()


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return tmp_path / "history.db"


@pytest.fixture
def locker(database: Path) -> Iterator[Locker]:
    # the schema first: the lock is taken mid-run, on a history in use
    assert run_console("--database-url", f"sqlite:///{database}", "db", "upgrade").returncode == 0
    lock = Locker(database)
    yield lock
    lock.close()


def delivering_flow(workflow_dir: Path, hook_url: str) -> Path:
    (workflow_dir / "items.jsonl").write_text("".join(json.dumps({"id": i}) + "\n" for i in range(ITEMS)))
    flow = workflow_dir / "notify.yaml"
    flow.write_text(
        "steps:\n"
        "  - {id: read, uses: file.fetch, with: {path: items.jsonl}, key: '{{ item.id }}'}\n"
        f"  - {{id: post, uses: webhook.deliver, concurrency: 1, with: {{url: '{hook_url}'}}}}\n"
    )
    return flow


def test_a_lock_held_past_the_busy_timeout_is_waited_out(
    cli, workflow_dir: Path, database: Path, locker: Locker, httpserver
) -> None:
    retried = threading.Event()
    said: list[str] = []

    class Retries(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())
            if record.getMessage().startswith("history database locked, retrying (1/"):
                retried.set()

    def hook(request: Request) -> Response:
        locker.take_once()  # another program locks the history while the run delivers
        return Response("ok")

    def release_after_the_first_retry() -> None:
        if retried.wait(60):
            locker.release()

    httpserver.expect_request("/hook", method="POST").respond_with_handler(hook)
    flow = delivering_flow(workflow_dir, httpserver.url_for("/hook"))
    handler = Retries()
    logging.getLogger("automator.history").addHandler(handler)
    releaser = threading.Thread(target=release_after_the_first_retry)
    releaser.start()
    try:
        # a busy timeout of 0.3 s: each try waits that long for the lock
        result = cli("--database-url", f"sqlite:///{database}?timeout=0.3", "run", flow, "--json")
    finally:
        retried.set()
        releaser.join()
        logging.getLogger("automator.history").removeHandler(handler)
    assert result.exit_code == 0, result.stderr
    run = result.json()
    assert run["status"] == "succeeded"
    assert said[0].startswith("history database locked, retrying (1/5) in ")  # said, not silent
    with sqlite3.connect(database) as db:
        outcomes = db.execute("select outcome, count(*) from items group by outcome").fetchall()
        status = db.execute("select status, delivered from runs").fetchall()
    assert outcomes == [("delivered", ITEMS)]
    assert status == [("succeeded", ITEMS)]
    assert len(httpserver.log) == ITEMS  # each delivered once


def test_a_lock_that_never_goes_ends_the_run_clearly_and_the_next_command_finishes_it(
    workflow_dir: Path, database: Path, locker: Locker, httpserver
) -> None:
    def hook(request: Request) -> Response:
        locker.take_once()  # and never released while the run lasts
        return Response("ok")

    httpserver.expect_request("/hook", method="POST").respond_with_handler(hook)
    flow = delivering_flow(workflow_dir, httpserver.url_for("/hook"))
    url = f"sqlite:///{database}?timeout=0.05"
    done = subprocess.run(
        [sys.executable, "-m", "automator.cli.main", "--database-url", url, "run", str(flow)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "AUTOMATOR_DATABASE_URL"},
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "Task exception was never retrieved" not in done.stderr
    assert "history database locked, retrying (5/5)" in done.stderr
    assert "error: run 1 ended failed (the run history could not be written: the history database" in done.stderr
    assert "stayed locked by another program" in done.stderr
    assert "hint: the next `automator run` of the workflow (or `automator resume 1`, or the daemon) finishes" in (
        done.stderr
    )

    locker.release()  # the other program is done
    with sqlite3.connect(database) as db:
        assert db.execute("select status from runs").fetchall() == [("running",)]  # as the dead process left it
    listed = run_console("--database-url", url, "runs", "--json")
    assert listed.returncode == 0, listed.stderr
    (run,) = json.loads(listed.stdout)
    assert run["status"] == "crashed"  # no command shows it running any more
    assert "left running by a process that is gone" in run["error"]
    # the next run of the workflow resumes it (on_crash: resume, the default), then runs anew
    again = run_console("--database-url", url, "run", str(flow), "--json")
    assert again.returncode == 0, again.stderr
    assert "resuming run 1 of notify, left running by a process that is gone" in again.stderr
    assert "run 1 resumed: succeeded" in again.stderr
    with sqlite3.connect(database) as db:
        assert db.execute("select id, status, delivered from runs").fetchall() == [
            (1, "succeeded", ITEMS),
            (2, "succeeded", 0),  # everything was delivered by run 1
        ]
        assert db.execute("select count(*) from items where outcome = 'pending'").fetchone() == (0,)
        assert db.execute("select count(*) from step_attempts where status = 'running'").fetchone() == (0,)
        assert db.execute("select count(*) from items where run_id = 1").fetchone() == (ITEMS,)
