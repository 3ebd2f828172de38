"""An index of the reward-model scores by version, stream and time.

The oversight gauges, refreshed every few seconds, read per stream the first and the last
``actions.oversight_window`` scores of the active version. Through ``ix_rm_scores_stream_ts``
that scan passes every older version's scores of the stream first; with this index it reads
the window and nothing else, and the streams a version scored are found by one seek each.

Revision ID: 0017
Revises: 0016
"""

from __future__ import annotations

from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_rm_scores_version_stream_ts", "rm_scores", ["version", "stream", "ts"])


def downgrade() -> None:
    op.drop_index("ix_rm_scores_version_stream_ts", "rm_scores")
