"""The inbox keeps an episode id once per stream, not once for the whole service.

Its episode ids were unique across streams, so that a retried request is a no-op. But an id one
stream had sent made another stream's record with the same id a "duplicate" too: the API
answered that the server held it (the SDK counts such a record as delivered), and the record
was gone, while its sender's ingest token may not even read the stream that held the id.
Unique on (stream, episode_id), a retry is still a no-op; a record whose id another stream
holds reaches the pipeline, which stores it or dead-letters it (``episode_id_conflict``), as
the Kafka hand-off always did.

SQLite changes a table's constraints by copying it (batch mode). The copy keeps AUTOINCREMENT
and the table's sequence: the consumer's position is an inbox id, and a new row must never get
an id below it (it would never be read).

Revision ID: 0016
Revises: 0015
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

NEW = "uq_inbox_stream_episode"
OLD_POSTGRES = "inbox_episode_id_key"  # PostgreSQL's name of 0007's unnamed UNIQUE (episode_id)


def _inbox(*constraints: sa.Constraint) -> sa.Table:
    """The inbox as 0007 made it, without its unique constraint: what SQLite's copy starts from."""
    return sa.Table(
        "inbox",
        sa.MetaData(),
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("episode_id", sa.String(128), nullable=False),
        sa.Column("stream", sa.String(128), nullable=False),
        sa.Column("raw", sa.LargeBinary, nullable=False),
        sa.Column("received_at", sa.Float, nullable=False),
        *constraints,
        sqlite_autoincrement=True,
    )


def _sqlite_copy(*constraints: sa.Constraint) -> None:
    conn = op.get_bind()
    seq = conn.execute(sa.text("SELECT seq FROM sqlite_sequence WHERE name = 'inbox'")).scalar()
    with op.batch_alter_table(
        "inbox", copy_from=_inbox(*constraints), recreate="always", table_kwargs={"sqlite_autoincrement": True}
    ):
        pass
    if seq is not None:
        # The copy's sequence is its highest copied id; a consumed and purged higher one would be reused.
        conn.execute(sa.text("DELETE FROM sqlite_sequence WHERE name = 'inbox'"))
        conn.execute(sa.text("INSERT INTO sqlite_sequence (name, seq) VALUES ('inbox', :s)"), {"s": int(seq)})


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.drop_constraint(OLD_POSTGRES, "inbox", type_="unique")
        op.create_unique_constraint(NEW, "inbox", ["stream", "episode_id"])
    else:
        _sqlite_copy(sa.UniqueConstraint("stream", "episode_id", name=NEW))


def downgrade() -> None:
    # One row per episode id again: a later copy of an id that two streams sent goes.
    op.execute(
        "DELETE FROM inbox WHERE id IN (SELECT i.id FROM inbox i JOIN inbox j"
        " ON i.episode_id = j.episode_id AND j.id < i.id)"
    )
    if op.get_bind().dialect.name == "postgresql":
        op.drop_constraint(NEW, "inbox", type_="unique")
        op.create_unique_constraint(OLD_POSTGRES, "inbox", ["episode_id"])
    else:
        _sqlite_copy(sa.UniqueConstraint("episode_id"))
