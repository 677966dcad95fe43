"""The run history's tables, as SQLAlchemy 2 typed models.

Changing a model means adding an Alembic migration under ``alembic/versions`` (the
test suite fails when the models and the migrations disagree).
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, Index, Integer, Numeric, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the history; use UTC-aware datetimes")
        value = value.astimezone(UTC)
        # SQLite keeps no offset; storing naive UTC keeps comparisons in SQL correct
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        # PostgreSQL answers in the session's time zone, whatever the server is set to
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: UTCDateTime}


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    workflow: Mapped[str] = mapped_column(String(200), index=True)
    workflow_version: Mapped[str] = mapped_column(String(64))
    workflow_path: Mapped[str | None] = mapped_column(Text)
    trigger: Mapped[str] = mapped_column(String(20))  # cli | schedule | catch_up | manual | resume
    status: Mapped[str] = mapped_column(String(20), index=True)
    scheduled_for: Mapped[datetime | None]
    started_at: Mapped[datetime] = mapped_column(index=True)
    finished_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    owner: Mapped[str | None] = mapped_column(String(200))
    error: Mapped[str | None] = mapped_column(Text)
    error_step: Mapped[str | None] = mapped_column(String(200))
    params: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    fetched: Mapped[int] = mapped_column(default=0)
    delivered: Mapped[int] = mapped_column(default=0)
    skipped: Mapped[int] = mapped_column(default=0)
    quarantined: Mapped[int] = mapped_column(default=0)
    failed: Mapped[int] = mapped_column(default=0)

    steps: Mapped[list[StepAttempt]] = relationship(
        back_populates="run", cascade="all, delete-orphan", order_by="StepAttempt.id"
    )


class StepAttempt(Base):
    """One attempt of one step in a run (item steps: one row, retries counted per item)."""

    __tablename__ = "step_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    step_id: Mapped[str] = mapped_column(String(200))
    step_type: Mapped[str] = mapped_column(String(200))
    phase: Mapped[str] = mapped_column(String(20))
    attempt: Mapped[int] = mapped_column(default=1)
    # running | succeeded | failed | interrupted | timed_out | crashed (its process died; the run resumed)
    status: Mapped[str] = mapped_column(String(20))
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    items_in: Mapped[int] = mapped_column(default=0)
    items_out: Mapped[int] = mapped_column(default=0)
    retries: Mapped[int] = mapped_column(default=0)
    error: Mapped[str | None] = mapped_column(Text)
    summary: Mapped[str | None] = mapped_column(Text)

    run: Mapped[Run] = relationship(back_populates="steps")


class LedgerItem(Base):
    """The item ledger: every item a fetch produced, and the one outcome it ended in."""

    __tablename__ = "items"
    __table_args__ = (
        UniqueConstraint("run_id", "seq", name="uq_items_run_seq"),
        Index("ix_items_workflow_key_outcome", "workflow", "key", "outcome"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    workflow: Mapped[str] = mapped_column(String(200))
    seq: Mapped[int]
    # a workflow's template makes it, of any length: PostgreSQL would enforce a VARCHAR's
    # (SQLite never did), so it is unbounded there
    key: Mapped[str | None] = mapped_column(String(500).with_variant(Text(), "postgresql"))
    fetched_by: Mapped[str] = mapped_column(String(200))
    outcome: Mapped[str] = mapped_column(String(20))  # pending | delivered | skipped | quarantined | failed
    step_id: Mapped[str | None] = mapped_column(String(200))  # where the item's path ended
    reason: Mapped[str | None] = mapped_column(Text)
    data: Mapped[Any] = mapped_column(JSON)  # the item as fetched
    result: Mapped[Any | None] = mapped_column(JSON)  # the item as it ended (delivered or quarantined)
    # deliver steps the item passed while still pending: a resumed run does not send it again
    delivered_by: Mapped[list[str] | None] = mapped_column(JSON)
    # write-ahead: the deliver step whose delivery of the item has left (or is about to) and
    # whose result is not recorded yet; a crash leaves it set, and the resumed run sends
    # again with the same idempotency key
    sending: Mapped[str | None] = mapped_column(String(200))
    # a digest's members: the group's key, written with the delivery's intent, so that a
    # resumed run sends the same group again (the same idempotency key), not a new one
    group_key: Mapped[str | None] = mapped_column(String(100))
    updated_at: Mapped[datetime | None]


class Chunk(Base):
    """A chunk of a run's items (consecutive seqs): the unit of work and of recovery.

    Whoever works on a chunk holds its lease (``owner`` until ``lease_until``); a claim is
    one ``UPDATE … WHERE`` the chunk is open and its lease free or expired, so a second
    claim of the same chunk does nothing.
    """

    __tablename__ = "chunks"
    __table_args__ = (UniqueConstraint("run_id", "seq", name="uq_chunks_run_seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    seq: Mapped[int]  # the chunk's number in its run
    first_item: Mapped[int]  # items first_item .. first_item + size - 1
    size: Mapped[int]
    fetched_by: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20))  # open | done
    owner: Mapped[str | None] = mapped_column(String(200))  # host:pid holding the lease
    lease_until: Mapped[datetime | None]
    claims: Mapped[int] = mapped_column(default=0)  # how many times it was taken (1 = never resumed)
    # where a resumed fetch goes on: {"state": the last Checkpoint's state (or null), "after":
    # the step's items taken after that checkpoint, up to this chunk's end}
    fetch_mark: Mapped[Any | None] = mapped_column(JSON)
    updated_at: Mapped[datetime | None]


class ModelCall(Base):
    """One call to a language model, with what it cost."""

    __tablename__ = "model_calls"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    workflow: Mapped[str] = mapped_column(String(200), index=True)
    step_id: Mapped[str] = mapped_column(String(200))
    item_seq: Mapped[int | None]
    attempt: Mapped[int] = mapped_column(default=1)
    model: Mapped[str] = mapped_column(String(100))
    mode: Mapped[str] = mapped_column(String(20), default="sync")  # sync | batch | cache
    # sent (written before the request leaves) -> ok | error | rejected; cached; unconfirmed
    # (the answer was lost in a crash). See automator.history.states.CallStatus.
    status: Mapped[str] = mapped_column(String(20))
    input_tokens: Mapped[int] = mapped_column(default=0)
    cached_input_tokens: Mapped[int] = mapped_column(default=0)
    output_tokens: Mapped[int] = mapped_column(default=0)
    # exact once answered; an unconfirmed call's is its upper bound (what it may have cost)
    cost_usd: Mapped[Decimal] = mapped_column(Numeric(18, 9), default=Decimal(0))
    # the most the request can cost (prompt estimate, every output token used), known before it leaves
    cost_bound_usd: Mapped[Decimal | None] = mapped_column(Numeric(18, 9))
    latency_ms: Mapped[int | None]
    request_id: Mapped[str | None] = mapped_column(String(200))
    # the response cache's key of the request: a resumed run finds the answers it already paid for
    request_key: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    prompt: Mapped[Any | None] = mapped_column(JSON)
    response: Mapped[Any | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(index=True)
