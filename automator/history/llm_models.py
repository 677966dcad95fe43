"""History tables of the model steps: the response cache and Batch API jobs.

Both exist so that nobody pays twice: an identical request is answered from
``model_cache``; a batch that a crashed process submitted is found in ``model_batches``
and collected instead of being sent again.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from automator.history.models import Base


class CachedResponse(Base):
    """One answer of the model, keyed by a hash of everything that shaped it."""

    __tablename__ = "model_cache"

    # sha256 of the canonical request: model, messages, schema, parameters
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(100))
    workflow: Mapped[str | None] = mapped_column(String(200))
    step_id: Mapped[str | None] = mapped_column(String(200))
    # {"content": ..., "finish_reason": ..., "usage": {...}, "request_id": ...}
    response: Mapped[Any] = mapped_column(JSON)
    hits: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[datetime] = mapped_column(index=True)
    last_hit_at: Mapped[datetime | None]


class ModelBatch(Base):
    """One Batch API job a step submitted, until its results are collected."""

    __tablename__ = "model_batches"
    __table_args__ = (Index("ix_model_batches_workflow_step_status", "workflow", "step_id", "status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"))
    workflow: Mapped[str] = mapped_column(String(200))
    step_id: Mapped[str] = mapped_column(String(200))
    model: Mapped[str] = mapped_column(String(100))
    # None while the batch is being created: the row is its intent, written before the
    # create call, so a crash in between is known to the resumed run (see openai_batch)
    batch_id: Mapped[str | None] = mapped_column(String(200), unique=True)
    input_file_id: Mapped[str | None] = mapped_column(String(200))
    # SHA-256 of the input file, also in the batch's metadata: how a resumed run finds the batch
    input_sha256: Mapped[str | None] = mapped_column(String(64))
    output_file_id: Mapped[str | None] = mapped_column(String(200))
    error_file_id: Mapped[str | None] = mapped_column(String(200))
    # creating (its row written, the create call not yet answered) | submitted | validating |
    # in_progress | finalizing | completed | failed | expired | cancelled | collected
    status: Mapped[str] = mapped_column(String(20))
    request_count: Mapped[int] = mapped_column(default=0)
    # custom_id -> cache key of each request, so results land in the response cache
    requests: Mapped[dict[str, Any]] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
