"""scheduler state: schedule_state, trigger_requests, run_recoveries (the daemon's tables)

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "schedule_state",
        sa.Column("workflow", sa.String(length=200), nullable=False),
        sa.Column("last_fire_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("schedule", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("workflow"),
    )
    op.create_table(
        "trigger_requests",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("workflow", sa.String(length=200), nullable=False),
        sa.Column("params", sa.JSON(), nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claimed_by", sa.String(length=200), nullable=True),
        sa.Column("run_id", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("trigger_requests", schema=None) as batch_op:
        batch_op.create_index("ix_trigger_requests_status", ["status"], unique=False)
    op.create_table(
        "run_recoveries",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("detected_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("detected_by", sa.String(length=200), nullable=False),
        sa.Column("previous_owner", sa.String(length=200), nullable=True),
        sa.Column("action", sa.String(length=20), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("run_recoveries", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_run_recoveries_run_id"), ["run_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("run_recoveries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_run_recoveries_run_id"))
    op.drop_table("run_recoveries")
    with op.batch_alter_table("trigger_requests", schema=None) as batch_op:
        batch_op.drop_index("ix_trigger_requests_status")
    op.drop_table("trigger_requests")
    op.drop_table("schedule_state")
