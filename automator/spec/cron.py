"""Standard 5-field cron, translated for APScheduler 3.

APScheduler's ``CronTrigger.from_crontab`` reads weekday 0 as Monday, where cron
(and every ops person) means Sunday; and it ANDs day-of-month with day-of-week, where
cron ORs them when both are restricted. We parse the weekday field ourselves, hand
APScheduler weekday *names*, and combine two triggers with ``OrTrigger`` for the OR case.
"""

from __future__ import annotations

from datetime import tzinfo

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.combining import OrTrigger
from apscheduler.triggers.cron import CronTrigger

_DAY_NAMES = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_FIELD_NAMES = ("minute", "hour", "day of month", "month", "day of week")


def _weekday_number(token: str) -> int:
    low = token.lower()[:3]
    if low in _DAY_NAMES:
        return _DAY_NAMES.index(low)
    if token.isdigit() and 0 <= int(token) <= 7:
        return int(token)
    raise ValueError(f"invalid day of week {token!r}: use 0-7 (0 and 7 are Sunday) or sun-sat")


def weekdays(field: str) -> set[int]:
    """The days (0 = Sunday … 6 = Saturday) a cron day-of-week field selects."""
    days: set[int] = set()
    for part in field.split(","):
        step = 1
        if "/" in part:
            part, step_text = part.split("/", 1)
            if not step_text.isdigit() or int(step_text) == 0:
                raise ValueError(f"invalid step {step_text!r} in day of week")
            step = int(step_text)
        if part == "*":
            low, high = 0, 6
        elif "-" in part:
            a, b = part.split("-", 1)
            low, high = _weekday_number(a), _weekday_number(b)
            if low > high:
                raise ValueError(f"invalid range {part!r} in day of week: the start is after the end")
        else:
            low = high = _weekday_number(part)
            if step != 1:
                high = 6
        days.update(d % 7 for d in range(low, high + 1, step))
    return days


def split_cron(expression: str) -> list[str]:
    text = _MACROS.get(expression.strip().lower(), expression.strip())
    fields = text.split()
    if len(fields) != 5:
        raise ValueError(
            f"invalid cron {expression!r}: expected 5 fields (minute hour day-of-month month "
            f"day-of-week), got {len(fields)}"
        )
    return fields


def cron_trigger(expression: str, timezone: tzinfo | str) -> BaseTrigger:
    """An APScheduler trigger firing exactly when standard cron would."""
    minute, hour, dom, month, dow = split_cron(expression)
    day_names = ",".join(_DAY_NAMES[d] for d in sorted(weekdays(dow)))
    try:
        if dom != "*" and dow != "*":
            # cron's rule: when both are restricted, either one matching is enough
            return OrTrigger(
                [
                    CronTrigger(minute=minute, hour=hour, day=dom, month=month, timezone=timezone),
                    CronTrigger(minute=minute, hour=hour, month=month, day_of_week=day_names, timezone=timezone),
                ]
            )
        return CronTrigger(
            minute=minute,
            hour=hour,
            day=dom,
            month=month,
            day_of_week=day_names if dow != "*" else "*",
            timezone=timezone,
        )
    except ValueError as exc:
        raise ValueError(f"invalid cron {expression!r}: {exc}") from None


def check_cron(expression: str) -> str:
    """Validate a cron expression (pydantic validator); returns it unchanged."""
    cron_trigger(expression, "UTC")
    return expression
