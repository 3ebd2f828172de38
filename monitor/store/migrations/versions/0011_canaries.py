"""Canaries: perturbed copies of stored episodes mixed blind into reviewers' queues, their labels,
and the assistance condition of every label.

``canaries``: one row per canary handed to one reviewer (its shown id, the source episode, the
perturbation kind, the presentation and a lease like ``review_tasks``). ``canary_labels``: the
reviewer's answer, kept apart from ``labels`` so that no estimate, training set, drift signal or
agreement statistic can read it. ``labels.assist_experiment`` / ``labels.assist_condition``: the
assistance experiment and condition a label was given under (NULL without an experiment, and on
every row written before this revision).

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

JsonType = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "canaries",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
        sa.Column("episode_id", sa.String(128), sa.ForeignKey("episodes.episode_id"), nullable=False),
        sa.Column("stream", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("presentation", sa.String(16), nullable=False),
        sa.Column("perturbed", sa.Text, nullable=False),
        sa.Column("detail", JsonType, nullable=False),
        sa.Column("alternative_first", sa.Boolean, nullable=False),
        sa.Column("shown_ts", sa.Float, nullable=False),
        sa.Column("seed", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("lease_expires_at", sa.Float),
        sa.Column("fence", sa.Integer, nullable=False, server_default="0"),
        sa.Column("guidelines_version", sa.Integer),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("done_at", sa.Float),
    )
    op.create_index("ix_canaries_user_status", "canaries", ["user_id", "status"])
    op.create_table(
        "canary_labels",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("canary_id", sa.String(128), sa.ForeignKey("canaries.id"), nullable=False),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
        sa.Column("episode_id", sa.String(128), nullable=False),
        sa.Column("stream", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("presentation", sa.String(16), nullable=False),
        sa.Column("skipped", sa.Boolean, nullable=False),
        sa.Column("skip_reason", sa.String(500)),
        sa.Column("rating", sa.Integer),
        sa.Column("flags", JsonType, nullable=False),
        sa.Column("critique", sa.Text, nullable=False),
        sa.Column("preference", sa.String(16)),
        sa.Column("time_spent_ms", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("rated", sa.String(16)),
        sa.Column("guidelines_version", sa.Integer),
        sa.Column("assist_experiment", sa.String(32)),
        sa.Column("assist_condition", sa.String(32)),
        sa.UniqueConstraint("canary_id", "user_id", name="uq_canary_labels_canary_user"),
    )
    op.create_index("ix_canary_labels_user_created", "canary_labels", ["user_id", "created_at"])
    # Nullable, no default: PostgreSQL adds them without rewriting the table, SQLite with ADD COLUMN.
    op.add_column("labels", sa.Column("assist_experiment", sa.String(32), nullable=True))
    op.add_column("labels", sa.Column("assist_condition", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("labels") as batch:
        batch.drop_column("assist_condition")
        batch.drop_column("assist_experiment")
    op.drop_index("ix_canary_labels_user_created", table_name="canary_labels")
    op.drop_table("canary_labels")
    op.drop_index("ix_canaries_user_status", table_name="canaries")
    op.drop_table("canaries")
