"""Schema v2 episodes: the conversation (``messages``, OpenAI chat format) of an episode.

A nullable JSON column on ``episodes``: NULL for v1 episodes (and for every row written before this
revision); ``prompt`` and ``response`` keep holding text (a v2 episode's documented flattening), so
nothing that reads them changes.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

JsonType = sa.JSON().with_variant(JSONB(), "postgresql")

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A nullable column without a default: PostgreSQL adds it without rewriting the table,
    # SQLite with a plain ALTER TABLE ADD COLUMN.
    op.add_column("episodes", sa.Column("messages", JsonType, nullable=True))


def downgrade() -> None:
    # Batch mode: SQLite drops a column by copying the table (env.py sets render_as_batch).
    with op.batch_alter_table("episodes") as batch:
        batch.drop_column("messages")
