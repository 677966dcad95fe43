"""A workflow file in, a run and its recorded history out: the item ledger always adds up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from werkzeug import Request, Response

from tests.conftest import REPO, dump_history, history_rows, run_console

OUTCOMES = ("delivered", "skipped", "quarantined", "failed")


def ledger_adds_up(run: dict) -> None:
    items = run["items"]
    assert items["fetched"] == sum(items[o] for o in OUTCOMES), items


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def tickets(workflow_dir: Path) -> Path:
    rows = [{"id": i, "title": f"ticket {i}", "urgency": i % 5 + 1} for i in range(1, 11)]
    path = workflow_dir / "tickets.jsonl"
    write_jsonl(path, rows)
    return path


@pytest.fixture
def plugin_file(workflow_dir: Path):
    """Write a plugin into plugins/ beside the workflows folder (the default plugins directory)."""
    folder = workflow_dir.parent / "plugins"
    folder.mkdir(exist_ok=True)

    def write(name: str, source: str) -> Path:
        path = folder / f"{name}.py"
        path.write_text(textwrap.dedent(source).lstrip(), encoding="utf-8")
        return path

    return write


def test_the_quickstart_sample_runs_offline_and_is_recorded(cli, tmp_path: Path) -> None:
    sample = REPO / "workflows" / "ticket-digest.yaml"
    result = cli("run", sample, "--json")
    assert result.exit_code == 0, result.stderr
    run = result.json()
    assert run["status"] == "succeeded"
    assert run["items"]["fetched"] == 24
    ledger_adds_up(run)
    output = REPO / "workflows" / "out" / "urgent-tickets.jsonl"
    delivered = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(delivered) == run["items"]["delivered"] > 0
    assert all(row["urgent"] is True for row in delivered)

    listed = cli("runs", "--json").json()
    assert listed[0]["id"] == run["id"] and listed[0]["workflow"] == "ticket-digest"
    assert set(listed[0]) >= {"id", "workflow", "status", "trigger", "started_at", "finished_at", "items"}
    assert listed[0]["trigger"] == "cli"
    shown = cli("runs", "show", str(run["id"]), "--json").json()
    assert [s["step_id"] for s in shown["steps"]] == ["tickets", "route", "urgent-only", "digest"]
    assert shown["steps"][-1]["summary"].startswith("wrote ")


def test_run_prints_a_summary_with_where_the_output_went(cli, tickets: Path, write_workflow) -> None:
    path = write_workflow(
        """
        name: summary
        steps:
          - id: read
            uses: file.fetch
            with: {path: tickets.jsonl}
          - id: write
            uses: file.deliver
            with: {path: "out/{{ run.workflow }}.csv"}
        """
    )
    result = cli("run", path)
    assert result.exit_code == 0, result.stderr
    assert "Run 1 of summary: succeeded" in result.stdout
    assert "10 fetched, 10 delivered, 0 skipped, 0 quarantined, 0 failed" in result.stdout
    assert f"wrote 10 items to {path.parent / 'out' / 'summary.csv'}" in result.stdout
    csv_text = (path.parent / "out" / "summary.csv").read_text()
    assert csv_text.splitlines()[0] == "id,title,urgency"
    assert len(csv_text.splitlines()) == 11


def test_quarantine_skip_and_fail_each_end_an_item_once(cli, tickets: Path, write_workflow) -> None:
    path = write_workflow(
        """
        steps:
          - id: read
            uses: file.fetch
            with: {path: tickets.jsonl}
          - id: drop-low
            uses: schema.validate
            with:
              schema: {properties: {urgency: {minimum: 2}}}
              on_invalid: skip
          - id: no-fives
            uses: schema.validate
            with:
              schema: {properties: {urgency: {maximum: 4}}}
              on_invalid: quarantine
          - id: no-fours
            uses: schema.validate
            with:
              schema: {properties: {urgency: {not: {const: 4}}}}
              on_invalid: fail
          - id: write
            uses: file.deliver
            with: {path: out.jsonl}
        """
    )
    result = cli("run", path, "--json")
    assert result.exit_code == 1
    run = result.json()
    assert run["items"] == {"fetched": 10, "delivered": 4, "skipped": 2, "quarantined": 2, "failed": 2}
    assert run["status"] == "failed"
    assert run["error"].startswith("2 item(s) failed; first: invalid: ")
    shown = cli("runs", "show", str(run["id"]), "--json").json()
    assert {q["reason"] for q in shown["quarantined"]} == {"urgency: 5 is greater than the maximum of 4"}
    assert all(q["step"] == "no-fives" and q["item"]["urgency"] == 5 for q in shown["quarantined"])
    assert len(shown["ledger"]) == 10
    text = cli("runs", "show", str(run["id"]))
    assert "quarantined items (2)" in text.stdout and "greater than the maximum of 4" in text.stdout


def test_an_undefined_name_at_run_time_fails_the_item_and_the_run_goes_on(cli, tickets, write_workflow) -> None:
    path = write_workflow(
        """
        steps:
          - id: read
            uses: file.fetch
            with: {path: tickets.jsonl}
          - id: shape
            uses: template.transform
            with:
              mapping:
                id: "{{ item.id }}"
                label: "{{ item.label if item.id == 3 else item.title }}"
          - id: write
            uses: file.deliver
            with: {path: out.jsonl}
        """
    )
    result = cli("run", path, "--json")
    run = result.json()
    assert result.exit_code == 1
    assert run["items"]["failed"] == 1 and run["items"]["delivered"] == 9
    failed = cli("runs", "show", str(run["id"]), "--json").json()["failed"]
    assert failed[0]["item"]["id"] == 3
    assert "'dict object' has no attribute 'label'" in failed[0]["reason"]
    assert len((path.parent / "out.jsonl").read_text().splitlines()) == 9


def test_on_item_error_stop_fails_the_rest_with_a_reason(cli, tickets, write_workflow) -> None:
    path = write_workflow(
        """
        on_item_error: stop
        steps:
          - id: read
            uses: file.fetch
            with: {path: tickets.jsonl}
          - id: shape
            uses: template.transform
            with: {mapping: {label: "{{ item.nope }}"}}
          - id: write
            uses: file.deliver
            with: {path: out.jsonl}
        """
    )
    run = cli("run", path, "--json").json()
    assert run["status"] == "failed" and run["error_step"] == "shape"
    assert run["items"]["failed"] == 10
    ledger_adds_up(run)
    assert not (path.parent / "out.jsonl").exists()


def test_params_reach_templates_and_unknown_params_are_refused(cli, tickets, write_workflow) -> None:
    path = write_workflow(
        """
        params: {threshold: 3, label: low}
        steps:
          - id: read
            uses: file.fetch
            with: {path: tickets.jsonl}
          - id: keep
            uses: schema.validate
            with:
              schema: {properties: {urgency: {minimum: 3}}}
              on_invalid: skip
          - id: shape
            uses: template.transform
            with: {mapping: {id: "{{ item.id }}", hot: "{{ item.urgency >= params.threshold }}", tag: "{{ params.label }}"}}
          - id: write
            uses: file.deliver
            with: {path: out.jsonl}
        """
    )
    result = cli("run", path, "--param", "threshold=5", "--param", "label=high", "--json")
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in (path.parent / "out.jsonl").read_text().splitlines()]
    assert {r["tag"] for r in rows} == {"high"}
    assert sorted(r["id"] for r in rows if r["hot"]) == [4, 9]
    refused = cli("run", path, "--param", "colour=red")
    assert refused.exit_code == 1
    assert "error: unknown parameter 'colour' for workflow flow (declared: label, threshold)" in refused.stderr


def test_only_new_items_are_processed_on_the_next_run(cli, tickets: Path, write_workflow) -> None:
    path = write_workflow(
        """
        name: poll
        steps:
          - id: read
            uses: file.fetch
            with: {path: tickets.jsonl}
            key: "{{ item.id }}"
          - id: write
            uses: file.deliver
            with: {path: out.jsonl, mode: append}
        """
    )
    first = cli("run", path, "--json").json()
    assert first["items"]["delivered"] == 10
    rows = [json.loads(line) for line in tickets.read_text().splitlines()]
    rows += [{"id": 11, "title": "new", "urgency": 1}, {"id": 11, "title": "dup", "urgency": 1}]
    write_jsonl(tickets, rows)
    second = cli("run", path, "--json").json()
    assert second["items"] == {"fetched": 12, "delivered": 1, "skipped": 11, "quarantined": 0, "failed": 0}
    out = (path.parent / "out.jsonl").read_text().splitlines()
    assert len(out) == 11  # nothing delivered twice
    reasons = {i["reason"] for i in cli("runs", "show", str(second["id"]), "--json").json()["ledger"] if i["reason"]}
    assert f"already delivered (key '1', run {first['id']})" in reasons
    assert "duplicate key '11' (same as item 10)" in reasons


def test_a_fetch_that_finds_nothing_fails_the_run_clearly(cli, write_workflow) -> None:
    path = write_workflow(
        """
        defaults: {retry: {attempts: 1}}
        steps:
          - id: read
            uses: file.fetch
            with: {path: "missing/*.csv"}
        """
    )
    result = cli("run", path, "--json")
    assert result.exit_code == 1
    run = result.json()
    assert run["error_step"] == "read"
    assert "no file matches" in run["error"]
    assert run["items"]["fetched"] == 0


def test_run_exit_code_2_for_an_invalid_file(cli, write_workflow) -> None:
    path = write_workflow("steps: 3\n")
    result = cli("run", path)
    assert result.exit_code == 2
    assert f"{path}:1:8: steps: Input should be a valid list" in result.stderr
    assert cli("runs", "--json").json() == []  # nothing ran


def test_retries_with_backoff_then_success(cli, tickets, write_workflow, plugin_file) -> None:
    plugin_file(
        "flaky",
        """
        from automator import TransformStep, StepConfig, hookimpl

        class FlakyConfig(StepConfig):
            failures: int = 2

        class Flaky(TransformStep[FlakyConfig]):
            name = "test.flaky"
            calls = {}

            def transform(self, item):
                seen = Flaky.calls.get(item.seq, 0)
                Flaky.calls[item.seq] = seen + 1
                if seen < self.config.failures:
                    raise ConnectionError(f"try {seen + 1} failed")
                return {**item.data, "tries": seen + 1}

        @hookimpl
        def register_step_types(register):
            register(Flaky)
        """,
    )
    path = write_workflow(
        """
        steps:
          - id: read
            uses: file.fetch
            with: {path: tickets.jsonl}
          - id: flaky
            uses: test.flaky
            retry: {attempts: 3, backoff: 10ms, max_backoff: 20ms}
          - id: write
            uses: file.deliver
            with: {path: out.jsonl}
        """
    )
    run = cli("run", path, "--json").json()
    assert run["status"] == "succeeded"
    rows = [json.loads(line) for line in (path.parent / "out.jsonl").read_text().splitlines()]
    assert {r["tries"] for r in rows} == {3}
    step = cli("runs", "show", str(run["id"]), "--json").json()["steps"][1]
    assert step["retries"] == 20


def test_retries_run_out_and_the_item_fails_with_the_last_error(cli, tickets, write_workflow, plugin_file) -> None:
    plugin_file(
        "always_down",
        """
        from automator import TransformStep, StepConfig, hookimpl

        class Down(TransformStep[StepConfig]):
            name = "test.down"

            async def transform(self, item):
                raise ConnectionError("backend unreachable")

        @hookimpl
        def register_step_types(register):
            register(Down)
        """,
    )
    path = write_workflow(
        """
        defaults: {retry: {attempts: 2, backoff: 1ms, max_backoff: 1ms}}
        steps:
          - id: read
            uses: file.fetch
            with: {path: tickets.jsonl}
          - id: down
            uses: test.down
            concurrency: 4
        """
    )
    run = cli("run", path, "--json").json()
    assert run["items"]["failed"] == 10
    failed = cli("runs", "show", str(run["id"]), "--json").json()["failed"]
    assert {f["reason"] for f in failed} == {"ConnectionError: backend unreachable"}


def test_step_timeout_and_run_timeout(cli, tickets, write_workflow, plugin_file) -> None:
    plugin_file(
        "slow",
        """
        import asyncio
        from automator import TransformStep, StepConfig, hookimpl

        class SlowConfig(StepConfig):
            seconds: float

        class Slow(TransformStep[SlowConfig]):
            name = "test.slow"

            async def transform(self, item):
                await asyncio.sleep(self.config.seconds)
                return item.data

        @hookimpl
        def register_step_types(register):
            register(Slow)
        """,
    )
    step_timeout = write_workflow(
        """
        defaults: {retry: {attempts: 1}}
        steps:
          - id: read
            uses: file.fetch
            with: {path: tickets.jsonl}
          - id: slow
            uses: test.slow
            timeout: 50ms
            concurrency: 10
            with: {seconds: 5}
        """,
        "step-timeout.yaml",
    )
    run = cli("run", step_timeout, "--json").json()
    assert run["items"]["failed"] == 10
    reasons = {f["reason"] for f in cli("runs", "show", str(run["id"]), "--json").json()["failed"]}
    assert reasons == {"timed out after 0.05s"}

    run_timeout = write_workflow(
        """
        timeout: 300ms
        steps:
          - id: read
            uses: file.fetch
            with: {path: tickets.jsonl}
          - id: slow
            uses: test.slow
            with: {seconds: 0.1}
          - id: write
            uses: file.deliver
            with: {path: out.jsonl}
        """,
        "run-timeout.yaml",
    )
    result = cli("run", run_timeout, "--json")
    run = result.json()
    assert result.exit_code == 1
    assert run["status"] == "timed_out"
    assert run["error"] == "the run exceeded its timeout of 0.3s"
    assert run["items"]["failed"] == 10  # every item is accounted for
    ledger_adds_up(run)
    steps = cli("runs", "show", str(run["id"]), "--json").json()["steps"]
    # the step the timeout cut short ends with the run: a finished run has no running step
    assert [(s["step_id"], s["status"]) for s in steps] == [("read", "succeeded"), ("slow", "timed_out")]
    assert steps[1]["finished_at"] is not None


def test_a_broken_plugin_file_is_reported_and_the_rest_works(cli, tickets, write_workflow, plugin_file) -> None:
    plugin_file("broken", "def oops(:\n    pass\n")
    path = write_workflow(
        """
        steps:
          - id: read
            uses: file.fetch
            with: {path: tickets.jsonl}
        """
    )
    result = cli("run", path, "--json")
    assert result.exit_code == 0
    assert result.json()["items"]["delivered"] == 10
    listed = cli("plugins", "--json", "--workflows", path.parent).json()
    broken = next(p for p in listed if p["name"] == "broken")
    assert broken["source"] == "directory"
    assert broken["error"].startswith("SyntaxError: invalid syntax")
    assert "broken.py, line 1" in broken["error"]
    file_fetch = next(p for p in listed if p["name"] == "automator_standard.file_fetch")
    assert [(s["name"], s["phase"]) for s in file_fetch["steps"]] == [("file.fetch", "fetch")]
    text = cli("plugins", "--workflows", path.parent)
    assert "failed broken" in text.stdout


def test_secrets_never_reach_the_history_output_or_errors(
    cli, tickets, write_workflow, monkeypatch: pytest.MonkeyPatch, history_url: str, httpserver
) -> None:
    secret = "s3cr3t-t0ken-value-98765"
    monkeypatch.setenv("AUTOMATOR_SECRET_HOOK_TOKEN", secret)
    httpserver.expect_request("/hook").respond_with_data("nope", status=403)
    url = httpserver.url_for("/hook")
    path = write_workflow(
        f"""
        steps:
          - id: read
            uses: file.fetch
            with: {{path: tickets.jsonl}}
          - id: tag
            uses: template.transform
            with: {{mapping: {{id: "{{{{ item.id }}}}", auth: "token {{{{ secrets.HOOK_TOKEN }}}}"}}}}
          - id: post
            uses: webhook.deliver
            with:
              url: "{url}?token={{{{ secrets.HOOK_TOKEN }}}}"
              headers: {{Authorization: "Bearer {{{{ secrets.HOOK_TOKEN }}}}"}}
        """
    )
    result = cli("run", path, "--json")
    assert result.exit_code == 1
    shown = cli("runs", "show", str(result.json()["id"]), "--json")
    listed = cli("runs", "--json")
    assert "token=***" in shown.stdout  # the error names the URL, with the secret blanked out
    for text in (result.stdout, result.stderr, shown.stdout, listed.stdout):
        assert secret not in text
    if history_url.startswith("sqlite:///"):  # the file and its write-ahead log, byte by byte
        db_file = Path(history_url.removeprefix("sqlite:///"))
        for file in db_file.parent.glob("history.db*"):
            assert secret.encode() not in file.read_bytes()
    assert secret not in dump_history(history_url)
    assert httpserver.log[0][0].headers["Authorization"] == f"Bearer {secret}"  # it was really used


def test_a_missing_secret_fails_with_what_to_set(cli, tickets, write_workflow) -> None:
    path = write_workflow(
        """
        steps:
          - id: read
            uses: file.fetch
            with: {path: tickets.jsonl}
          - id: tag
            uses: template.transform
            with: {mapping: {auth: "{{ secrets.NOT_SET_ANYWHERE }}"}}
        """
    )
    run = cli("run", path, "--json").json()
    failed = cli("runs", "show", str(run["id"]), "--json").json()["failed"]
    assert failed[0]["reason"].startswith(
        "secret 'NOT_SET_ANYWHERE' is not set: export AUTOMATOR_SECRET_NOT_SET_ANYWHERE"
    )


def test_an_unwritable_history_location_is_a_clear_error(tmp_path: Path, tickets, write_workflow) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    path = write_workflow(
        """
        steps:
          - id: read
            uses: file.fetch
            with: {path: tickets.jsonl}
        """
    )
    import os

    env = {**os.environ, "AUTOMATOR_DATABASE_URL": f"sqlite:///{locked}/history.db"}
    expected = f"error: cannot write the history database {locked}/history.db: permission denied"
    try:
        if os.geteuid() == 0:
            # root may write anywhere; a path below a file is unwritable for everyone
            (tmp_path / "afile").write_text("x")
            env["AUTOMATOR_DATABASE_URL"] = f"sqlite:///{tmp_path}/afile/history.db"
            expected = f"error: cannot use the history database {tmp_path}/afile/history.db: {tmp_path}/afile is not a"
        done = run_console("run", str(path), env=env)
    finally:
        locked.chmod(0o700)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith(expected)
    assert "hint: set AUTOMATOR_DATABASE_URL or --database-url" in done.stderr


def test_runs_filters_and_limits(cli, tickets, write_workflow) -> None:
    ok = write_workflow("name: ok\nsteps:\n  - {id: read, uses: file.fetch, with: {path: tickets.jsonl}}\n", "ok.yaml")
    bad = write_workflow(
        "name: bad\ndefaults: {retry: {attempts: 1}}\nsteps:\n  - {id: read, uses: file.fetch, with: {path: none.csv}}\n",
        "bad.yaml",
    )
    for file in (ok, bad, ok):
        cli("run", file)
    assert [r["id"] for r in cli("runs", "--json").json()] == [3, 2, 1]
    assert [r["id"] for r in cli("runs", "--workflow", "ok", "--json").json()] == [3, 1]
    assert [r["id"] for r in cli("runs", "--status", "failed", "--json").json()] == [2]
    assert [r["id"] for r in cli("runs", "--limit", "1", "--json").json()] == [3]
    table = cli("runs").stdout
    assert "failed" in table and "succeeded" in table
    missing = cli("runs", "show", "99")
    assert missing.exit_code == 1 and "error: no run with id 99" in missing.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_stop_signal_ends_the_run_interrupted_with_every_item_recorded(
    signum: signal.Signals, workflow_dir: Path, history_url: str, write_workflow, httpserver
) -> None:
    arrived, release = threading.Event(), threading.Event()

    def hold(request: Request) -> Response:
        arrived.set()
        release.wait(30)  # the receiver is slow: the run is stopped meanwhile
        return Response("ok")

    httpserver.expect_request("/hook", method="POST").respond_with_handler(hold)
    write_jsonl(workflow_dir / "items.jsonl", [{"id": i} for i in range(5)])
    flow = write_workflow(
        f"""
        steps:
          - id: read
            uses: file.fetch
            with: {{path: items.jsonl}}
            key: "{{{{ item.id }}}}"
          - id: post
            uses: webhook.deliver
            concurrency: 1
            with: {{url: "{httpserver.url_for("/hook")}"}}
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "automator.cli.main", "run", str(flow)],
        env={**os.environ, "AUTOMATOR_DATABASE_URL": history_url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert arrived.wait(30), "the run never reached the receiver"
        process.send_signal(signum)
        _out, err = process.communicate(timeout=30)
    finally:
        release.set()
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 128 + signum, err
    assert "Traceback" not in err
    assert f"interrupted by {signum.name}: the run is recorded as interrupted; see: automator runs show 1" in err
    assert history_rows(history_url, "select status, fetched, failed from runs") == [("interrupted", 5, 5)]
    outcomes = history_rows(history_url, "select outcome, reason from items order by seq")
    steps = history_rows(history_url, "select step_id, status from step_attempts order by id")
    assert outcomes == [("failed", "not processed: the run was interrupted")] * 5
    assert steps == [("read", "succeeded"), ("post", "interrupted")]  # no step left running either


def test_runs_filters_refuse_what_no_run_can_match(cli, tickets, write_workflow) -> None:
    cli("run", write_workflow("name: ok\nsteps:\n  - {id: read, uses: file.fetch, with: {path: tickets.jsonl}}\n"))
    unknown = cli("runs", "--status", "nosuch")
    assert unknown.exit_code == 2
    assert "'nosuch' is not one of 'running', 'succeeded', 'failed', 'timed_out', 'interrupted'" in unknown.stderr
    for limit in ("0", "-1"):
        bad = cli("runs", "--limit", limit)
        assert bad.exit_code == 2 and "is not in the range 1<=x<=10000" in bad.stderr
    # a filter that matches nothing says so (not "no runs recorded yet")
    assert cli("runs", "--status", "crashed").stdout.strip() == "No runs with status crashed."
    assert cli("runs", "--workflow", "other").stdout.strip() == "No runs of workflow 'other'."


def test_runs_show_lists_problem_items_in_order_and_items_lists_all(cli, workflow_dir: Path, write_workflow) -> None:
    write_jsonl(workflow_dir / "many.jsonl", [{"id": i, "n": i % 3} for i in range(120)])
    path = write_workflow(
        """
        steps:
          - id: read
            uses: file.fetch
            with: {path: many.jsonl}
          - id: check
            uses: schema.validate
            concurrency: 8
            with:
              schema: {properties: {n: {maximum: 0}}}
              on_invalid: quarantine
        """
    )
    run = cli("run", path, "--json").json()
    assert run["items"]["quarantined"] == 80
    quarantined = [i for i in range(120) if i % 3]

    shown = cli("runs", "show", str(run["id"])).stdout
    listed = [int(line.split()[0][1:]) for line in shown.splitlines() if line.startswith("  #")]
    assert listed == quarantined[:50]  # in ledger order
    assert (
        f"showing the first 50 of 80 quarantined items; all of them: automator runs show {run['id']} --items" in shown
    )

    every = cli("runs", "show", str(run["id"]), "--items").stdout
    listed = [int(line.split()[0][1:]) for line in every.splitlines() if line.startswith("  #")]
    assert listed == list(range(120))  # --items means all of them
    assert "showing the first" not in every and "more" not in every

    as_json = cli("runs", "show", str(run["id"]), "--json").json()
    assert [i["seq"] for i in as_json["quarantined"]] == quarantined
