"""model calls written ahead: model_calls.cost_bound_usd and request_key; batch intent rows

A model call is a row (status ``sent``, with the most it can cost) before its request
leaves; a batch is a row (status ``creating``, no batch id yet) before it is created.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("model_calls") as batch_op:
        batch_op.add_column(sa.Column("cost_bound_usd", sa.Numeric(18, 9), nullable=True))
        batch_op.add_column(sa.Column("request_key", sa.String(64), nullable=True))
    with op.batch_alter_table("model_batches") as batch_op:
        batch_op.add_column(sa.Column("input_sha256", sa.String(64), nullable=True))
        batch_op.alter_column("batch_id", existing_type=sa.String(200), nullable=True)
        batch_op.alter_column("input_file_id", existing_type=sa.String(200), nullable=True)


def downgrade() -> None:
    # a batch never created has no id: its intent row goes (nothing was paid for it)
    op.execute("DELETE FROM model_batches WHERE batch_id IS NULL")
    with op.batch_alter_table("model_batches") as batch_op:
        batch_op.alter_column("input_file_id", existing_type=sa.String(200), nullable=False)
        batch_op.alter_column("batch_id", existing_type=sa.String(200), nullable=False)
        batch_op.drop_column("input_sha256")
    with op.batch_alter_table("model_calls") as batch_op:
        batch_op.drop_column("request_key")
        batch_op.drop_column("cost_bound_usd")
