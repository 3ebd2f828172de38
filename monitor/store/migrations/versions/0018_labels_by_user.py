"""An index of the labels by reviewer and time.

Every claim with canaries on (the default) counts the reviewer's labels (the canary draw's claim
number), and every item page counts her labels of the day. No index began with the reviewer, so
each read every label: at 20,000 labels ten claims did 25 times the database work of ten at 200,
and labels are kept for ever.

Revision ID: 0018
Revises: 0017
"""

from __future__ import annotations

from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_labels_user_created", "labels", ["user_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_labels_user_created", "labels")
