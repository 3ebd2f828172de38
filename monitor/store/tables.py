"""Table definitions (SQLAlchemy Core). Migrations in ``migrations/`` create them."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

metadata = sa.MetaData()

JsonType = sa.JSON().with_variant(JSONB(), "postgresql")

# Sampled episodes only (any channel); the bulk of traffic is counted, not kept.
episodes = sa.Table(
    "episodes",
    metadata,
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
    sa.Index("ix_episodes_stream_ts", "stream", "ts"),
)

# One row per (episode, channel) that sampled it; the human rows are the review queue.
samples = sa.Table(
    "samples",
    metadata,
    sa.Column("episode_id", sa.String(128), sa.ForeignKey("episodes.episode_id"), primary_key=True),
    sa.Column("channel", sa.String(16), primary_key=True),
    sa.Column("stream", sa.String(128), nullable=False),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("inclusion_probability", sa.Float, nullable=False),
    sa.Column("status", sa.String(16), nullable=False, server_default="pending"),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Index("ix_samples_stream_channel_ts", "stream", "channel", "ts"),
    sa.Index("ix_samples_channel_status", "channel", "status"),
)

# Episodes per stream per minute of event time: the population size N that
# Horvitz-Thompson estimates over all traffic need.
traffic = sa.Table(
    "traffic",
    metadata,
    sa.Column("stream", sa.String(128), primary_key=True),
    sa.Column("bucket", sa.BigInteger, primary_key=True),
    sa.Column("episodes", sa.BigInteger, nullable=False),
)

# Next offset to consume per source partition, written in the same
# transaction as the rows it produced: the database, not Kafka, is the
# source of truth for what has been processed.
offsets = sa.Table(
    "offsets",
    metadata,
    sa.Column("source", sa.String(255), primary_key=True),
    sa.Column("partition", sa.Integer, primary_key=True),
    sa.Column("next_offset", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

# Per-stream state checkpoint (sampling clock, budget, boosts; detectors later).
stream_state = sa.Table(
    "stream_state",
    metadata,
    sa.Column("stream", sa.String(128), primary_key=True),
    sa.Column("component", sa.String(64), primary_key=True),
    sa.Column("state", JsonType, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)
