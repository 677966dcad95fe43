"""Lifecycle events: small frozen records handed to the lifecycle hooks."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class RunInfo:
    id: int
    workflow: str
    trigger: str
    started_at: datetime
    version: str
    scheduled_for: datetime | None = None


@dataclass(frozen=True)
class RunStarted:
    run: RunInfo


@dataclass(frozen=True)
class RunFinished:
    run: RunInfo
    status: str  # succeeded | failed | timed_out | interrupted
    error: str | None
    counts: dict[str, int]  # fetched, delivered, skipped, quarantined, failed
    duration_s: float


@dataclass(frozen=True)
class StepStarted:
    run: RunInfo
    step_id: str
    step_type: str
    phase: str
    items_in: int


@dataclass(frozen=True)
class StepFinished:
    run: RunInfo
    step_id: str
    step_type: str
    phase: str
    status: str  # succeeded | failed
    error: str | None
    items_in: int
    items_out: int
    duration_s: float


@dataclass(frozen=True)
class ItemOutcome:
    run: RunInfo
    seq: int
    key: str | None
    outcome: str  # delivered | skipped | quarantined | failed
    step_id: str | None
    reason: str | None
    data: Any
