"""Database work counted, not timed: SQLite's own virtual-machine steps.

A read that grows with the rows kept is found by doing the same work beside few and many rows and
comparing the steps, which do not depend on how busy the machine is."""

from __future__ import annotations

import sqlite3
from typing import Any

import sqlalchemy as sa

from monitor.store import Store

__all__ = ["StepCounter"]


class StepCounter:
    """Counts, in thousands, the steps of every connection ``store`` (SQLite) checks out from now on."""

    def __init__(self, store: Store) -> None:
        self.steps = 0

        @sa.event.listens_for(store.engine, "checkout")
        def _watch(dbapi: Any, *_: Any) -> None:
            assert isinstance(dbapi, sqlite3.Connection)
            dbapi.set_progress_handler(self._count, 1000)

        store.engine.dispose()  # connections made before the listener are not watched

    def _count(self) -> int:
        self.steps += 1
        return 0
