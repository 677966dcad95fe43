"""A second SIGTERM stops the daemon at once, mid-run; the next start recovers the runs it left."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from pathlib import Path

from automator.history.daemon_store import DaemonStore
from automator.history.store import History
from tests.daemon.conftest import Receiver, wait_for
from tests.daemon.test_recovery import POSTING, trigger

ITEMS = 20


def ledger_adds_up(history: History, run_id: int) -> None:
    """Every item ended in exactly one outcome, and the run's counts are the ledger's."""
    run = history.get_run(run_id)
    items = history.items(run_id)
    assert len(items) == ITEMS
    assert len({i.seq for i in items}) == ITEMS
    outcomes = Counter(i.outcome for i in items)
    assert "pending" not in outcomes
    assert run.fetched == ITEMS
    assert (run.delivered, run.skipped, run.quarantined, run.failed) == (
        outcomes["delivered"],
        outcomes["skipped"],
        outcomes["quarantined"],
        outcomes["failed"],
    )
    assert sum(outcomes.values()) == ITEMS


def test_second_sigterm_stops_at_once_and_the_runs_are_recovered(
    workflows: Path, write, start_daemon, read_history: History, history_url: str, http_server
) -> None:
    receiver = Receiver(http_server, delay=0.3)
    (workflows / "items.jsonl").write_text("".join(json.dumps({"id": i}) + "\n" for i in range(1, ITEMS + 1)))
    write("resumes.yaml", POSTING.format(name="resumes", on_crash="resume", url=receiver.url))
    write("fails.yaml", POSTING.format(name="fails", on_crash="fail", url=receiver.url))
    daemon = start_daemon("--grace", "60s")
    resumed_id = trigger(history_url, "resumes")
    failed_id = trigger(history_url, "fails")

    def sent(workflow: str) -> int:
        return sum(1 for _, body in list(receiver.requests) if body and body["workflow"] == workflow)

    wait_for(lambda: sent("resumes") >= 2 and sent("fails") >= 2, 15, "both runs to be delivering")
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: any("stopping; running runs get" in line["message"] for line in daemon.logs()), 10, "1st signal")
    # the runs go on within the 60 s grace period ...
    assert daemon.proc.poll() is None
    stopped = time.monotonic()
    # ... until the second signal: the daemon ends at once, with the documented exit code
    assert daemon.stop(signal.SIGTERM, timeout=10) == 1
    assert time.monotonic() - stopped < 5
    assert any("stopping now" in line["message"] for line in daemon.logs())
    # nothing was closed under the run threads: both runs wait for crash recovery
    assert read_history.get_run(resumed_id).status == "running"
    assert read_history.get_run(failed_id).status == "running"
    assert sent("resumes") < ITEMS and sent("fails") < ITEMS
    receiver.wait_idle()  # a request in flight at the exit still reaches the receiver
    sent_fails = sent("fails")

    start_daemon()
    resumed = wait_for(
        lambda: (r := read_history.get_run(resumed_id)) and r.status not in ("running", "crashed") and r, 30, "resume"
    )
    assert resumed.status == "succeeded", resumed.error
    ledger_adds_up(read_history, resumed_id)
    assert resumed.delivered == ITEMS
    # every item reached the receiver; a repeat (only one in flight at the exit) had the same key
    keys = [key for key, body in list(receiver.requests) if body["workflow"] == "resumes"]
    assert len(set(keys)) == ITEMS
    assert len(keys) - len(set(keys)) <= 1
    store = DaemonStore(read_history)
    assert [action for action, _ in store.recoveries(resumed_id)] == ["detected", "resumed"]

    failed = wait_for(
        lambda: (r := read_history.get_run(failed_id)) and r.status != "running" and r, 15, "the failed run"
    )
    assert failed.status == "crashed"
    assert "on_crash is fail" in failed.error
    ledger_adds_up(read_history, failed_id)
    assert failed.delivered + failed.failed == ITEMS
    assert failed.failed >= 1
    assert [action for action, _ in store.recoveries(failed_id)] == ["detected", "failed"]
    assert sent("fails") == sent_fails  # nothing more was sent for the failed run
    # no run of either workflow is left `running`
    assert read_history.list_runs(status="running", limit=100) == []
