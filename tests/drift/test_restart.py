"""Restart mid-window through the DriftMonitor's checkpoints (signed detector snapshots committed
with each batch), on SQLite and the real PostgreSQL: the same alarms as without a restart."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from monitor.config import load_settings
from monitor.drift import DriftMonitor
from monitor.metrics import Metrics
from monitor.store import BatchWrite, Store

T0 = 1_767_225_600.0  # 2026-01-01 00:00 UTC
KEY = b"k" * 32


def _monitor(store: Store) -> DriftMonitor:
    s = load_settings(
        None,
        [
            "dev=true",
            "drift.signals={rm_score: [windowed]}",
            "drift.fed_reference_size=20",
            "drift.seasonal_warmup_s=7200",
            "drift.windows_s=[300, 1800]",
        ],
    )
    return DriftMonitor(s.drift, store, KEY, Metrics(), boost=lambda *a: None)


def _values() -> tuple[list[float], list[float]]:
    """Two days at one value every 4 s; the mean moves by 1 SD at 40:07 (inside a 5-minute window)."""
    rng = np.random.default_rng(3)
    ts = [T0 + 4.0 * i for i in range(2 * 86400 // 4)]
    xs = [float(rng.standard_normal() + (t >= T0 + 40 * 3600 + 420)) for t in ts]
    return ts, xs


def _feed(store: Store, ts: list[float], xs: list[float], batches: list[range], restart_at: int | None) -> list[int]:
    mon = _monitor(store)
    found: list[int] = []
    for b, rng in enumerate(batches):
        if restart_at is not None and b == restart_at:
            mon = _monitor(store)  # a new process: state only from the database
        for i in rng:
            mon.observe_value("chat", "rm_score", xs[i], f"e{i}", ts[i], i)
        batch = BatchWrite()
        batch.states.update(mon.checkpoint())
        mon.add_rows(batch)
        found += [int(e["input_index"]) for e in batch.drift_events]
        store.commit_batch(batch)
    return found


def test_restart_mid_window_gives_the_same_alarms(db_url: str, tmp_path: Path) -> None:
    ts, xs = _values()
    step = 997  # batches end at odd places: inside windows and folds
    batches = [range(i, min(i + step, len(ts))) for i in range(0, len(ts), step)]
    cut = next(b for b, r in enumerate(batches) if ts[r.start] > T0 + 40 * 3600)  # after the change
    whole = _feed(Store(f"sqlite:///{tmp_path / 'whole.db'}"), ts, xs, batches, None)
    restarted = _feed(Store(db_url), ts, xs, batches, cut)
    assert whole and restarted == whole
    assert ts[whole[0]] >= T0 + 40 * 3600 + 420
