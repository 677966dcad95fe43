"""A workflow's schedule as an APScheduler 3 trigger, in the workflow's time zone.

Cron comes from :func:`automator.spec.cron.cron_trigger` (standard weekday numbers,
day-of-month OR day-of-week); here it gets cron's rule for the autumn DST change: a
job at a fixed hour runs once when that hour happens twice, while a job whose hour
field is ``*`` runs in both (as in Vixie cron and cronie).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from automator.spec.cron import cron_trigger, split_cron
from automator.spec.models import Schedule


class CronSchedule(BaseTrigger):
    """Standard cron in a time zone, firing once for a fixed-hour time the clocks repeat."""

    def __init__(self, expression: str, timezone: tzinfo) -> None:
        self.expression = expression
        self.timezone = timezone
        self._inner = cron_trigger(expression, timezone)
        self._fixed_hour = split_cron(expression)[1] != "*"
        self.jitter: int | None = None

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> datetime | None:
        fire = self._inner.get_next_fire_time(previous_fire_time, now)
        while fire is not None and self._fixed_hour and _repeated_wall_time(fire, self.timezone):
            # step in UTC: wall-clock arithmetic on an aware datetime would stay in the repeat
            fire = self._inner.get_next_fire_time(fire, fire.astimezone(UTC) + timedelta(seconds=1))
        return self._apply_jitter(fire, self.jitter, now) if fire is not None and self.jitter else fire

    def __str__(self) -> str:
        return f"cron[{self.expression}]"


def _repeated_wall_time(moment: datetime, zone: tzinfo) -> bool:
    """Whether ``moment`` is the second occurrence of its local time (clocks went back)."""
    wall = moment.astimezone(zone).replace(tzinfo=None)
    first = wall.replace(tzinfo=zone, fold=0)
    return first.astimezone(UTC) < moment.astimezone(UTC)


def zone(schedule: Schedule) -> ZoneInfo:
    return ZoneInfo(schedule.timezone)


def local_at(schedule: Schedule) -> datetime:
    """The ``at:`` time, aware: a naive value is local time in the schedule's zone."""
    assert schedule.at is not None
    at = schedule.at
    return at.replace(tzinfo=zone(schedule)) if at.tzinfo is None else at


def schedule_trigger(schedule: Schedule, *, anchor: datetime | None = None, jitter: bool = True) -> BaseTrigger:
    """The trigger for ``schedule``; intervals count from ``anchor`` (the last fire) when given."""
    tz = zone(schedule)
    trigger: BaseTrigger
    if schedule.cron is not None:
        trigger = CronSchedule(schedule.cron, tz)
    elif schedule.every is not None:
        seconds = schedule.every.total_seconds()
        # anchored on the last fire, a restart keeps the cadence instead of starting over
        start = anchor + schedule.every if anchor is not None else datetime.now(UTC) + schedule.every
        trigger = IntervalTrigger(seconds=seconds, start_date=start, timezone=tz)
    else:
        trigger = DateTrigger(run_date=local_at(schedule), timezone=tz)
    if jitter and schedule.jitter is not None:
        trigger.jitter = int(schedule.jitter.total_seconds()) or None
    return trigger


def describe(schedule: Schedule) -> str:
    """The schedule as written, one line (kept in the schedule state, shown in logs)."""
    if schedule.cron is not None:
        what = f"cron {schedule.cron}"
    elif schedule.every is not None:
        what = f"every {schedule.every.total_seconds():g}s"
    else:
        what = f"at {local_at(schedule).isoformat()}"
    return f"{what} ({schedule.timezone}, catch_up {schedule.catch_up})"
