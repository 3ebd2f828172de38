"""What a drift event measured: ``drift_events.detail``, a JSON object per event.

For a ``windowed`` (time-budgeted) detector: the estimated shift in reference SDs with its 95%
interval, the window's length and end, the values in it, the reference bucket and the minimum
shift of interest; for a count detector (CUSUM & co.): its statistic, threshold and the ERT it
ran at. So a person can judge the size of a change, not just that one happened. NULL on every
row written before this revision.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable, no default: PostgreSQL adds it without rewriting the table, SQLite with ADD COLUMN.
    op.add_column("drift_events", sa.Column("detail", sa.JSON().with_variant(JSONB(), "postgresql"), nullable=True))


def downgrade() -> None:
    # Batch mode: SQLite drops a column by copying the table (env.py sets render_as_batch).
    with op.batch_alter_table("drift_events") as batch:
        batch.drop_column("detail")
