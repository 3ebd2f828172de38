"""The review-queue store: tables, migrations, batch commits and queries."""

from monitor.store.rows import DriftEvent, DriftEventRow, EpisodeRow, ReviewTaskRow, RmScoreRow, SampleRow
from monitor.store.store import (
    BatchWrite,
    EpisodeIdConflict,
    Pool,
    Replication,
    SchemaMismatch,
    StaleOffsets,
    Store,
    normalize_url,
)

__all__ = [
    "BatchWrite",
    "DriftEvent",
    "DriftEventRow",
    "EpisodeIdConflict",
    "EpisodeRow",
    "Pool",
    "Replication",
    "ReviewTaskRow",
    "RmScoreRow",
    "SampleRow",
    "SchemaMismatch",
    "StaleOffsets",
    "Store",
    "normalize_url",
]
