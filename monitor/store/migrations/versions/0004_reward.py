"""Reward model registry, scores (an outbox for publishing too) and action requests.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

JsonType = sa.JSON().with_variant(JSONB(), "postgresql")

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rm_versions",
        sa.Column("version", sa.String(64), primary_key=True),
        sa.Column("parent", sa.String(64)),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("data_window", JsonType, nullable=False),
        sa.Column("metrics", JsonType, nullable=False),
        sa.Column("gate", JsonType),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("promoted_at", sa.Float),
    )
    op.create_table(
        "rm_active",
        sa.Column("stream_set", sa.String(64), primary_key=True),
        sa.Column("version", sa.String(64), sa.ForeignKey("rm_versions.version"), nullable=False),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "rm_scores",
        sa.Column("episode_id", sa.String(128), sa.ForeignKey("episodes.episode_id"), primary_key=True),
        sa.Column("version", sa.String(64), primary_key=True),
        sa.Column("stream", sa.String(128), nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("published_at", sa.Float),
    )
    op.create_index("ix_rm_scores_stream_ts", "rm_scores", ["stream", "ts"])
    op.create_table(
        "action_requests",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("stream", sa.String(128)),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("payload", JsonType, nullable=False),
        sa.Column("result", JsonType),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_error", sa.String(1000)),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.UniqueConstraint("kind", "key", name="uq_action_requests_kind_key"),
    )


def downgrade() -> None:
    op.drop_table("action_requests")
    op.drop_index("ix_rm_scores_stream_ts", "rm_scores")
    op.drop_table("rm_scores")
    op.drop_table("rm_active")
    op.drop_table("rm_versions")
