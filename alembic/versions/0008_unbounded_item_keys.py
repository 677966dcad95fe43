"""items.key unbounded on PostgreSQL

Revision ID: 0008
Revises: 0007

An item's key is what the workflow's ``key:`` template makes of it: a URL, a title, of any
length. SQLite never enforced the column's VARCHAR(500), PostgreSQL does, so a run whose
keys were longer failed there alone. On PostgreSQL the column becomes TEXT (binary
compatible: no table rewrite, the index stays); on SQLite nothing changes.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column("items", "key", type_=sa.Text(), existing_type=sa.String(500), existing_nullable=True)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column("items", "key", type_=sa.String(500), existing_type=sa.Text(), existing_nullable=True)
