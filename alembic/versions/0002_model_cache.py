"""model cache and batches: model_cache, model_batches (the model steps' tables)

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_cache",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=100), nullable=False),
        sa.Column("workflow", sa.String(length=200), nullable=True),
        sa.Column("step_id", sa.String(length=200), nullable=True),
        sa.Column("response", sa.JSON(), nullable=False),
        sa.Column("hits", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_hit_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("key"),
    )
    with op.batch_alter_table("model_cache", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_model_cache_created_at"), ["created_at"], unique=False)

    op.create_table(
        "model_batches",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=True),
        sa.Column("workflow", sa.String(length=200), nullable=False),
        sa.Column("step_id", sa.String(length=200), nullable=False),
        sa.Column("model", sa.String(length=100), nullable=False),
        sa.Column("batch_id", sa.String(length=200), nullable=False),
        sa.Column("input_file_id", sa.String(length=200), nullable=False),
        sa.Column("output_file_id", sa.String(length=200), nullable=True),
        sa.Column("error_file_id", sa.String(length=200), nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("request_count", sa.Integer(), nullable=False),
        sa.Column("requests", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("batch_id"),
    )
    with op.batch_alter_table("model_batches", schema=None) as batch_op:
        batch_op.create_index(
            "ix_model_batches_workflow_step_status", ["workflow", "step_id", "status"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("model_batches", schema=None) as batch_op:
        batch_op.drop_index("ix_model_batches_workflow_step_status")
    op.drop_table("model_batches")
    with op.batch_alter_table("model_cache", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_model_cache_created_at"))
    op.drop_table("model_cache")
