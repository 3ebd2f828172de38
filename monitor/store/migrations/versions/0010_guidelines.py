"""Reviewer guidelines per stream, versioned; each label records the version it was given under.

``guidelines``: one row per saved version of a stream's guidelines (Markdown, rendered with the
review app's escaping renderer); a save never overwrites, so a label's version can always be read
back. ``review_tasks.guidelines_version``: the stream's version when the task was claimed;
``labels.guidelines_version``: the same, copied on submit. NULL when the stream had none, and on
every row written before this revision.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "guidelines",
        sa.Column("stream", sa.String(128), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("markdown", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("created_by", sa.String(64), nullable=False),
    )
    # Nullable, no default: PostgreSQL adds it without rewriting the table, SQLite with ADD COLUMN.
    op.add_column("labels", sa.Column("guidelines_version", sa.Integer, nullable=True))
    # The version in effect when the task was claimed; the label copies it on submit.
    op.add_column("review_tasks", sa.Column("guidelines_version", sa.Integer, nullable=True))


def downgrade() -> None:
    # Batch mode: SQLite drops a column by copying the table (env.py sets render_as_batch).
    with op.batch_alter_table("review_tasks") as batch:
        batch.drop_column("guidelines_version")
    with op.batch_alter_table("labels") as batch:
        batch.drop_column("guidelines_version")
    op.drop_table("guidelines")
