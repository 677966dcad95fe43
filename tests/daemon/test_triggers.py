"""Trigger computation, tested directly: standard cron across Berlin's DST changes, catch-up plans."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from automator.daemon.catchup import CATCH_UP_LIMIT, plan
from automator.daemon.triggers import schedule_trigger
from automator.spec.models import Schedule

BERLIN = ZoneInfo("Europe/Berlin")


def fires(schedule: Schedule, start: datetime, count: int) -> list[datetime]:
    trigger = schedule_trigger(schedule)
    found: list[datetime] = []
    previous, now = None, start
    for _ in range(count):
        fire = trigger.get_next_fire_time(previous, now)
        assert fire is not None
        found.append(fire)
        previous, now = fire, fire.astimezone(UTC)
    return found


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_daily_cron_on_the_autumn_change_runs_once() -> None:
    # 2026-10-25: 03:00 CEST becomes 02:00 CET, so 02:30 happens twice; cron runs it once
    found = fires(Schedule(cron="30 2 * * *", timezone="Europe/Berlin"), datetime(2026, 10, 24, 12, tzinfo=BERLIN), 3)
    assert [f.astimezone(UTC) for f in found] == [
        utc(2026, 10, 25, 0, 30),
        utc(2026, 10, 26, 1, 30),
        utc(2026, 10, 27, 1, 30),
    ]


def test_daily_cron_on_the_spring_change_runs_once() -> None:
    # 2026-03-29: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist and runs once, that morning
    found = fires(Schedule(cron="30 2 * * *", timezone="Europe/Berlin"), datetime(2026, 3, 28, 12, tzinfo=BERLIN), 2)
    assert found[0].astimezone(UTC) == utc(2026, 3, 29, 1, 30)
    assert found[1].astimezone(UTC) == utc(2026, 3, 30, 0, 30)  # 02:30 CEST from then on


def test_nine_o_clock_stays_nine_o_clock_local() -> None:
    found = fires(
        Schedule(cron="0 9 * * mon-fri", timezone="Europe/Berlin"), datetime(2026, 3, 26, 12, tzinfo=BERLIN), 3
    )
    assert [f.astimezone(BERLIN).hour for f in found] == [9, 9, 9]
    assert [f.astimezone(UTC).hour for f in found] == [8, 7, 7]  # Fri 27 (CET), Mon 30 and Tue 31 (CEST)


def test_half_hourly_cron_runs_in_both_repeated_hours() -> None:
    found = fires(
        Schedule(cron="*/30 * * * *", timezone="Europe/Berlin"), datetime(2026, 10, 25, 1, 50, tzinfo=BERLIN), 5
    )
    assert [f.astimezone(UTC) for f in found] == [utc(2026, 10, 25, 0, 0) + timedelta(minutes=30 * i) for i in range(5)]


def test_sunday_is_zero_and_seven() -> None:
    for day in ("0", "7", "sun"):
        found = fires(Schedule(cron=f"0 12 * * {day}"), datetime(2026, 11, 25, tzinfo=UTC), 2)
        assert [f.weekday() for f in found] == [6, 6]


def test_catch_up_plans() -> None:
    since, now = utc(2026, 1, 1), utc(2026, 1, 1, 5, 30)
    assert plan(Schedule(cron="0 * * * *", catch_up="none"), since, now).run == []
    assert plan(Schedule(cron="0 * * * *", catch_up="none"), since, now).missed == 5
    assert plan(Schedule(cron="0 * * * *", catch_up="latest"), since, now).run == [utc(2026, 1, 1, 5)]
    assert plan(Schedule(cron="0 * * * *", catch_up="all"), since, now).run == [utc(2026, 1, 1, h) for h in range(1, 6)]
    # all is bounded: a month of a one-minute schedule runs the latest CATCH_UP_LIMIT
    month = plan(Schedule(every="1m", catch_up="all"), since, utc(2026, 2, 1))
    assert month.missed == 31 * 24 * 60
    assert len(month.run) == CATCH_UP_LIMIT
    assert month.run[-1] == utc(2026, 2, 1)
    at = Schedule(at=datetime(2026, 1, 1, 3, 0), timezone="Europe/Berlin", catch_up="latest")
    assert plan(at, since, now).run == [utc(2026, 1, 1, 2, 0)]
