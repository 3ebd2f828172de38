"""Human review: users, sessions, API tokens, login failures, review tasks, labels.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

JsonType = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("disabled", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "auth_sessions",
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
        sa.Column("csrf", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float),
    )
    op.create_table(
        "api_tokens",
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float),
    )
    op.create_table(
        "login_failures",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("address", sa.String(64), nullable=False),
        sa.Column("at", sa.Float, nullable=False),
    )
    op.create_index("ix_login_failures_name_at", "login_failures", ["name", "at"])
    op.create_index("ix_login_failures_address_at", "login_failures", ["address", "at"])
    op.create_table(
        "review_tasks",
        sa.Column("episode_id", sa.String(128), sa.ForeignKey("episodes.episode_id"), primary_key=True),
        sa.Column("slot", sa.Integer, primary_key=True),
        sa.Column("stream", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("lease_user_id", sa.Integer),
        sa.Column("lease_expires_at", sa.Float),
        sa.Column("fence", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("done_at", sa.Float),
    )
    op.create_index("ix_review_tasks_status_created", "review_tasks", ["status", "created_at"])
    op.create_index("ix_review_tasks_stream_status", "review_tasks", ["stream", "status"])
    op.create_table(
        "labels",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("episode_id", sa.String(128), sa.ForeignKey("episodes.episode_id"), nullable=False),
        sa.Column("slot", sa.Integer, nullable=False),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
        sa.Column("stream", sa.String(128), nullable=False),
        sa.Column("skipped", sa.Boolean, nullable=False),
        sa.Column("skip_reason", sa.String(500)),
        sa.Column("rating", sa.Integer),
        sa.Column("flags", JsonType, nullable=False),
        sa.Column("critique", sa.Text, nullable=False),
        sa.Column("preference", sa.String(16)),
        sa.Column("time_spent_ms", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.UniqueConstraint("episode_id", "user_id", name="uq_labels_episode_user"),
    )
    op.create_index("ix_labels_stream_created", "labels", ["stream", "created_at"])


def downgrade() -> None:
    op.drop_table("labels")
    op.drop_table("review_tasks")
    op.drop_table("login_failures")
    op.drop_table("api_tokens")
    op.drop_table("auth_sessions")
    op.drop_table("users")
