"""The inference backlogs: a sample's ``status`` says whether its model work is done.

From this revision the service embeds drift samples off the ingest path (inference workers): a
drift sample commits ``pending`` and the batch that feeds its embedding to the detectors marks it
``embedded`` (``monitor/store/inference.py``). Drift samples committed before this revision were
embedded inline in their own batch, or never will be (embeddings off): they are marked embedded,
so that no worker feeds months-old traffic to a detector after the upgrade.

Likewise an rm or human sample is marked ``scored`` when a reward-model score of its episode
commits (``Store.record_scores``): the score backlog is then an index range, not a scan of every
sample ever taken against ``rm_scores``. Those already scored are marked here.

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("UPDATE samples SET status = 'embedded' WHERE channel = 'drift' AND status = 'pending'")
    op.execute(
        "UPDATE samples SET status = 'scored' WHERE channel IN ('rm', 'human') AND status = 'pending'"
        " AND EXISTS (SELECT 1 FROM rm_scores r WHERE r.episode_id = samples.episode_id)"
    )


def downgrade() -> None:
    op.execute("UPDATE samples SET status = 'pending' WHERE status IN ('embedded', 'scored')")
