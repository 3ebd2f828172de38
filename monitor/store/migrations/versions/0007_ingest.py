"""The HTTP ingest API: the embedded hand-off's ``inbox`` and the ingest bearer tokens.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

JsonType = sa.JSON().with_variant(JSONB(), "postgresql")

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "inbox",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("episode_id", sa.String(128), nullable=False, unique=True),
        sa.Column("stream", sa.String(128), nullable=False),
        sa.Column("raw", sa.LargeBinary, nullable=False),
        sa.Column("received_at", sa.Float, nullable=False),
        # SQLite: never reuse a deleted highest id (the consumer's position is an id).
        sqlite_autoincrement=True,
    )
    op.create_table(
        "ingest_tokens",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("streams", JsonType),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float),
    )


def downgrade() -> None:
    op.drop_table("ingest_tokens")
    op.drop_table("inbox")
