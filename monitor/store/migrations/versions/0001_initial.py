"""Streaming core: sampled episodes, samples (review queue), traffic, offsets, stream state.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JsonType = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "episodes",
        sa.Column("episode_id", sa.String(128), primary_key=True),
        sa.Column("stream", sa.String(128), nullable=False),
        sa.Column("model", sa.String(256)),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("prompt", sa.Text, nullable=False),
        sa.Column("response", sa.Text, nullable=False),
        sa.Column("metadata", JsonType),
        sa.Column("source", sa.String(512), nullable=False),
        sa.Column("position", sa.String(64), nullable=False),
        sa.Column("ingested_at", sa.Float, nullable=False),
    )
    op.create_index("ix_episodes_stream_ts", "episodes", ["stream", "ts"])
    op.create_table(
        "samples",
        sa.Column("episode_id", sa.String(128), sa.ForeignKey("episodes.episode_id"), primary_key=True),
        sa.Column("channel", sa.String(16), primary_key=True),
        sa.Column("stream", sa.String(128), nullable=False),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("inclusion_probability", sa.Float, nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ix_samples_stream_channel_ts", "samples", ["stream", "channel", "ts"])
    op.create_index("ix_samples_channel_status", "samples", ["channel", "status"])
    op.create_table(
        "traffic",
        sa.Column("stream", sa.String(128), primary_key=True),
        sa.Column("bucket", sa.BigInteger, primary_key=True),
        sa.Column("episodes", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "offsets",
        sa.Column("source", sa.String(255), primary_key=True),
        sa.Column("partition", sa.Integer, primary_key=True),
        sa.Column("next_offset", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "stream_state",
        sa.Column("stream", sa.String(128), primary_key=True),
        sa.Column("component", sa.String(64), primary_key=True),
        sa.Column("state", JsonType, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("stream_state")
    op.drop_table("offsets")
    op.drop_table("traffic")
    op.drop_index("ix_samples_channel_status", table_name="samples")
    op.drop_index("ix_samples_stream_channel_ts", table_name="samples")
    op.drop_table("samples")
    op.drop_index("ix_episodes_stream_ts", table_name="episodes")
    op.drop_table("episodes")
