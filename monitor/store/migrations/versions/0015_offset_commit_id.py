"""The commit id of the batch that last moved an offset.

A batch's transaction can commit on the server while the connection dies before the client
hears so (the database crashed, or the network broke, between COMMIT and its reply). The
retry then finds the offsets moved: without a way to tell, the consumer took its own commit
for another consumer's, rolled the batch back in its memory and counted it as a stale batch,
so its statistics and metrics lost the batch and a false "competing consumer" showed. Each
batch writes a random id with its offsets; a refused compare-and-set that finds that id is
the batch's own commit, whose acknowledgement was lost.

Revision ID: 0015
Revises: 0014
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: rows written before this revision, and by tools that set an offset by hand,
    # carry none (and so never match a batch's id).
    op.add_column("offsets", sa.Column("commit_id", sa.String(32), nullable=True))


def downgrade() -> None:
    # Batch mode: SQLite drops a column by copying the table (env.py sets render_as_batch).
    with op.batch_alter_table("offsets") as batch:
        batch.drop_column("commit_id")
