"""Alembic environment: runs on the connection the Store hands over."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from monitor.store.tables import metadata

config = context.config
connection = config.attributes.get("connection")
if connection is None:
    engine = sa.create_engine(config.get_main_option("sqlalchemy.url") or "")
    connection = engine.connect()

if connection.dialect.name == "postgresql":
    # Several replicas may start at once; one migrates, the others wait.
    connection.execute(sa.text("SELECT pg_advisory_xact_lock(7163526)"))

context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
