"""Every history table, in one metadata: what Alembic compares the migrations against."""

from __future__ import annotations

from automator.history import daemon_models, llm_models  # noqa: F401 - registers their tables
from automator.history.models import Base

metadata = Base.metadata
