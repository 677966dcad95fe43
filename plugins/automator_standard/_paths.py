"""Walking into a parsed document with a dotted path such as ``data.tickets``."""

from __future__ import annotations

from typing import Any

from automator.errors import StepError


def dig(document: Any, path: str | None, *, what: str) -> Any:
    """The value at a dotted path (``data.items``, ``results.0.rows``); the whole document for None."""
    if not path:
        return document
    current = document
    walked: list[str] = []
    for part in path.split("."):
        if isinstance(current, dict) and part in current:
            current = current[part]
        elif isinstance(current, list) and part.lstrip("-").isdigit() and -len(current) <= int(part) < len(current):
            current = current[int(part)]
        else:
            where = ".".join(walked) or "the top level"
            if isinstance(current, dict):
                keys = ", ".join(sorted(map(str, current))[:10]) or "none"
                found = f"keys there: {keys}"
            else:
                found = f"found {type(current).__name__} there"
            raise StepError(f"{what}: no {part!r} at {where} ({found})", retryable=False)
        walked.append(part)
    return current


def as_item_list(value: Any, *, what: str) -> list[Any]:
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        return [value]
    raise StepError(f"{what}: expected a list of items, found {type(value).__name__}", retryable=False)
