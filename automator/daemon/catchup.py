"""Fires missed while the daemon was down, and what ``catch_up:`` makes of them."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from automator.daemon.triggers import local_at, schedule_trigger
from automator.spec.models import Schedule

# ``catch_up: all`` runs at most this many of the latest missed fires; months of a
# one-minute schedule must not turn into a flood of runs at start-up
CATCH_UP_LIMIT = 50
# and the daemon looks back at most this far (a year of a 1-minute cron is 525,600 fires)
LOOK_BACK = timedelta(days=366)


@dataclass
class CatchUp:
    missed: int  # how many fires were missed in all
    run: list[datetime] = field(default_factory=list)  # the ones to run now, oldest first


def missed_fires(schedule: Schedule, since: datetime, now: datetime, limit: int) -> tuple[int, list[datetime]]:
    """The count of fires in (since, now] and the latest ``limit`` of them, oldest first."""
    since = max(since, now - LOOK_BACK)
    if schedule.at is not None:
        at = local_at(schedule)
        return (1, [at]) if since < at <= now else (0, [])
    if schedule.every is not None:
        step = schedule.every.total_seconds()
        count = int((now - since).total_seconds() // step)
        first_kept = max(1, count - limit + 1)
        return count, [since + timedelta(seconds=step * k) for k in range(first_kept, count + 1)]
    trigger = schedule_trigger(schedule, jitter=False)
    latest: deque[datetime] = deque(maxlen=limit)
    count = 0
    fire = trigger.get_next_fire_time(None, since + timedelta(microseconds=1))
    while fire is not None and fire <= now:
        count += 1
        latest.append(fire)
        fire = trigger.get_next_fire_time(fire, fire.astimezone(UTC) + timedelta(microseconds=1))
    return count, list(latest)


def plan(schedule: Schedule, since: datetime, now: datetime) -> CatchUp:
    """Which missed fires to run, per the schedule's ``catch_up`` (none, latest, all)."""
    limit = {"none": 1, "latest": 1, "all": CATCH_UP_LIMIT}[schedule.catch_up]
    count, latest = missed_fires(schedule, since, now, limit)
    return CatchUp(missed=count, run=[] if schedule.catch_up == "none" else latest)
