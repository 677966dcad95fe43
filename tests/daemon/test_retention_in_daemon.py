"""Retention inside the running daemon: old history is pruned on its own, while schedules keep time."""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta
from pathlib import Path

import httpx
from sqlalchemy import func, insert, select

from automator.history.models import LedgerItem, Run
from automator.history.store import History, now
from tests.daemon.conftest import DaemonProcess, wait_for
from tests.daemon.test_schedules import TICK, metric_samples, runs_of

# 30 batches of 200 with a 0.05 s pause after each: pruning takes over 1.5 s, so a
# one-second schedule fires while it is under way
OLD_RUNS = 6000


def insert_old_history(history: History) -> tuple[int, int]:
    """Thousands of finished runs from 40 days ago (bulk inserted), one of them with a delivered key.

    Returns the ids of the run that delivered a key and of a recent run.
    """
    long_ago = now() - timedelta(days=40)
    base = {
        "workflow": "old",
        "workflow_version": "v0",
        "workflow_path": None,
        "trigger": "schedule",
        "status": "succeeded",
        "started_at": long_ago,
        "finished_at": long_ago,
        "fetched": 2,
        "skipped": 2,
    }
    with history.engine.begin() as conn:
        conn.execute(insert(Run), [base] * OLD_RUNS)
        ids = list(conn.scalars(select(Run.id).where(Run.workflow == "old").order_by(Run.id)))
        items = [
            {"run_id": run_id, "workflow": "old", "seq": seq, "key": None, "fetched_by": "read", "outcome": "skipped"}
            | {"data": {"body": "x" * 100}, "updated_at": long_ago}
            for run_id in ids
            for seq in range(2)
        ]
        conn.execute(insert(LedgerItem), items)
        keeper = ids[0]
        conn.execute(
            insert(LedgerItem),
            [
                {"run_id": keeper, "workflow": "old", "seq": 2, "key": "k-old", "fetched_by": "read"}
                | {"outcome": "delivered", "data": {"body": "sent"}, "updated_at": long_ago}
            ],
        )
        recent = conn.execute(
            insert(Run).values({**base, "started_at": now() - timedelta(days=2), "finished_at": now()})
        ).inserted_primary_key[0]
    return keeper, int(recent)


def log_time(daemon: DaemonProcess, message: str) -> datetime:
    line = next(line for line in daemon.logs() if line["message"].startswith(message))
    return datetime.fromisoformat(line["time"])


def test_a_running_daemon_prunes_old_runs_without_delaying_schedules(
    workflows: Path, write, start_daemon, read_history: History
) -> None:
    keeper, recent = insert_old_history(read_history)
    (workflows / "items.jsonl").write_text('{"id": 1}\n')
    write("tick.yaml", TICK.format(name="tick"))
    daemon = start_daemon("--keep", "30d", "--prune-every", "1s")

    def old_runs() -> int:
        with read_history.engine.connect() as conn:
            return int(conn.scalar(select(func.count()).select_from(Run).where(Run.workflow == "old")) or 0)

    wait_for(lambda: old_runs() == 2, 60, "the old runs to be pruned")
    pruned = wait_for(
        lambda: metric_samples(httpx.get(f"{daemon.base}/metrics", timeout=5).text).get(
            ("automator_retention_pruned_runs_total", ())
        ),
        10,
        "the pruned-runs counter",
    )
    assert pruned == OLD_RUNS - 1
    assert any("retention: removed" in line["message"] for line in daemon.logs())
    # what was kept: the recent run, and the old run only for the key it delivered (its data emptied)
    assert read_history.get_run(recent) is not None
    assert read_history.delivered_keys("old", ["k-old"]) == {"k-old": keeper}
    assert [(i.key, i.data) for i in read_history.items(keeper)] == [("k-old", {})]
    # the daemon's own fresh runs are not touched, and the schedule kept time while pruning ran
    wait_for(lambda: len(runs_of(read_history, "tick", "succeeded")) >= 4, 15, "scheduled runs")
    ticks = sorted(runs_of(read_history, "tick"), key=lambda r: r.scheduled_for)
    assert {r.status for r in ticks} <= {"succeeded", "running"}
    for run in ticks:
        assert run.started_at - run.scheduled_for < timedelta(seconds=1)
    gaps = [b.scheduled_for - a.scheduled_for for a, b in itertools.pairwise(ticks)]
    assert all(gap == timedelta(seconds=1) for gap in gaps), gaps
    # ... including fires that came while the pruning was under way
    began = log_time(daemon, "retention: pruning runs")
    ended = log_time(daemon, "retention: removed")
    assert ended - began >= timedelta(seconds=1.4)
    during = [r for r in ticks if began <= r.scheduled_for <= ended]
    assert during, (began, ended, [r.scheduled_for for r in ticks])
    assert daemon.stop() == 0
