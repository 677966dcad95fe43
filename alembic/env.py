"""Alembic environment for the run history.

automator calls Alembic programmatically (``automator db upgrade``) and hands over its
Engine in ``config.attributes["engine"]``; the plain ``alembic`` command works too when
AUTOMATOR_DATABASE_URL is set.
"""

from __future__ import annotations

from sqlalchemy import Engine

from alembic import context
from automator.history.db import database_url, open_engine
from automator.history.tables import metadata

config = context.config
target_metadata = metadata


def run_migrations_online() -> None:
    engine: Engine = config.attributes.get("engine") or open_engine(database_url())
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            # SQLite cannot ALTER most things; batch mode rebuilds tables instead
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


def run_migrations_offline() -> None:
    context.configure(url=database_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
