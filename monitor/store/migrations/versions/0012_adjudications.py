"""Adjudications: an administrator's final label of an item whose reviewers disagreed.

Append-only (a later row of the same episode supersedes the earlier one, kept as the audit
trail). Estimates over all traffic and reward-model training data read an adjudicated item's
newest row in place of its labels; agreement statistics keep reading the labels.

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

JsonType = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "adjudications",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("episode_id", sa.String(128), sa.ForeignKey("episodes.episode_id"), nullable=False),
        sa.Column("stream", sa.String(128), nullable=False),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
        sa.Column("rating", sa.Integer, nullable=False),
        sa.Column("flags", JsonType, nullable=False),
        sa.Column("preference", sa.String(16)),
        sa.Column("note", sa.Text, nullable=False),
        sa.Column("label_ids", JsonType, nullable=False),
        sa.Column("reasons", JsonType, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ix_adjudications_episode", "adjudications", ["episode_id"])
    op.create_index("ix_adjudications_stream_created", "adjudications", ["stream", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_adjudications_stream_created", table_name="adjudications")
    op.drop_index("ix_adjudications_episode", table_name="adjudications")
    op.drop_table("adjudications")
