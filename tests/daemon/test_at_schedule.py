"""``at:`` runs once, at a local time in the workflow's time zone, and not again after a restart."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from automator.history.store import History
from tests.daemon.conftest import wait_for

BERLIN = ZoneInfo("Europe/Berlin")

ONCE = """
name: once
schedule:
  at: {at}
  timezone: Europe/Berlin
  catch_up: all
steps:
  - id: read
    uses: file.fetch
    with: {{path: items.jsonl}}
"""


def test_at_fires_once_in_berlin_time_and_not_after_a_restart(
    workflows: Path, write, start_daemon, read_history: History
) -> None:
    (workflows / "items.jsonl").write_text('{"id": 1}\n')
    daemon = start_daemon()
    # a few seconds ahead, written as Berlin wall-clock time without an offset; the
    # running daemon picks the new file up (hot reload) well before that
    at = (datetime.now(BERLIN) + timedelta(seconds=5)).replace(microsecond=0)
    write("once.yaml", ONCE.format(at=at.replace(tzinfo=None).isoformat()))
    wait_for(lambda: any(line.get("workflow") == "once" for line in daemon.logs()), 10, "the file to be loaded")
    assert read_history.list_runs(workflow="once") == []  # not before its time

    run = wait_for(lambda: read_history.list_runs(workflow="once"), 20, "the `at:` run")[0]
    assert run.trigger == "schedule"
    assert run.status in ("running", "succeeded")
    # the Berlin wall-clock time, not the same digits in UTC (which would be an hour or two off)
    assert run.scheduled_for == at.astimezone(UTC)
    assert timedelta(0) <= run.started_at - run.scheduled_for < timedelta(seconds=2)
    wait_for(lambda: read_history.get_run(run.id).status == "succeeded", 10, "the run to finish")

    # a few housekeeping rounds later it has not fired again
    daemon.wait_rounds(3, "three housekeeping rounds")
    assert len(read_history.list_runs(workflow="once", limit=10)) == 1

    # after a restart: the fire is known as handled, so neither the schedule nor catch_up runs it again
    assert daemon.stop() == 0
    seen = len(daemon.logs())
    restarted = start_daemon()
    wait_for(
        lambda: any("`at:` time has passed" in line["message"] for line in restarted.logs()[seen:]),
        10,
        "the restarted daemon to see the `at:` time passed",
    )
    restarted.wait_rounds(3, "three housekeeping rounds: enough for a wrongly dispatched catch-up to show")
    runs = read_history.list_runs(workflow="once", limit=10)
    assert [r.id for r in runs] == [run.id]
    assert restarted.stop() == 0
