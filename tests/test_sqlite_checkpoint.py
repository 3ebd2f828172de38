"""SQLite's write-ahead log is checkpointed by the service's own thread (monitor/store/wal.py), not
inside the ingest loop's commits."""

from __future__ import annotations

import logging
import shutil
import sqlite3
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from monitor.config import load_settings
from monitor.metrics import Metrics
from monitor.service import build_service
from monitor.store import Store
from monitor.store.store import INLINE_CHECKPOINT_PAGES
from monitor.store.wal import WalCheckpointer

PAGE = 4096


def _write(store: Store, n: int, size: int = 64_000, start: int = 0) -> None:
    """``n`` internal-state rows of about ``size`` bytes each, one commit each."""
    for i in range(start, start + n):
        store.save_internal(f"bench:{i}", {"blob": f"{i:08d}" * (size // 8)})


def _rows_in_the_file_alone(db: Path, tmp: Path) -> int:
    """The rows the database file holds without its log: a copy of the file alone, as a
    checkpoint has left it (a commit not yet checkpointed lives only in ``-wal``)."""
    copy = tmp / f"copy-{time.monotonic_ns()}.db"
    shutil.copyfile(db, copy)
    conn = sqlite3.connect(copy)
    try:
        if conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'internal_state'").fetchone()[0] == 0:
            return 0  # not even the schema has reached the file
        return int(conn.execute("SELECT count(*) FROM internal_state WHERE key LIKE 'bench:%'").fetchone()[0])
    finally:
        conn.close()


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def test_commits_leave_checkpoints_to_the_thread_which_moves_them_into_the_file(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    store = Store(f"sqlite:///{db}")
    try:
        # 8 MB of commits: past SQLite's own threshold (1,000 pages, where a commit would have
        # checkpointed inline), below the raised one.
        _write(store, 128)
        assert 1000 * PAGE < 128 * 64_000 < INLINE_CHECKPOINT_PAGES * PAGE
        assert _rows_in_the_file_alone(db, tmp_path) == 0  # no commit checkpointed
        registry = CollectorRegistry()
        checkpointer = WalCheckpointer(str(db), Metrics(registry), interval_s=0.05).start()
        try:
            deadline = time.monotonic() + 30
            while _value(registry, "oversight_sqlite_checkpoints_total", outcome="ok") < 1:
                assert time.monotonic() < deadline, "no checkpoint in 30 s"
                time.sleep(0.02)
            assert _rows_in_the_file_alone(db, tmp_path) == 128
            assert _value(registry, "oversight_sqlite_wal_pages") >= 128 * 64_000 // PAGE
            # Later commits reach the file too, while the writer goes on (PASSIVE: it never waits).
            _write(store, 16, start=128)
            deadline = time.monotonic() + 30
            while _rows_in_the_file_alone(db, tmp_path) < 144:
                assert time.monotonic() < deadline, "later commits never reached the database file"
                time.sleep(0.05)
        finally:
            checkpointer.stop()
        assert not checkpointer.running
        assert _value(registry, "oversight_sqlite_checkpoints_total", outcome="failed") == 0
    finally:
        store.close()


def test_a_failed_round_is_counted_logged_once_and_the_next_one_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "later" / "s.db"  # its folder does not exist yet: the file cannot be opened
    registry = CollectorRegistry()
    checkpointer = WalCheckpointer(str(db), Metrics(registry))
    assert _value(registry, "oversight_sqlite_checkpoints_total", outcome="failed") == 0  # pre-zeroed
    with caplog.at_level(logging.DEBUG, logger="monitor.store"):
        assert checkpointer.run_once() is None
        assert checkpointer.run_once() is None
    assert _value(registry, "oversight_sqlite_checkpoints_total", outcome="failed") == 2
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "sqlite checkpoint failed" in warned[0].getMessage()
    store = Store(f"sqlite:///{db}")  # the folder and the database appear
    try:
        _write(store, 4, size=8_000)
        done = checkpointer.run_once()
        assert done is not None and not done.busy and done.checkpointed == done.log_pages > 0
        assert _rows_in_the_file_alone(db, tmp_path) == 4
        assert _value(registry, "oversight_sqlite_checkpoints_total", outcome="ok") == 1
    finally:
        checkpointer.stop()
        store.close()


def test_the_service_checkpoints_a_sqlite_store_and_stops_with_it(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text("")
    settings = load_settings(
        None,
        [
            "dev=true",
            f"database.url=sqlite:///{tmp_path}/svc.db",
            f"dead_letter.path={tmp_path}/dlq.jsonl",
            f"source.path={tmp_path}/in.jsonl",
            "drift.enabled=false",
            "inference.workers=false",
        ],
    )
    svc = build_service(settings, serve=False, registry=CollectorRegistry(), background_calibration=True)
    try:
        assert svc.checkpointer is not None and svc.checkpointer.running
        assert svc.checkpointer.path == str(tmp_path / "svc.db")
    finally:
        svc.close()
    assert not svc.checkpointer.running
    # Not where there is no log to checkpoint: replays (no service loop), PostgreSQL, memory.
    with build_service(settings, serve=False, registry=CollectorRegistry(), background_calibration=False) as other:
        assert other.checkpointer is None
    assert Store("sqlite://").sqlite_file is None
    assert Store("postgresql+psycopg://nobody@127.0.0.1:1/none", migrate=False).sqlite_file is None
