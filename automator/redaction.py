"""Keeping secret values out of everything the process writes, in every encoding.

A secret read by a run (``{{ secrets.NAME }}``, or a key a step registers with
``context.add_secret``) is added to that run's ``Redactor`` and to the process-wide
registry. The run's redactor cleans what the run records (items, reasons, errors,
summaries, model calls, output files); the registry feeds ``RedactingFilter``, which
cleans every log record before a handler writes it, whichever library logged it.

A secret does not always appear as itself: an error quotes it JSON-escaped, a URL
carries it percent-encoded, an exception shows its ``repr``. ``secret_pattern`` matches
it however its characters were escaped (see ``_spellings``), and its base64. What cannot
be matched: a secret encoded together with other text in a position-dependent way, such
as the base64 of ``user:secret`` in a Basic auth header, a hash, a compressed body.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import re
import sys
import threading
import traceback
from collections.abc import Iterable
from functools import lru_cache
from types import TracebackType
from typing import Any

REDACTED = "***"
# shorter values would blank out ordinary text ("1234" is in many ids): not secrets worth the name
MIN_SECRET_LENGTH = 4


def _json_inner(text: str, *, ascii_only: bool) -> str:
    return json.dumps(text, ensure_ascii=ascii_only)[1:-1]


@lru_cache(maxsize=4096)
def _spellings(char: str) -> tuple[str, ...]:
    """How one character of a secret may be written, longest first.

    Percent-encoding (either case, ``+`` for a space), JSON, HTML (named and numeric), Python
    ``repr``/``ascii`` and bytes escapes, and each of those JSON-escaped once more. Every
    encoding we know of escapes a string character by character, so a secret is matched
    however its characters were spelled, mixed as the encoder chose: a URL that kept some
    characters and encoded others, inside an error quoted in JSON, is still one match.
    """
    raw = char.encode("utf-8")
    percent = "".join(f"%{byte:02X}" for byte in raw)
    forms = {
        char,
        percent,
        percent.lower(),
        html.escape(char),
        f"&#{ord(char)};",
        f"&#x{ord(char):x};",
        _json_inner(char, ascii_only=False),
        _json_inner(char, ascii_only=True),
        repr(char)[1:-1],
        ascii(char)[1:-1],
        repr(raw)[2:-1],
    }
    if char == " ":
        forms.add("+")  # form encoding
    if char in "'\"":
        forms.add("\\" + char)  # repr of a text holding both quotes; JSON's \"
    if char == "/":
        forms.add("\\/")  # JSON may escape a slash
    forms |= {_json_inner(form, ascii_only=flag) for form in list(forms) for flag in (False, True)}
    return tuple(sorted(forms, key=lambda f: (-len(f), f)))


def secret_pattern(value: str) -> str:
    """A regular expression matching ``value`` in every form this module knows.

    Each spelling of the first character starts an alternative of its own (``s(?:…)|%73(?:…)``
    rather than ``(?:s|%73)(?:…)``): the same matches, tried in the same order, but every
    alternative then begins with a literal, so the regular expression engine skips the
    positions no spelling can start at instead of trying the whole pattern at each one
    (five times faster on text without the secret, which is nearly all text).
    """
    rest = "".join("(?:" + "|".join(re.escape(f) for f in _spellings(c)) + ")" for c in value[1:])
    spelled = [re.escape(first) + (f"(?:{rest})" if rest else "") for first in _spellings(value[0])] if value else [""]
    raw = value.encode("utf-8")
    # base64 does not go character by character: only the value's own encoding is known
    encoded = {base64.b64encode(raw).decode().rstrip("="), base64.urlsafe_b64encode(raw).decode().rstrip("=")}
    return "|".join([*spelled, *(re.escape(e) for e in sorted(encoded))])


class Redactor:
    """Replaces secret values, in every form ``secret_pattern`` matches, with ``***``.

    One per run (``context.redactor``); each value added is also registered with the
    process, so that the log filter knows it too. Thread-safe: steps run in threads.
    """

    def __init__(self, *, register: bool = True) -> None:
        self._values: dict[str, str] = {}  # value -> its pattern
        self._pattern: re.Pattern[str] | None = None
        self._register = register
        self._lock = threading.Lock()

    def add(self, value: str) -> None:
        if not isinstance(value, str) or len(value) < MIN_SECRET_LENGTH or value in self._values:
            return
        pattern = secret_pattern(value)
        with self._lock:
            self._values[value] = pattern
            self._pattern = None
        if self._register:
            _PROCESS.add(value)

    def __bool__(self) -> bool:
        return bool(self._values)

    def _compiled(self) -> re.Pattern[str]:
        pattern = self._pattern
        if pattern is None:
            with self._lock:
                # longer secrets first: one that contains another is replaced whole
                ordered = sorted(self._values.items(), key=lambda pair: -len(pair[0]))
                pattern = self._pattern = re.compile("|".join(p for _, p in ordered))
        return pattern

    def text(self, value: str | None) -> str | None:
        if value is None or not self._values:
            return value
        return self._compiled().sub(REDACTED, value)

    def data(self, value: Any) -> Any:
        """A JSON-like structure with every string (keys too) redacted; unchanged parts are shared."""
        if not self._values or value is None:
            return value
        return _clean(value, self._compiled())


def _clean(value: Any, pattern: re.Pattern[str]) -> Any:
    if isinstance(value, str):
        return pattern.sub(REDACTED, value) if pattern.search(value) else value
    if isinstance(value, dict):
        pairs = [(_clean(k, pattern), _clean(v, pattern)) for k, v in value.items()]
        changed = any(k2 is not k or v2 is not v for (k2, v2), (k, v) in zip(pairs, value.items(), strict=True))
        return dict(pairs) if changed else value
    if isinstance(value, list | tuple):
        items = [_clean(v, pattern) for v in value]
        if all(a is b for a, b in zip(items, value, strict=True)):
            return value
        return items if isinstance(value, list) else tuple(items)
    return value


_PROCESS = Redactor(register=False)


def process_redactor() -> Redactor:
    """Every secret value any run of this process has read: what the log filter removes."""
    return _PROCESS


def register_secrets(values: Iterable[str]) -> None:
    """Make values known to the process (the log filter) without a run reading them."""
    for value in values:
        _PROCESS.add(value)


# attributes every LogRecord has; anything else was passed with ``extra=``
_RECORD_ATTRIBUTES = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
_PLAIN = (str, int, float, bool, dict, list, tuple, type(None))


class RedactingFilter(logging.Filter):
    """Removes every secret the process knows from a log record: message, extras, traceback.

    Attached to a handler, it runs for records of every logger (httpx's, a plugin's) before
    the handler formats them, so JSON lines and plain text are both clean.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        redactor = _PROCESS
        if not redactor:
            return True
        try:
            message = record.getMessage()
        except (TypeError, ValueError, KeyError):
            message = str(record.msg)  # a malformed call (arguments that do not fit): its text, cleaned
        record.msg, record.args = redactor.text(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redactor.text(record.exc_text)
        if record.stack_info:
            record.stack_info = redactor.text(record.stack_info)
        for name, value in list(vars(record).items()):
            if name in _RECORD_ATTRIBUTES or name.startswith("_"):
                continue
            if not isinstance(value, _PLAIN):
                value = str(value)  # how a formatter would show it
            setattr(record, name, redactor.data(value))
        return True


def _redacted_traceback(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> str:
    return _PROCESS.text("".join(traceback.format_exception(exc_type, exc, tb))) or ""


def install_excepthooks() -> None:
    """Tracebacks nobody caught (a bug, a plugin command that crashed) are printed without secrets."""

    def excepthook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        sys.stderr.write(_redacted_traceback(exc_type, exc, tb))

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        value = args.exc_value if args.exc_value is not None else args.exc_type()
        text = _redacted_traceback(args.exc_type, value, args.exc_traceback)
        sys.stderr.write(f"Exception in thread {name}:\n{text}")

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook
