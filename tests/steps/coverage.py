"""Which settings of the standard step types the tests of tests/steps/ exercise, and how.

Each test declares what it shows with ``@covers(step_type, setting, ..., absent=...)``:
``absent=True`` for a test that leaves the settings out and checks the documented
default's effect (for a required setting: that leaving it out is a located error),
``absent=False`` for a test that sets them and checks their effect.
test_settings_coverage.py fails when a setting of a standard step type (nested ones
too, dotted as in docs/steps/) lacks either kind of test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])

COVERED: set[tuple[str, str, str]] = set()  # (step type, setting, "absent" | "present")


def covers(step_type: str, *settings: str, absent: bool) -> Callable[[F], F]:
    def declare(test: F) -> F:
        for setting in settings:
            COVERED.add((step_type, setting, "absent" if absent else "present"))
        return test

    return declare
