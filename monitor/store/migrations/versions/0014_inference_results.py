"""Inference results: the model work of inference workers that run as a process of their own.

With ``inference.external`` the pipeline loads no model: ``oversight infer`` (its own Deployment
in the chart, GPU-capable, scaled on its own) claims waiting drift and rm/human samples, computes
their embeddings and scores, and stores them here; the pipeline feeds the stored results to the
detectors and marks the samples in its batch's transaction, which deletes the rows. A row is a
claim (``worker``, ``claimed_until``) until it is ``done``: workers never compute the same item
at once, and a claim whose worker died expires.

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "inference_results",
        sa.Column("episode_id", sa.String(128), primary_key=True),
        sa.Column("stage", sa.String(16), primary_key=True),
        sa.Column("worker", sa.String(128), nullable=False),
        sa.Column("claimed_until", sa.Float, nullable=False),
        sa.Column("done", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("version", sa.String(128)),
        sa.Column("score", sa.Float),
        sa.Column("vector", sa.LargeBinary),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ix_inference_results_stage_done", "inference_results", ["stage", "done"])


def downgrade() -> None:
    op.drop_index("ix_inference_results_stage_done", table_name="inference_results")
    op.drop_table("inference_results")
