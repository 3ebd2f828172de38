"""Partial indexes of the rows an outbox has still to publish.

In Kafka mode every batch with drift events or scores asks for the outbox's rows not yet
published, oldest first. No index held them apart from the published ones: the read walked the
primary key through every score ever published to find the few that were not, so it grew with
the table (110 ms on SQLite and 40 ms on PostgreSQL a batch at a million scores, and a busy stream
scores millions a day). A partial index holds only the rows still to publish, so the read costs
what is waiting. ``rm_scores`` is read in commit order (``created_at``, the key breaking ties, all in
the index so that no backlog is sorted), ``drift_events`` in id order.

Revision ID: 0019
Revises: 0018
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

UNPUBLISHED = sa.text("published_at IS NULL")


def upgrade() -> None:
    op.create_index(
        "ix_drift_events_unpublished",
        "drift_events",
        ["id"],
        sqlite_where=UNPUBLISHED,
        postgresql_where=UNPUBLISHED,
    )
    op.create_index(
        "ix_rm_scores_unpublished",
        "rm_scores",
        ["created_at", "episode_id", "version"],
        sqlite_where=UNPUBLISHED,
        postgresql_where=UNPUBLISHED,
    )


def downgrade() -> None:
    op.drop_index("ix_rm_scores_unpublished", "rm_scores")
    op.drop_index("ix_drift_events_unpublished", "drift_events")
