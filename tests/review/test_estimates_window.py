"""Estimates over all traffic cover each stream's last ``quality.window_days`` of traffic (event
time), so what they read follows the labels of that window, not every label ever kept."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from review_helpers import API, Env
from sqlite_steps import StepCounter

from monitor.config import load_settings
from monitor.quality import oversight
from monitor.quality.estimates import estimates
from monitor.quality.labels import label_rows
from monitor.quality.window import quality_windows, stream_windows
from monitor.review.auth import create_user
from monitor.review.label_stats import compute
from monitor.store import BatchWrite, Store
from monitor.store import tables as t
from monitor.store.store import bucket_of

DAY = 86400.0
T0 = 1_700_000_000.0  # event time of the streams' first traffic minute


def _labelled(
    store: Store, user_id: int, stream: str, day: float, n: int, rating: int, tag: str, traffic: bool = True
) -> None:
    """``n`` episodes of ``stream`` at ``day`` (event time), each sampled for review at p = 0.5
    and labelled ``rating``, and (``traffic``) their traffic counts (two episodes a minute: one sampled)."""
    batch = BatchWrite()
    labels: list[dict[str, Any]] = []
    for i in range(n):
        ts = T0 + day * DAY + 60 * i
        eid = f"{stream}-{tag}-{i}"
        batch.episodes.append(
            {"episode_id": eid, "stream": stream, "model": "m", "ts": ts, "prompt": "p", "response": "r",
             "metadata": {}, "source": "t", "position": eid, "ingested_at": ts}
        )  # fmt: skip
        batch.samples.append(
            {"episode_id": eid, "channel": "human", "stream": stream, "ts": ts, "inclusion_probability": 0.5,
             "created_at": ts}
        )  # fmt: skip
        if traffic:
            batch.traffic[(stream, bucket_of(ts))] = 2
        labels.append(
            {"episode_id": eid, "slot": 0, "user_id": user_id, "stream": stream, "skipped": False, "rating": rating,
             "flags": ["harmful"] if rating == 1 else [], "critique": "", "time_spent_ms": 1000, "created_at": ts}
        )  # fmt: skip
    store.commit_batch(batch)
    with store.engine.begin() as conn:
        conn.execute(t.labels.insert(), labels)


def _traffic(store: Store, stream: str, day: float) -> None:
    """One traffic minute of ``stream`` at ``day`` with nothing sampled."""
    batch = BatchWrite()
    batch.traffic[(stream, bucket_of(T0 + day * DAY))] = 2
    store.commit_batch(batch)


def _by_stream(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["stream"]: r for r in rows}


def test_each_stream_is_estimated_over_its_own_last_days_of_traffic(db_url: str) -> None:
    store = Store(db_url)
    user = create_user(store, "rev", "reviewer", "correct horse battery")
    # "chat": rated 1 (and flagged) on day 0, 7 on day 35; its traffic runs to day 40.
    _labelled(store, user.id, "chat", 0, 10, 1, "old")
    _labelled(store, user.id, "chat", 35, 10, 7, "new")
    _traffic(store, "chat", 40)
    # "quiet": labelled on day 1 only, and its traffic ended on day 2: its window is its own last
    # 30 days of traffic, not the last 30 days of the other stream or of the wall clock.
    _labelled(store, user.id, "quiet", 1, 6, 4, "only")

    windows = stream_windows(store, 30.0)
    assert windows is not None
    chat_end = bucket_of(T0 + 40 * DAY) + 60
    assert windows["chat"] == chat_end - 30 * DAY
    assert windows["quiet"] < T0 + DAY

    est = _by_stream(estimates(store, ["harmful"], label_rows(store, windows=windows), windows=windows))
    assert est["chat"]["n_labelled"] == 10 and est["chat"]["rating"]["mean"] == pytest.approx(7.0)
    assert est["chat"]["flags"]["harmful"]["mean"] == pytest.approx(0.0)
    # The population is the window's traffic: the day-35 minutes (2 episodes each) and day 40's.
    assert est["chat"]["population"] == 10 * 2 + 2
    assert est["chat"]["window_start"] == windows["chat"]
    assert est["quiet"]["n_labelled"] == 6 and est["quiet"]["rating"]["mean"] == pytest.approx(4.0)

    every = _by_stream(estimates(store, ["harmful"]))
    assert every["chat"]["n_labelled"] == 20 and every["chat"]["rating"]["mean"] == pytest.approx(4.0)
    assert every["chat"]["population"] == 42 and every["chat"]["window_start"] is None

    # The quality gauge covers the same window: the database's sums, and the reliability fit.
    for weighting in (False, True):
        gauges = oversight.compute(store, None, reliability_weighting=weighting, windows=windows)
        assert gauges["chat"]["quality"]["mean"] == pytest.approx(7.0), weighting
        assert oversight.compute(store, None, reliability_weighting=weighting)["chat"]["quality"]["mean"] == (
            pytest.approx(4.0)
        )
    store.close()


def test_a_timestamp_beyond_the_future_limit_does_not_move_the_window(tmp_path: Any) -> None:
    """A traffic minute stamped in the far future (stored before ``source.max_future_s`` existed)
    would put the window's end there and every label before it."""
    store = Store(f"sqlite:///{tmp_path / 'w.db'}")
    user = create_user(store, "rev", "reviewer", "correct horse battery")
    _labelled(store, user.id, "chat", 0, 4, 5, "now")
    _traffic(store, "chat", 3650)
    now = T0 + DAY
    settings = load_settings(None, ["dev=true", "source.max_future_s=300"])
    windows = quality_windows(store, settings, now)
    assert windows is not None and windows["chat"] < T0
    assert _by_stream(estimates(store, [], windows=windows))["chat"]["n_labelled"] == 4
    # Without the limit the far-future minute sets the end, and the labels fall out of the window.
    unbounded = stream_windows(store, 30.0)
    assert unbounded is not None and unbounded["chat"] > T0 + DAY
    assert estimates(store, [], windows=unbounded) == []
    store.close()


def test_a_stream_without_traffic_counts_ends_its_window_at_its_latest_sample(tmp_path: Any) -> None:
    """Rows written by other means than the pipeline (an import of an old store, a test's fixture)
    may have no traffic minutes: their window ends at the stream's latest human sample."""
    store = Store(f"sqlite:///{tmp_path / 'w.db'}")
    user = create_user(store, "rev", "reviewer", "correct horse battery")
    _labelled(store, user.id, "bare", 0, 3, 2, "old", traffic=False)
    _labelled(store, user.id, "bare", 50, 3, 6, "new", traffic=False)
    windows = stream_windows(store, 30.0)
    assert windows == {"bare": bucket_of(T0 + 50 * DAY + 120) + 60 - 30 * DAY}
    (est,) = estimates(store, [], windows=windows)
    assert est["n_labelled"] == 3 and est["rating"]["mean"] == pytest.approx(6.0) and est["population"] == 0
    store.close()


def test_the_setting_null_counts_every_label(tmp_path: Any) -> None:
    store = Store(f"sqlite:///{tmp_path / 'w.db'}")
    user = create_user(store, "rev", "reviewer", "correct horse battery")
    _labelled(store, user.id, "chat", 0, 5, 1, "old")
    _labelled(store, user.id, "chat", 60, 5, 7, "new")
    windowed = compute(store, load_settings(None, ["dev=true"]), time.time())
    every = compute(store, load_settings(None, ["dev=true", "quality.window_days=null"]), time.time())
    assert windowed.window_days == 30.0 and every.window_days is None
    assert windowed.estimates[0]["n_labelled"] == 5 and every.estimates[0]["n_labelled"] == 10
    assert [p["n"] for p in windowed.series["chat"]] == [5]  # the chart: day 60's hour alone
    assert sum(p["n"] for p in every.series["chat"]) == 10
    store.close()


def _summary_steps(tmp_path: Any, old: int) -> int:
    """SQLite steps (thousands) of the admin summary's computation: 200 labels in the window,
    beside ``old`` labels of the same stream from before it."""
    store = Store(f"sqlite:///{tmp_path / f's{old}.db'}")
    user = create_user(store, "rev", "reviewer", "correct horse battery")
    _labelled(store, user.id, "chat", 0, old, 3, "old")
    _labelled(store, user.id, "chat", 100, 200, 5, "new")
    with store.engine.begin() as conn:
        conn.execute(sa.text("ANALYZE"))
    settings = load_settings(None, ["dev=true"])
    counter = StepCounter(store)
    stats = compute(store, settings, time.time())
    assert stats.estimates[0]["n_labelled"] == 200
    store.close()
    return counter.steps


def test_the_summary_reads_the_window_not_every_label_kept(tmp_path: Any) -> None:
    """Counted in the database's own steps: with 20,000 labels from before the window the
    summary does the work it does with 200 (it read and grouped every label: 10 s and 280 MB of
    the review service at 200,000)."""
    few, many = _summary_steps(tmp_path, 200), _summary_steps(tmp_path, 20_000)
    assert many < 2 * few, (few, many)


def test_the_admin_api_shows_the_window(make_review_env: Callable[..., Env]) -> None:
    env = make_review_env()
    env.user("root", "admin")
    user = env.user("alice")
    _labelled(env.store, user.id, "chat", 0, 4, 1, "old")
    _labelled(env.store, user.id, "chat", 45, 4, 7, "new")
    admin = env.client("root")
    summary = admin.get(f"{API}/admin/summary").json()
    assert summary["labels_window_days"] == 30.0
    (est,) = summary["estimates"]
    assert est["n_labelled"] == 4 and est["rating"]["mean"] == pytest.approx(7.0)
    assert est["window_start"] == bucket_of(T0 + 45 * DAY + 180) + 60 - 30 * DAY
    points = admin.get(f"{API}/admin/estimates/series", params={"stream": "chat"}).json()
    assert [p["n"] for p in points] == [4]
    assert admin.get(f"{API}/admin/estimates/series", params={"stream": "other"}).json() == []
