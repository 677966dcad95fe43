"""chunks.fetch_mark (where a resumed fetch goes on) and items.group_key (a digest's members)

Revision ID: 0007
Revises: 0006

Both columns are new and empty for runs recorded before: a run without fetch marks is
resumed as before (its fetch is started again and the items it has are dropped), and
an item without a group key was never part of a digest.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("chunks") as batch_op:
        batch_op.add_column(sa.Column("fetch_mark", sa.JSON(), nullable=True))
    with op.batch_alter_table("items") as batch_op:
        batch_op.add_column(sa.Column("group_key", sa.String(100), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("items") as batch_op:
        batch_op.drop_column("group_key")
    with op.batch_alter_table("chunks") as batch_op:
        batch_op.drop_column("fetch_mark")
