"""The daemon as ops teams run it: schedules fire, runs are recorded, /metrics and /healthz answer."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from automator.history.store import History
from tests.daemon.conftest import Receiver, wait_for

TICK = """
name: {name}
schedule:
  every: 1s
steps:
  - id: read
    uses: file.fetch
    with: {{path: items.jsonl}}
  - id: out
    uses: file.deliver
    with: {{path: {name}.jsonl, mode: append}}
"""


def runs_of(history: History, workflow: str, status: str | None = None) -> list:
    return history.list_runs(workflow=workflow, status=status, limit=1000)


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_every_second_runs_and_is_watched(workflows: Path, write, start_daemon, read_history: History) -> None:
    (workflows / "items.jsonl").write_text('{"id": 1}\n{"id": 2}\n')
    write("tick.yaml", TICK.format(name="tick"))
    daemon = start_daemon()

    found = wait_for(lambda: len(runs_of(read_history, "tick", "succeeded")) >= 3, 10, "three scheduled runs")
    assert found
    runs = runs_of(read_history, "tick", "succeeded")
    assert {r.trigger for r in runs} == {"schedule"}
    for run in runs:
        assert run.scheduled_for is not None
        # a fire starts promptly: well under a second after its scheduled time
        assert timedelta(0) <= run.started_at - run.scheduled_for < timedelta(seconds=1)
        assert run.delivered == 2
    # one second apart, not drifting
    times = sorted(r.scheduled_for for r in runs)
    assert all(abs((b - a).total_seconds() - 1) < 0.01 for a, b in itertools.pairwise(times))

    health = httpx.get(f"{daemon.base}/healthz")
    assert health.status_code == 200
    assert health.json()["scheduler"] == "running"
    assert health.json()["database"] == "ok"

    samples = metric_samples(httpx.get(f"{daemon.base}/metrics").text)
    assert samples[("automator_runs_total", (("status", "succeeded"), ("workflow", "tick")))] >= 3
    assert samples[("automator_items_total", (("outcome", "delivered"), ("workflow", "tick")))] >= 6
    assert samples[("automator_schedule_lag_seconds_count", (("workflow", "tick"),))] >= 3
    assert samples[("automator_workflows", ())] == 1
    assert samples[("automator_daemon_up", ())] == 1
    assert (
        "automator_step_duration_seconds_count",
        (("status", "succeeded"), ("step", "read"), ("workflow", "tick")),
    ) in samples
    assert samples[("process_resident_memory_bytes", ())] > 0

    assert daemon.stop(signal.SIGTERM) == 0
    logs = daemon.logs()
    assert all(line.get("level") != "raw" for line in logs), "every log line is JSON"
    assert any(line["message"] == "daemon stopped" for line in logs)


def test_manual_trigger_reaches_the_running_daemon(
    workflows: Path, write, start_daemon, read_history: History, history_url: str
) -> None:
    (workflows / "items.jsonl").write_text('{"id": 1}\n')
    write(
        "manual.yaml",
        """
        name: manual
        params: {label: none}
        steps:
          - id: read
            uses: file.fetch
            with: {path: items.jsonl}
          - id: shape
            uses: template.transform
            with: {mapping: {label: "{{ params.label }}"}}
          - id: out
            uses: file.deliver
            with: {path: manual.jsonl, mode: append}
        """,
    )
    start_daemon()

    def trigger(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "automator.cli.main", "trigger", *args],
            capture_output=True,
            text=True,
            env={"AUTOMATOR_DATABASE_URL": history_url, "PATH": "/usr/bin:/bin"},
            timeout=30,
            check=False,
        )

    done = trigger("manual", "--param", "label=urgent", "--json")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["status"] == "started"
    run = wait_for(lambda: (r := read_history.get_run(answer["run_id"])) and r.finished_at and r, 10, "the run")
    assert run.trigger == "manual"
    assert run.status == "succeeded"
    assert run.params == {"label": "urgent"}
    assert json.loads((workflows / "manual.jsonl").read_text().splitlines()[0]) == {"label": "urgent"}

    unknown = trigger("manual", "--param", "colour=red")
    assert unknown.returncode == 1
    assert "unknown parameter 'colour'" in unknown.stderr
    assert "Traceback" not in unknown.stderr


def test_a_slow_workflow_does_not_delay_another(
    workflows: Path, write, start_daemon, read_history: History, http_server
) -> None:
    slow = Receiver(http_server, hold=True)  # the slow run stays running until released
    (workflows / "items.jsonl").write_text('{"id": 1}\n')
    write("fast.yaml", TICK.format(name="fast"))
    write(
        "slow.yaml",
        f"""
        name: slow
        schedule: {{every: 1s}}
        on_overlap: skip
        steps:
          - id: read
            uses: file.fetch
            with: {{path: items.jsonl}}
          - id: post
            uses: webhook.deliver
            with: {{url: "{slow.url}"}}
        """,
    )
    start_daemon()
    wait_for(lambda: len(runs_of(read_history, "fast", "succeeded")) >= 4, 10, "four fast runs")
    wait_for(lambda: runs_of(read_history, "slow", "skipped"), 5, "a skipped slow fire")

    fast = runs_of(read_history, "fast", "succeeded")
    assert max((r.started_at - r.scheduled_for).total_seconds() for r in fast) < 0.5
    skipped = runs_of(read_history, "slow", "skipped")
    assert all(r.scheduled_for is not None and "max_active_runs" in (r.error or "") for r in skipped)
    assert len(runs_of(read_history, "slow", "running")) == 1  # one at a time
    slow.release.set()


def test_check_validates_the_folder(workflows: Path, write, history_url: str) -> None:
    (workflows / "items.jsonl").write_text("")
    write("tick.yaml", TICK.format(name="tick"))
    command = [sys.executable, "-m", "automator.cli.main", "daemon", "--workflows", str(workflows), "--check"]
    ok = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    assert ok.returncode == 0, ok.stderr
    assert "1 workflow file(s) valid, 1 with a schedule" in ok.stdout

    write("bad.yaml", "name: bad\nschedule: {cron: '61 * * * *'}\nsteps: []\n")
    bad = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    assert bad.returncode == 1
    assert f"{workflows / 'bad.yaml'}:2:" in bad.stderr
    assert "Traceback" not in bad.stderr
