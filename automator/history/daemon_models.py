"""History tables of the daemon: schedule state, manual trigger requests, crash recoveries.

The scheduler keeps no job store of its own (APScheduler's would be pickled and must
never be shared between processes); what it must remember across restarts is here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from automator.history.models import Base


class ScheduleState(Base):
    """Per workflow: the last fire the daemon handled, so that missed fires can be caught up."""

    __tablename__ = "schedule_state"

    workflow: Mapped[str] = mapped_column(String(200), primary_key=True)
    # the scheduled time of the last fire handled (run, queued or skipped)
    last_fire_at: Mapped[datetime | None]
    # when a daemon first scheduled the workflow: fires before it were never due
    registered_at: Mapped[datetime]
    schedule: Mapped[str] = mapped_column(Text)  # the schedule as written, for the operator
    updated_at: Mapped[datetime]


class TriggerRequest(Base):
    """``automator trigger NAME``: a request the running daemon claims and turns into a run."""

    __tablename__ = "trigger_requests"
    __table_args__ = (Index("ix_trigger_requests_status", "status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    workflow: Mapped[str] = mapped_column(String(200))
    params: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(20))  # pending | started | rejected | cancelled
    requested_at: Mapped[datetime]
    claimed_at: Mapped[datetime | None]
    claimed_by: Mapped[str | None] = mapped_column(String(200))
    run_id: Mapped[int | None]
    error: Mapped[str | None] = mapped_column(Text)


class RunRecovery(Base):
    """A run found ``running`` with its owner gone: what was done about it."""

    __tablename__ = "run_recoveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    detected_at: Mapped[datetime]
    detected_by: Mapped[str] = mapped_column(String(200))
    previous_owner: Mapped[str | None] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(20))  # resumed | failed
    reason: Mapped[str | None] = mapped_column(Text)
