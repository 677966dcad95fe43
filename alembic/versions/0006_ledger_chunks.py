"""chunks of a run's items (the unit of work and recovery) and items.sending (a delivery's intent)

Revision ID: 0006
Revises: 0005

A run recorded before chunks existed has no chunk rows: resuming it makes chunks for its
pending items (``automator.history.ledger.cover_items``), so nothing is done here but the
schema.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "chunks",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("first_item", sa.Integer(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("fetched_by", sa.String(200), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("owner", sa.String(200), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claims", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("run_id", "seq", name="uq_chunks_run_seq"),
    )
    with op.batch_alter_table("items") as batch_op:
        batch_op.add_column(sa.Column("sending", sa.String(200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("items") as batch_op:
        batch_op.drop_column("sending")
    op.drop_table("chunks")
