"""Small frozen records passed to and from hooks.

The lifecycle hooks (``run_started``, ``step_finished``, ``item_outcome``, ...) each
receive one event; ``workflow_loaded`` may return ``Rejection`` records. They are
plain dataclasses so a plugin can keep, compare or print them freely.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class RunInfo:
    """Which run an event belongs to."""

    id: int  # the run's id in the history (``automator runs show ID``)
    workflow: str
    trigger: str  # cli | schedule | catch_up | manual | resume
    started_at: datetime  # UTC
    version: str  # hash of the workflow file the run used
    scheduled_for: datetime | None = None  # for scheduled runs: the time the schedule named
    resumed: bool = False  # True when the run continues after its process died (on_crash: resume)


@dataclass(frozen=True)
class RunStarted:
    """A run started (hook ``run_started``)."""

    run: RunInfo


@dataclass(frozen=True)
class RunFinished:
    """A run ended, whatever its status (hook ``run_finished``)."""

    run: RunInfo
    status: str  # succeeded | failed | timed_out | interrupted
    error: str | None  # secrets redacted
    counts: dict[str, int]  # fetched, delivered, skipped, quarantined, failed
    duration_s: float


@dataclass(frozen=True)
class StepStarted:
    """A step is about to handle the run's items (hook ``step_started``)."""

    run: RunInfo
    step_id: str
    step_type: str
    phase: str  # fetch | transform | validate | deliver
    items_in: int


@dataclass(frozen=True)
class StepFinished:
    """A step is done (hook ``step_finished``)."""

    run: RunInfo
    step_id: str
    step_type: str
    phase: str
    status: str  # succeeded | failed
    error: str | None  # secrets redacted
    items_in: int
    items_out: int
    duration_s: float


@dataclass(frozen=True)
class ItemOutcome:
    """An item reached its one outcome (hook ``item_outcome``)."""

    run: RunInfo
    seq: int  # the item's number within the run, from 0
    key: str | None
    outcome: str  # delivered | skipped | quarantined | failed
    step_id: str | None  # the step where the item's path ended
    reason: str | None  # secrets redacted
    data: Any  # the item's data as it ended


@dataclass(frozen=True)
class Rejection:
    """A reason to reject a workflow, returned by a ``workflow_loaded`` policy.

    ``step`` names a step by its id and ``field`` a setting in its ``with:`` block
    (dots for nested keys: ``headers.Authorization``), so the problem is reported at
    that line of the file; without them it is reported at the top of the file.
    """

    message: str
    step: str | None = None
    field: str | None = None
