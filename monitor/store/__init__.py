"""The review-queue store: tables, migrations, batch commits and queries."""

from monitor.store.store import BatchWrite, StaleOffsets, Store, normalize_url

__all__ = ["BatchWrite", "StaleOffsets", "Store", "normalize_url"]
