"""A history written by the previous release upgrades, reads the same, and keeps working.

tests/data/history-6263ae2.sqlite was written by automator at commit 6263ae2 (the release
before engine v2); tests/data/make_old_history.py made it and says what is in it, and
tests/data/history-6263ae2.json holds what that release's commands printed about it and
which run its SIGKILL left ``running``. Today's code opens a copy: the schema goes to the
newest migration (whichever that is: read from Alembic's script folder), the old runs,
ledgers and costs read as they did, the killed run is resumed by ``automator run`` of its
workflow without delivering an item twice, new runs answer from the old response cache,
the daemon goes on with the old schedule, and the migrations can be undone.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from alembic import command
from automator.history import db
from automator.history.tables import metadata
from tests.conftest import REPO
from tests.daemon.conftest import DaemonProcess, wait_for
from tests.llm.fake_openai import FakeOpenAI

# an SQLite file an old release wrote: these tests stay on SQLite when the suite runs on PostgreSQL
pytestmark = pytest.mark.sqlite_only

DATA = REPO / "tests" / "data"
FIXTURE = DATA / "history-6263ae2.sqlite"
RECORDED = json.loads((DATA / "history-6263ae2.json").read_text(encoding="utf-8"))
FACTS: dict[str, Any] = RECORDED["facts"]  # the killed run, the costs window, the webhook secret's name
PRINTED: dict[str, Any] = RECORDED["printed"]  # what the old release's commands printed
KILLED: dict[str, Any] = FACTS["killed_run"]
FINAL_OUTCOMES = {"delivered", "skipped", "quarantined", "failed"}
COUNTS = ("fetched", "delivered", "skipped", "quarantined", "failed")  # a run's item counts, as `runs --json` has them
# Old rows a migration rewrites on purpose: {table: [columns]} left out of the "no row changed"
# check, each with a comment saying why. A migration adds columns and tables; it changes old
# values only for a reason written here.
REWRITTEN: dict[str, list[str]] = {}


# --- reading the database as it is, without automator ------------------------------------


def query(path: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def schema(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Each table's columns as SQLite describes them: (name, type, not null, primary key)."""
    tables = [name for (name,) in query(path, "select name from sqlite_master where type = 'table' order by name")]
    return {
        table: [(c[1], c[2], c[3], c[5]) for c in query(path, f'pragma table_info("{table}")')]
        for table in tables
        if table != "sqlite_sequence"
    }


def rows(path: Path, table: str, columns: list[str]) -> list[tuple[Any, ...]]:
    names = ", ".join(f'"{c}"' for c in columns)
    return query(path, f'select {names} from "{table}" order by {names}')


def revision(path: Path) -> str:
    ((found,),) = query(path, "select version_num from alembic_version")
    return str(found)


def newest_revision() -> str:
    head = ScriptDirectory(str(db.migrations_dir())).get_current_head()
    assert head is not None
    return head


def counts(run: dict[str, Any]) -> dict[str, int]:
    """A run's item counts from its ``--json`` (further counts a newer release may add left out)."""
    return {name: run["items"][name] for name in COUNTS}


def assert_keeps(old: Any, new: Any, where: str = "") -> None:
    """``new`` says all that ``old`` said, the same way: keys may be added, none changed or gone."""
    if isinstance(old, dict):
        assert isinstance(new, dict), f"{where or 'the output'}: {new!r} is no longer an object"
        for key, value in old.items():
            assert key in new, f"{where}.{key} is gone"
            assert_keeps(value, new[key], f"{where}.{key}")
    elif isinstance(old, list):
        assert isinstance(new, list) and len(new) == len(old), f"{where}: {new!r}, was {old!r}"
        for index, (was, now) in enumerate(zip(old, new, strict=True)):
            assert_keeps(was, now, f"{where}[{index}]")
    else:
        assert new == old, f"{where}: {new!r}, was {old!r}"


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def old_history(history_url: str) -> Path:
    """A copy of the old history where the CLI (``cli``) and AUTOMATOR_DATABASE_URL look."""
    path = Path(history_url.removeprefix("sqlite:///"))
    shutil.copyfile(FIXTURE, path)
    return path


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The fixture's workflow files, unchanged (so their versions are the recorded runs'), in a project."""
    folder = tmp_path / "project" / "workflows"
    shutil.copytree(DATA / "old_history_workflows", folder)
    return folder


# --- the schema ----------------------------------------------------------------------------


def test_db_upgrade_takes_the_old_history_to_the_newest_migration_and_keeps_every_row(
    cli, old_history: Path, history_url: str
) -> None:
    old_revision, head = revision(old_history), newest_revision()
    script = ScriptDirectory(str(db.migrations_dir()))
    assert old_revision in {s.revision for s in script.walk_revisions()}, "the old release's revision is gone"
    old_schema = schema(old_history)
    kept = {
        table: [c[0] for c in columns if c[0] not in REWRITTEN.get(table, [])]
        for table, columns in old_schema.items()
        if table != "alembic_version"
    }
    before = {table: rows(old_history, table, columns) for table, columns in kept.items()}
    assert len(before["runs"]) == 12 and len(before["items"]) == 37  # the fixture is the one described

    assert f"current: {old_revision}  newest: {head}" in cli("db", "current").stdout
    upgraded = cli("db", "upgrade")
    assert upgraded.exit_code == 0, upgraded.stderr
    if old_revision != head:
        assert upgraded.stdout.strip() == f"history database upgraded: {old_revision} -> {head}"
    assert revision(old_history) == head

    # the upgraded schema is exactly the models' (as a new history's is)
    engine = db.open_engine(history_url)
    with engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), metadata)
    engine.dispose()
    assert differences == [], "the migrations bring an old history to another schema than a new one's"

    # no row lost or changed: new columns and tables only add
    for table, columns in kept.items():
        assert rows(old_history, table, columns) == before[table], (
            f"the migrations changed old rows of {table} (on purpose? say so in REWRITTEN)"
        )


def test_any_command_upgrades_the_embedded_old_history(cli, old_history: Path) -> None:
    listed = cli("runs", "--json")
    assert listed.exit_code == 0, listed.stderr
    assert revision(old_history) == newest_revision()


def test_downgrade_to_the_old_revision_and_up_again(old_history: Path, history_url: str) -> None:
    """Every migration since the old release can be undone (Alembic's downgrade; the CLI has none)."""
    old_revision, old_schema = revision(old_history), schema(old_history)
    kept = {
        table: [c[0] for c in columns if c[0] not in REWRITTEN.get(table, [])] for table, columns in old_schema.items()
    }
    before = {table: rows(old_history, table, columns) for table, columns in kept.items()}
    engine = db.open_engine(history_url)
    try:
        db.upgrade(engine)
        config = Config()
        config.set_main_option("script_location", str(db.migrations_dir()))
        config.attributes["engine"] = engine
        command.downgrade(config, old_revision)
        assert revision(old_history) == old_revision
        assert schema(old_history) == old_schema, "the downgrade does not give back the old release's schema"
        for table, columns in kept.items():
            assert rows(old_history, table, columns) == before[table], f"the round trip changed {table}"
        db.upgrade(engine)
        assert revision(old_history) == newest_revision()
    finally:
        engine.dispose()


# --- reading the old runs ------------------------------------------------------------------


def test_runs_and_runs_show_print_what_the_old_release_printed(cli, old_history: Path) -> None:
    raw = {
        row[0]: row
        for row in query(
            old_history,
            "select id, workflow, status, trigger, fetched, delivered, skipped, quarantined, failed, error from runs",
        )
    }
    raw_items = query(old_history, "select run_id, seq, key, outcome, step_id, reason from items order by run_id, seq")

    listed = cli("runs", "--json", "--limit", "1000")
    assert listed.exit_code == 0, listed.stderr
    runs = {run["id"]: run for run in listed.json()}
    assert set(runs) == set(raw)
    for old in PRINTED["runs"]:
        assert_keeps(old, runs[old["id"]], f"runs[{old['id']}]")
    for run_id, (_, workflow, status, trigger, *numbers, error) in raw.items():
        run = runs[run_id]
        assert (run["workflow"], run["trigger"]) == (workflow, trigger)
        assert list(counts(run).values()) == numbers
        if run_id != KILLED["id"]:  # that one's status and error say it was found crashed
            assert (run["status"], run["error"]) == (status, error)
    # the run left running by a process that is gone is not shown running (crashed, to be resumed)
    assert runs[KILLED["id"]]["status"] != "running"

    for run_id in raw:
        shown = cli("runs", "show", str(run_id), "--json")
        assert shown.exit_code == 0, shown.stderr
        detail = shown.json()
        if str(run_id) in PRINTED["runs_show"]:
            assert_keeps(PRINTED["runs_show"][str(run_id)], detail, f"runs show {run_id}")
        ledger = [(run_id, i["seq"], i["key"], i["outcome"], i["step"], i["reason"]) for i in detail["ledger"]]
        assert ledger == [row for row in raw_items if row[0] == run_id]
        text = cli("runs", "show", str(run_id), "--items")
        assert text.exit_code == 0, text.stderr
        assert f"Run {run_id} of {raw[run_id][1]}" in text.stdout


def test_costs_and_the_finetune_export_are_the_old_numbers(cli, old_history: Path) -> None:
    since = FACTS["costs_since"]
    for by, old in PRINTED["costs"].items():
        shown = cli("costs", "--since", since, "--by", by, "--json")
        assert shown.exit_code == 0, shown.stderr
        assert_keeps(old, shown.json(), f"costs --by {by}")

    # and the same numbers straight from the fixture's rows
    expected: dict[str, dict[str, Any]] = {}
    for workflow, status, tokens_in, cached, tokens_out, cost in query(
        old_history,
        "select workflow, status, input_tokens, cached_input_tokens, output_tokens, cast(cost_usd as text) "
        "from model_calls",
    ):
        sums = expected.setdefault(
            workflow,
            {"calls": 0, "cache_hits": 0, "input_tokens": 0, "cached_input_tokens": 0, "output_tokens": 0, "cost": 0},
        )
        sums["cache_hits" if status == "cached" else "calls"] += 1
        sums["input_tokens"] += tokens_in
        sums["cached_input_tokens"] += cached
        sums["output_tokens"] += tokens_out
        sums["cost"] += Decimal(cost)
    shown = {row["workflow"]: row for row in cli("costs", "--since", since, "--json").json()}
    assert set(shown) == set(expected) == {"old-model", "old-batch"}
    for workflow, sums in expected.items():
        cost = sums.pop("cost").quantize(Decimal("0.000000001"))
        assert {k: shown[workflow][k] for k in sums} == sums
        assert Decimal(shown[workflow]["cost_usd"]) == cost

    table = cli("costs", "--since", since)
    assert table.exit_code == 0 and "old-model" in table.stdout and "old-batch" in table.stdout

    exported = cli("export", "finetune", "--workflow", "old-model", "--step", "classify")
    assert exported.exit_code == 0, exported.stderr
    assert exported.stdout.splitlines() == PRINTED["export_finetune"]


# --- working on in the upgraded history --------------------------------------------------------


def test_automator_run_resumes_the_killed_run_then_runs_anew(
    cli, old_history: Path, project: Path, httpserver: HTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    received: list[tuple[str, str | None]] = []

    def hook(request: Request) -> Response:
        received.append((request.get_json()["id"], request.headers.get("Idempotency-Key")))
        return Response("ok")

    httpserver.expect_request("/hook", method="POST").respond_with_handler(hook)
    monkeypatch.setenv(f"AUTOMATOR_SECRET_{FACTS['hook_secret']}", httpserver.url_for("/hook"))
    run_id = KILLED["id"]
    delivered_before = query(
        old_history, "select seq, key, step_id from items where run_id = ? and outcome = 'delivered'", run_id
    )
    assert [key for _, key, _ in delivered_before] == KILLED["delivered"]
    new_keys = ["n13", "n14"]
    (project / "notify.jsonl").write_text(
        "".join(
            json.dumps({"id": key, "text": f"notice {key}"}) + "\n"
            for key in [*KILLED["delivered"], *KILLED["pending"], *new_keys]
        ),
        encoding="utf-8",
    )

    done = cli("run", project / "old-notify.yaml", "--json")
    assert done.exit_code == 0, done.stderr
    assert re.search(rf"\bresum\w* run {run_id}\b", done.stderr), done.stderr  # it says so

    # the killed run: its pending items posted once each (the one in flight again, with its key),
    # none it had delivered, none archived again (they had passed the archive step)
    resumed = [key for key, _ in received if key in KILLED["pending"]]
    assert sorted(resumed) == sorted(KILLED["pending"])
    in_flight = KILLED["in_flight"]
    assert (in_flight["id"], in_flight["key"]) in received
    assert not {key for key, _ in received} & set(KILLED["delivered"])
    ledger = query(old_history, "select seq, key, outcome, step_id from items where run_id = ? order by seq", run_id)
    assert {outcome for _, _, outcome, _ in ledger} <= FINAL_OUTCOMES
    assert [(key, outcome) for _, key, outcome, _ in ledger] == [
        (key, "delivered") for key in [*KILLED["delivered"], *KILLED["pending"]]
    ]
    assert (
        query(
            old_history,
            "select seq, key, step_id from items where run_id = ? and seq < ?",
            run_id,
            len(delivered_before),
        )
        == delivered_before
    )
    detail = cli("runs", "show", str(run_id), "--json").json()
    assert detail["status"] == "succeeded"
    assert counts(detail) == {"fetched": 8, "delivered": 8, "skipped": 0, "quarantined": 0, "failed": 0}

    # then the new run: the old keys are known as delivered; the new ones go out, archived and posted
    new_run = done.json()
    assert new_run["id"] > run_id and new_run["status"] == "succeeded"
    assert counts(new_run) == {"fetched": 10, "delivered": 2, "skipped": 8, "quarantined": 0, "failed": 0}
    pending = len(KILLED["pending"])
    assert sorted(key for key, _ in received[pending:]) == new_keys  # after the resumed run had ended
    for key, idempotency_key in received:
        assert idempotency_key == hashlib.sha256(f"old-notify\0post\0{key}".encode()).hexdigest()[:32]
    archived = [json.loads(line)["id"] for line in (project / "notify-archive.jsonl").read_text().splitlines()]
    assert archived == new_keys

    statuses = {run["status"] for run in cli("runs", "--json", "--limit", "1000").json()}
    assert statuses <= {"succeeded", "failed"}, "a run of the old history is left unfinished"


def test_a_model_step_answers_from_the_old_response_cache(
    cli, old_history: Path, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    since = FACTS["costs_since"]
    (old_costs,) = [row for row in PRINTED["costs"]["workflow"] if row["workflow"] == "old-model"]
    (project / "tickets.jsonl").write_text(
        json.dumps({"id": "t7", "text": "I was charged twice, please check my billing."})  # asked by the old release
        + "\n"
        + json.dumps({"id": "t8", "text": "My invoice shows the wrong billing address."})
        + "\n",
        encoding="utf-8",
    )
    with FakeOpenAI() as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test-old-history")
        done = cli("run", project / "old-model.yaml", "--json")
        billed = server.billed_usd()
        asked = [request["body"] for request in server.completions]
    assert done.exit_code == 0, done.stderr
    assert counts(done.json()) == {"fetched": 2, "delivered": 2, "skipped": 0, "quarantined": 0, "failed": 0}
    assert len(asked) == 1 and "wrong billing address" in json.dumps(asked[0])  # t7 came from the cache

    (now,) = [row for row in cli("costs", "--since", since, "--json").json() if row["workflow"] == "old-model"]
    assert now["calls"] == old_costs["calls"] + 1
    assert now["cache_hits"] == old_costs["cache_hits"] + 1
    assert Decimal(now["cost_usd"]) == Decimal(old_costs["cost_usd"]) + billed


def test_the_daemon_keeps_the_old_schedule(old_history: Path, history_url: str, tmp_path: Path) -> None:
    (last_old_run,) = query(old_history, "select max(id) from runs")[0]
    ((old_fire,),) = query(old_history, "select last_fire_at from schedule_state where workflow = 'old-scheduled'")
    folder = tmp_path / "scheduled" / "workflows"
    folder.mkdir(parents=True)
    shutil.copy(DATA / "old_history_workflows" / "old-scheduled.yaml", folder)
    (folder / "scheduled.jsonl").write_text('{"id": "s1"}\n{"id": "s3"}\n', encoding="utf-8")

    daemon = DaemonProcess(folder, history_url, tmp_path / "daemon.log", "--keep", "forever")
    try:
        daemon.start()  # it upgrades the history first
        new_run = wait_for(
            lambda: query(
                old_history,
                "select id, trigger, delivered, skipped from runs where workflow = 'old-scheduled' and id > ? "
                "and status = 'succeeded' order by id",
                last_old_run,
            ),
            20,
            "a scheduled run in the upgraded history",
        )[0]
        assert daemon.stop(signal.SIGTERM) == 0
    finally:
        daemon.close()
    assert revision(old_history) == newest_revision()
    # the fire missed since the old daemon stopped, caught up (catch_up: latest); s1 was
    # delivered by the old release's runs, s3 is new
    assert new_run[1:] == ("catch_up", 1, 1)
    ((new_fire,),) = query(old_history, "select last_fire_at from schedule_state where workflow = 'old-scheduled'")
    assert new_fire > old_fire
