"""What a label rated: ``labels.rated``, ``final_turn`` or ``conversation`` for a label of a
conversation (schema v2), NULL for a label of a v1 episode, a skip, and every row written before
this revision.

Before it, what was rated was kept as one more ``rated:...`` entry of the label's ``flags``; that
was never released (no released database holds such an entry), so no data moves here.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A nullable column without a default: PostgreSQL adds it without rewriting the table,
    # SQLite with a plain ALTER TABLE ADD COLUMN.
    op.add_column("labels", sa.Column("rated", sa.String(16), nullable=True))


def downgrade() -> None:
    # Batch mode: SQLite drops a column by copying the table (env.py sets render_as_batch).
    with op.batch_alter_table("labels") as batch:
        batch.drop_column("rated")
