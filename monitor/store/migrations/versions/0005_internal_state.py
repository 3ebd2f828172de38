"""The service's own keyed state in a table of its own (``internal_state``).

Until now it lived in ``stream_state`` under fake stream names, keyed by a 64-character
``component``: ``__input__`` (the input index of a non-Kafka source, keyed by the source's name,
shortened to a prefix and a hash when longer than 64 characters), ``__actions__`` (the action
worker's cursor), ``__simulate__`` (the simulation's Kafka feed) and ``__health__`` (the write
probe). Those rows move here, keyed ``<prefix>:<component>`` (``input_index:<source name>``,
``actions:cursor``, ``simulate:kafka_feed``, ``health:write_probe``), so that a database upgrades in
place: a restarted pipeline resumes its input index and the worker its cursor.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import hashlib
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

JsonType = sa.JSON().with_variant(JSONB(), "postgresql")

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# Fake stream of stream_state -> prefix of the internal_state key.
PREFIXES = {"__input__": "input_index", "__actions__": "actions", "__simulate__": "simulate", "__health__": "health"}
COMPONENT_CHARS = 64  # stream_state.component

# Lightweight tables as they are at this revision (a migration must not import today's schema).
stream_state = sa.table(
    "stream_state",
    sa.column("stream", sa.String),
    sa.column("component", sa.String),
    sa.column("state", JsonType),
    sa.column("updated_at", sa.Float),
)
offsets = sa.table("offsets", sa.column("source", sa.String))
internal_state = sa.table(
    "internal_state", sa.column("key", sa.Text), sa.column("state", JsonType), sa.column("updated_at", sa.Float)
)


def shortened(source_name: str) -> str:
    """The ``__input__`` component the pipeline wrote for a source (its ``index_component`` at
    revision 0004, copied: the pipeline's own function is dropped once this table exists)."""
    if len(source_name) <= COMPONENT_CHARS:
        return source_name
    return f"{source_name[:47]}~{hashlib.sha256(source_name.encode()).hexdigest()[:16]}"


def upgrade() -> None:
    op.create_table(
        "internal_state",
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("state", JsonType, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(stream_state.c.stream, stream_state.c.component, stream_state.c.state, stream_state.c.updated_at)
        .where(stream_state.c.stream.in_(list(PREFIXES)))
        .order_by(stream_state.c.stream, stream_state.c.component)
    ).all()
    if not rows:
        return
    # A long source name (a file's absolute path) was stored shortened with a hash; its full name
    # is in the offsets table (the file source commits its byte offset there under the same name),
    # and the new key is the full name, so the index of that source carries over.
    full = {
        shortened(s): s for (s,) in bind.execute(sa.select(offsets.c.source).distinct()) if len(s) > COMPONENT_CHARS
    }
    moved: list[dict[str, Any]] = []
    for stream, component, state, updated_at in rows:
        name = full.get(component, component) if stream == "__input__" else component
        moved.append({"key": f"{PREFIXES[stream]}:{name}", "state": state, "updated_at": updated_at})
    bind.execute(internal_state.insert(), moved)
    bind.execute(stream_state.delete().where(stream_state.c.stream.in_(list(PREFIXES))))


def downgrade() -> None:
    bind = op.get_bind()
    streams = {prefix: stream for stream, prefix in PREFIXES.items()}
    back: list[dict[str, Any]] = []
    for key, state, updated_at in bind.execute(
        sa.select(internal_state.c.key, internal_state.c.state, internal_state.c.updated_at)
    ):
        prefix, _, name = str(key).partition(":")
        stream = streams.get(prefix)
        if stream is None:
            continue  # a key that revision 0004 has no place for
        component = shortened(name) if stream == "__input__" else name
        if len(component) > COMPONENT_CHARS:
            continue
        back.append({"stream": stream, "component": component, "state": state, "updated_at": updated_at})
    if back:
        bind.execute(stream_state.insert(), back)
    op.drop_table("internal_state")
