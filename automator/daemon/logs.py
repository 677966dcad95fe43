"""Logging for the daemon: JSON lines for log collectors, plain text for people."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal

from automator.redaction import RedactingFilter

LogFormat = Literal["json", "text"]

# attributes every LogRecord has; anything else was passed with ``extra=`` and is kept
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonLines(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the record's extras."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _STANDARD and not name.startswith("_"):
                data[name] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:  # as logging.Formatter does: the cached text (the redacting filter cleaned it)
            data["exception"] = record.exc_text
        return json.dumps(data, ensure_ascii=False, default=str)


# libraries' loggers kept at WARNING: their INFO lines are not what an operator wants, and
# httpx's name every request's URL (which may carry a secret webhook token)
QUIET_LOGGERS = ("httpx", "httpcore", "apscheduler", "alembic")


def quiet_libraries() -> None:
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def redact_handlers(logger: logging.Logger) -> None:
    """Every handler of ``logger`` drops the secrets the process knows from what it writes."""
    for handler in logger.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def setup_logging(fmt: LogFormat | None, *, verbose: bool = False) -> None:
    """Log to stderr: JSON lines unless it is a terminal (or ``fmt`` says otherwise)."""
    if fmt is None:
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonLines())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    redact_handlers(root)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    quiet_libraries()
