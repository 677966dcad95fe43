"""Durations as people write them in workflow files: ``90s``, ``15m``, ``1h30m``, ``2d``."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
DURATION_PATTERN = r"^(\d+(\.\d+)?(ms|s|m|h|d|w))+$"
# timedelta's own limit is 999,999,999 days; nothing in a workflow waits longer than a few years
MAX_DURATION = timedelta(days=3660)


def parse_duration(value: object) -> timedelta:
    """Read ``1h30m`` style text (or a number of seconds) as a timedelta."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 15m, 1h30m")
    if isinstance(value, int | float):
        if value != value:  # NaN (.nan in YAML)
            raise ValueError("expected a duration such as 30s, 15m, 1h30m")
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return _bounded(value, value)
    if not isinstance(value, str):
        raise ValueError("expected a duration such as 30s, 15m, 1h30m")
    text = value.strip().replace(" ", "")
    if not re.fullmatch(DURATION_PATTERN, text):
        shown = value if len(value) <= 40 else value[:37] + "..."
        raise ValueError(
            f"invalid duration {shown!r}: use a number and a unit (ms, s, m, h, d, w), for example 30s, 15m or 1h30m"
        )
    seconds = sum(float(n) * _UNITS[unit] for n, unit in _PART.findall(text))
    return _bounded(seconds, value)


def _bounded(seconds: float, written: object) -> timedelta:
    if seconds > MAX_DURATION.total_seconds():  # also .inf, and what timedelta would overflow on
        shown = str(written) if len(str(written)) <= 30 else str(written)[:27] + "..."
        raise ValueError(f"the duration {shown} is too long: at most {format_duration(MAX_DURATION)}")
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    seconds = value.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": DURATION_PATTERN},
                {"type": "number", "minimum": 0},
            ],
            "description": "A duration: 30s, 15m, 1h30m, 2d (or a number of seconds).",
        }
    ),
]
