"""Drift detection: drift events (an outbox for publishing too) and the re-reference audit trail.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "drift_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("stream", sa.String(128), nullable=False),
        sa.Column("signal", sa.String(64), nullable=False),
        sa.Column("detector", sa.String(32), nullable=False),
        sa.Column("statistic", sa.Float),
        sa.Column("threshold", sa.Float),
        sa.Column("p_val", sa.Float),
        sa.Column("episode_id", sa.String(128), nullable=False),
        sa.Column("input_index", sa.BigInteger, nullable=False),
        sa.Column("event_ts", sa.Float, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("published_at", sa.Float),
        sa.UniqueConstraint("stream", "signal", "episode_id", name="uq_drift_events_stream_signal_episode"),
    )
    op.create_index("ix_drift_events_stream_created", "drift_events", ["stream", "created_at"])
    op.create_table(
        "drift_audit",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("stream", sa.String(128), nullable=False),
        sa.Column("signal", sa.String(64)),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("reason", sa.String(500), nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("applied_at", sa.Float),
    )


def downgrade() -> None:
    op.drop_table("drift_audit")
    op.drop_index("ix_drift_events_stream_created", table_name="drift_events")
    op.drop_table("drift_events")
