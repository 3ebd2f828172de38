"""SQLite's write-ahead log checkpointed on a thread of its own, off the ingest loop.

In WAL mode a commit appends pages to the ``-wal`` file; a *checkpoint* copies them back into the
database file and syncs both. SQLite runs one inside the commit that takes the log past
``wal_autocheckpoint`` pages, so with its default (1,000 pages) every few batches of the pipeline
paid a copy and two fsyncs on the ingest thread: 9-10 us of every record on the steady file path
(``bench/hot_path.py``; the commits' time 0.29 -> 0.10 s a 20,000-record run without them).

:class:`WalCheckpointer` checkpoints every ``interval_s`` from its own connection instead, in
``PASSIVE`` mode: it copies what no reader still needs and never waits for, or blocks, a writer or
a reader. sqlite3 releases the interpreter lock while SQLite works, so the copy and the syncs
overlap the ingest loop. The connections' own threshold is raised to ``INLINE_CHECKPOINT_PAGES``
(``monitor.store.store``): a safety net, reached only when this thread falls behind or is not running
(``oversight serve``, the CLI's commands), so the log stays bounded either way.

Durability is unchanged: with ``synchronous=NORMAL`` a commit in WAL mode was never synced, and
a checkpoint syncs the log before it copies.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from dataclasses import dataclass

from monitor.metrics import Metrics
from monitor.retry import first_line
from monitor.store.periodic import PeriodicJob

log = logging.getLogger("monitor.store")


@dataclass(frozen=True)
class Checkpoint:
    """What one ``PRAGMA wal_checkpoint(PASSIVE)`` reported: ``busy`` (another checkpoint ran), the
    log's pages, and how many of them are now in the database file."""

    busy: bool
    log_pages: int
    checkpointed: int


class WalCheckpointer(PeriodicJob):
    """Checkpoints the SQLite database at ``path`` every ``interval_s`` on a daemon thread.

    A failed round (the file gone, a disk full, a lock held past ``timeout_s``) is counted and
    logged once per kind of error, and the next round tries again. Metrics:
    ``oversight_sqlite_checkpoints_total{outcome}`` (``ok``, ``failed``; pre-zeroed) and
    ``oversight_sqlite_wal_pages`` (the log's pages at the last round)."""

    name = "sqlite-checkpoint"
    first_now = False  # nothing to checkpoint yet when the service starts

    def __init__(self, path: str, metrics: Metrics | None = None, *, interval_s: float = 0.5, timeout_s: float = 5.0):
        super().__init__(interval_s)
        self.path = path
        self.metrics = metrics
        self.timeout_s = timeout_s
        self._conn: sqlite3.Connection | None = None
        self._failed_before: set[str] = set()  # exception classes already logged
        if metrics is not None:
            for outcome in ("ok", "failed"):
                metrics.sqlite_checkpoints.labels(outcome)

    def run_once(self) -> Checkpoint | None:
        """One checkpoint; None when it failed (counted and logged)."""
        try:
            if self._conn is None:
                # Autocommit (isolation_level None): a checkpoint cannot run inside a transaction.
                self._conn = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
            row = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as e:
            self._failed(e)
            return None
        done = Checkpoint(bool(row[0]), int(row[1]), int(row[2]))
        if self.metrics is not None:
            self.metrics.sqlite_checkpoints.labels("ok").inc()
            self.metrics.sqlite_wal_pages.set(max(done.log_pages, 0))
        return done

    def _failed(self, e: sqlite3.Error) -> None:
        if self.metrics is not None:
            self.metrics.sqlite_checkpoints.labels("failed").inc()
        kind = type(e).__name__
        level = logging.DEBUG if kind in self._failed_before else logging.WARNING
        self._failed_before.add(kind)
        log.log(level, "sqlite checkpoint failed (retried in %.1f s): %s", self.every_s, first_line(e))
        self._close_connection()  # a fresh one next round: the file may have been replaced

    def finish(self) -> None:
        self._close_connection()

    def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
