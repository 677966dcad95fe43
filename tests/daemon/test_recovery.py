"""Stopping the daemon: SIGTERM mid-run (grace, then interrupted), kill -9 mid-run (crashed,
then resumed or failed per on_crash, nothing delivered twice), catch-up after downtime."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from automator.history.daemon_store import DaemonStore
from automator.history.store import History
from tests.daemon.conftest import Receiver, wait_for

POSTING = """
name: {name}
on_crash: {on_crash}
steps:
  - id: read
    uses: file.fetch
    with: {{path: items.jsonl}}
    key: "{{{{ item.id }}}}"
  - id: post
    uses: webhook.deliver
    concurrency: 1
    with: {{url: "{url}", body: {{id: "{{{{ item.id }}}}", workflow: {name}}}}}
"""


def trigger(history_url: str, name: str) -> int:
    done = subprocess.run(
        [sys.executable, "-m", "automator.cli.main", "trigger", name, "--json"],
        capture_output=True,
        text=True,
        env={"AUTOMATOR_DATABASE_URL": history_url, "PATH": "/usr/bin:/bin"},
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return int(json.loads(done.stdout)["run_id"])


def test_kill_9_mid_run_then_restart_resumes_or_fails(
    workflows: Path, write, start_daemon, read_history: History, history_url: str, http_server
) -> None:
    receiver = Receiver(http_server, delay=0.3)
    (workflows / "items.jsonl").write_text("".join(json.dumps({"id": i}) + "\n" for i in range(1, 13)))
    write("resumes.yaml", POSTING.format(name="resumes", on_crash="resume", url=receiver.url))
    notice = f"""
on_failure:
  - id: tell
    uses: webhook.deliver
    with: {{url: "{receiver.url}", body: {{id: "{{{{ run.id }}}}", workflow: notice, error: "{{{{ run.error }}}}"}}}}
"""
    write("fails.yaml", POSTING.format(name="fails", on_crash="fail", url=receiver.url) + notice)
    daemon = start_daemon()
    resumed_id = trigger(history_url, "resumes")
    failed_id = trigger(history_url, "fails")

    def sent(workflow: str) -> int:
        return sum(1 for _, body in list(receiver.requests) if body and body["workflow"] == workflow)

    wait_for(lambda: sent("resumes") >= 3 and sent("fails") >= 2, 15, "some deliveries of both runs")
    daemon.kill()  # kill -9: no chance to write anything
    assert read_history.get_run(resumed_id).status == "running"
    assert read_history.get_run(failed_id).status == "running"
    receiver.wait_idle()  # a request in flight at the kill still reaches the receiver
    sent_before = {"fails": sent("fails")}

    start_daemon()
    resumed = wait_for(
        lambda: (r := read_history.get_run(resumed_id)) and r.status not in ("running", "crashed") and r, 20, "resume"
    )
    # the same run, finished: every item delivered exactly once in the ledger
    assert resumed.status == "succeeded", resumed.error
    items = read_history.items(resumed_id)
    assert [i.outcome for i in items] == ["delivered"] * 12
    assert len({i.seq for i in items}) == 12
    # the receiver got every item; repeats carried the same idempotency key, so none applied twice
    resumes_keys = [key for key, body in receiver.requests if body["workflow"] == "resumes"]
    assert len(set(resumes_keys)) == 12
    assert {body["id"] for key, body in receiver.applied.items() if body["workflow"] == "resumes"} == {
        i for i in range(1, 13)
    }
    store = DaemonStore(read_history)
    assert [action for action, _ in store.recoveries(resumed_id)] == ["detected", "resumed"]

    failed = wait_for(
        lambda: (r := read_history.get_run(failed_id)) and r.status != "running" and r, 10, "the failed run"
    )
    assert failed.status == "crashed"
    assert "on_crash is fail" in failed.error
    outcomes = [i.outcome for i in read_history.items(failed_id)]
    assert "pending" not in outcomes  # every item ended in one outcome
    assert outcomes.count("failed") >= 1
    assert all("not processed" in (i.reason or "") for i in read_history.items(failed_id) if i.outcome == "failed")
    receiver.wait_idle()
    assert sent("fails") == sent_before["fails"]  # nothing more was sent for the failed run
    # ... but someone was told, as for any failed run
    notices = wait_for(lambda: [b for _, b in list(receiver.requests) if b["workflow"] == "notice"], 10, "notice")
    assert len(notices) == 1
    assert notices[0]["id"] == failed_id
    assert "on_crash is fail" in notices[0]["error"]


def test_sigterm_lets_runs_finish_within_grace_then_interrupts(
    workflows: Path, write, start_daemon, read_history: History, history_url: str, http_server
) -> None:
    receiver = Receiver(http_server, delay=0.3)
    (workflows / "items.jsonl").write_text("".join(json.dumps({"id": i}) + "\n" for i in range(1, 21)))
    write("long.yaml", POSTING.format(name="long", on_crash="resume", url=receiver.url))
    daemon = start_daemon("--grace", "1s")
    run_id = trigger(history_url, "long")
    wait_for(lambda: receiver.count() >= 1, 10, "the run to be delivering")
    started = time.monotonic()
    assert daemon.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 6  # the grace period, not the 10 s the run would take
    run = read_history.get_run(run_id)
    assert run.status == "interrupted"
    outcomes = [i.outcome for i in read_history.items(run_id)]
    assert "pending" not in outcomes
    assert outcomes.count("failed") == 20 - outcomes.count("delivered")


def test_sigterm_waits_for_a_short_run(
    workflows: Path, write, start_daemon, read_history: History, history_url: str, http_server
) -> None:
    receiver = Receiver(http_server, delay=0.3)
    (workflows / "items.jsonl").write_text("".join(json.dumps({"id": i}) + "\n" for i in range(1, 5)))
    write("short.yaml", POSTING.format(name="short", on_crash="resume", url=receiver.url))
    daemon = start_daemon("--grace", "10s")
    run_id = trigger(history_url, "short")
    wait_for(lambda: receiver.count() >= 1, 10, "the run to be delivering")
    assert daemon.stop(signal.SIGTERM) == 0
    run = read_history.get_run(run_id)
    assert run.status == "succeeded"
    assert run.delivered == 4


def test_catch_up_after_downtime(workflows: Path, write, start_daemon, read_history: History) -> None:
    (workflows / "items.jsonl").write_text('{"id": 1}\n')
    for policy in ("none", "latest", "all"):
        write(
            f"{policy}.yaml",
            f"""
            name: catch-{policy}
            schedule: {{every: 1s, catch_up: {policy}}}
            steps:
              - id: read
                uses: file.fetch
                with: {{path: items.jsonl}}
            """,
        )
    daemon = start_daemon()
    wait_for(
        lambda: all(read_history.list_runs(workflow=f"catch-{p}") for p in ("none", "latest", "all")),
        10,
        "a run of each",
    )
    assert daemon.stop() == 0
    stopped_at = max(r.scheduled_for for r in read_history.list_runs(limit=100))
    # downtime across three fires of `every: 1s`: missing fires takes wall-clock time, not an event
    time.sleep(3.2)
    restarted = datetime.now(UTC)
    start_daemon()

    def live_again() -> bool:
        # a scheduled run that started after the restart: catch-up is decided before that
        newest = read_history.list_runs(workflow="catch-latest", limit=1)[0]
        return newest.trigger == "schedule" and newest.started_at > restarted

    wait_for(live_again, 10, "live")

    def catch_ups(policy: str) -> list:
        runs = read_history.list_runs(workflow=f"catch-{policy}", limit=100)
        return sorted((r for r in runs if r.trigger == "catch_up"), key=lambda r: r.scheduled_for)

    assert catch_ups("none") == []
    latest = catch_ups("latest")
    assert len(latest) == 1
    every = catch_ups("all")
    assert len(every) >= 3  # one per missed second
    assert all(r.scheduled_for > stopped_at for r in every)
    # the newest fire missed: each workflow's catch-up is planned in turn, so `latest`'s may be
    # planned a moment after `all`'s (seconds, on a loaded machine), never before it
    assert every[-1].scheduled_for - timedelta(seconds=1) < latest[0].scheduled_for <= latest[0].started_at
    finished = wait_for(
        lambda: (done := catch_ups("all") + catch_ups("latest")) and all(r.status != "running" for r in done) and done,
        10,
        "the catch-up runs to finish",
    )
    assert all(r.status == "succeeded" for r in finished)
