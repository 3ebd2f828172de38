"""Every drift event stores what its detector measured (``drift_events.detail``, migration 0009)
and shows it: in the store, ``oversight drift events``, the outbox rows that are published, the
incident payloads of the action worker and the admin page's summary. SQLite and the real
PostgreSQL (a private database per test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from monitor.actions.worker import ActionWorker, incident_overview
from monitor.config import load_settings
from monitor.drift import DriftMonitor, detail_text
from monitor.metrics import Metrics
from monitor.review.routes.pages_admin import dashboard
from monitor.store import BatchWrite, DriftEvent, Store
from monitor.store import tables as t
from monitor.store.store import MIGRATIONS_DIR, bucket_of

T0 = 1_767_225_600.0  # 2026-01-01 00:00 UTC, a Thursday
KEY = b"k" * 32


def _monitor(store: Store, *extra: str) -> DriftMonitor:
    s = load_settings(None, ["dev=true", "drift.fed_reference_size=20", *extra])
    return DriftMonitor(s.drift, store, KEY, Metrics(), boost=lambda *a: None)


def _run(store: Store, mon: DriftMonitor, xs: list[float], step: float) -> list[DriftEvent]:
    """Feed ``xs`` one every ``step`` s of event time, committing every 500 values."""
    for start in range(0, len(xs), 500):
        for i in range(start, min(start + 500, len(xs))):
            mon.observe_value("chat", "rm_score", xs[i], f"e{i}", T0 + step * i, i)
        batch = BatchWrite(traffic={("chat", bucket_of(T0 + step * start)): 500})
        batch.states.update(mon.checkpoint())
        mon.add_rows(batch)
        store.commit_batch(batch)
    return store.drift_events(stream="chat")


def _shifted(n: int, at: int, shift: float, seed: int = 5) -> list[float]:
    rng = np.random.default_rng(seed)
    return [float(rng.standard_normal() + (shift if i >= at else 0.0)) for i in range(n)]


def test_windowed_event_stores_the_shift_with_its_interval(db_url: str) -> None:
    store = Store(db_url)
    mon = _monitor(
        store,
        "drift.signals={rm_score: [windowed]}",
        "drift.seasonal_warmup_s=7200",
        "drift.windows_s=[300, 1800]",
        "drift.detector_params={windowed: {seasonal: 0}}",  # one rolling bucket: hours, not days
    )
    # 4 hours at one value every 2 s; the mean moves by 0.8 SD at 3:00.
    events = _run(store, mon, _shifted(7200, 5400, 0.8), 2.0)
    assert len(events) == 1
    ev = events[0]
    assert ev["detector"] == "windowed" and ev["event_ts"] >= T0 + 3 * 3600
    d = ev["detail"]
    assert d is not None and d["kind"] == "windowed"
    assert d["ci_low"] < d["shift_sd"] < d["ci_high"]
    assert d["ci_low"] < 0.8 < d["ci_high"]  # the true shift, in reference SDs (normal scores)
    assert d["min_shift"] == 0.2 and d["window_s"] in (300.0, 1800.0) and d["n"] >= 30
    assert d["reference"] == "rolling (not seasonal)" and d["ert_s"] > 0 and 0 < d["alpha"] < 1
    assert detail_text(d).startswith(f"shift {d['shift_sd']:+.2f} SD (95% ")
    # What the outbox publishes (the drift topic's payload is the row as JSON) carries it too.
    (row,) = store.unpublished(t.drift_events, 10)
    assert json.loads(json.dumps(row))["detail"] == d
    store.close()


def test_count_detector_event_stores_statistic_threshold_and_ert(db_url: str) -> None:
    store = Store(db_url)
    mon = _monitor(store, "drift.signals={rm_score: [cusum]}")
    events = _run(store, mon, _shifted(600, 300, 1.5), 1.0)
    assert events, "a 1.5 SD shift is found"
    d = events[0]["detail"]
    assert d is not None and d["kind"] == "count"
    assert d["ert"] == mon.ert_each and d["n"] > 20
    assert d["statistic"] == events[0]["statistic"] and d["threshold"] == events[0]["threshold"]
    assert d["statistic"] is not None and d["threshold"] is not None and d["statistic"] >= d["threshold"]
    assert detail_text(d) == f"statistic {d['statistic']:.3g}, threshold {d['threshold']:.3g}, ERT {d['ert']:.0f}"
    store.close()


def _event(i: int, ts: float, detail: dict[str, Any] | None) -> Any:
    return {
        "stream": "chat",
        "signal": "response_log_chars",
        "detector": "windowed",
        "statistic": 0.45,
        "threshold": 0.2,
        "p_val": 1e-9,
        "episode_id": f"e{i}",
        "input_index": i,
        "event_ts": ts,
        "created_at": 1.0 + i,
        "detail": detail,
    }


DETAIL = {
    "kind": "windowed",
    "shift_sd": 0.45,
    "ci_low": 0.38,
    "ci_high": 0.52,
    "min_shift": 0.2,
    "window_s": 3600.0,
    "n": 41000.0,
    "reference": "weekday 14:00 UTC",
}


def test_cli_worker_and_admin_summary_show_the_detail(db_url: str, tmp_path: Path) -> None:
    store = Store(db_url)
    store.commit_batch(
        BatchWrite(
            traffic={("chat", bucket_of(T0 + 7200)): 10, ("quiet", bucket_of(T0)): 3},
            drift_events=[_event(0, T0, DETAIL), _event(1, T0 + 600, None)],
        )
    )
    res = subprocess.run(
        [sys.executable, "-m", "monitor.cli", "drift", "events", "--db", db_url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    newest, first = (json.loads(line) for line in res.stdout.splitlines())
    assert first["detail"] == DETAIL and newest["detail"] is None and newest["size"] == ""
    assert (
        first["size"]
        == "shift +0.45 SD (95% +0.38 to +0.52), minimum 0.20, 41000 values in 60 min, vs weekday 14:00 UTC"
    )
    # The action worker: one incident, both events attached with their detail.
    settings = load_settings(
        None,
        [
            "dev=true",
            f"database.url={db_url}",
            f"reward.models_dir={tmp_path / 'models'}",
            "reward.enabled=false",
            "actions.max_requests_per_stream_per_day=2",
            "drift.false_alarms_per_30d=0.5",
        ],
    )
    assert ActionWorker(settings, store).ingest_events() == 2
    with store.engine.connect() as conn:
        (payload,) = [r.payload for r in conn.execute(sa.select(t.action_requests.c.payload))]
    assert [e["detail"] for e in payload["drift_events"]] == [DETAIL, None]
    # The admin page: per stream, the open incident, incidents in 24 h vs the limit, the budget.
    streams = incident_overview(store, settings)
    assert streams == [
        {
            "stream": "chat",
            "open_incident_since": T0,
            "events_attached": 2,
            "incidents_24h": 1,
            "incident_limit_24h": 2,
            "false_alarms_per_30d": 0.5,
        },
        {
            "stream": "quiet",
            "open_incident_since": None,
            "events_attached": 0,
            "incidents_24h": 0,
            "incident_limit_24h": 2,
            "false_alarms_per_30d": 0.5,
        },
    ]
    from monitor.review.stats import admin_summary

    values = dashboard(admin_summary(store, settings, now=T0 + 7200))
    assert values["drift_streams"] == streams
    assert "size" in values["drift_cols"] and "detail" not in values["drift_cols"]
    assert values["drift"][-1]["size"].startswith("shift +0.45 SD")
    store.close()


def test_incident_closed_by_timeout_is_not_open_on_the_admin_page(db_url: str, tmp_path: Path) -> None:
    store = Store(db_url)
    store.commit_batch(BatchWrite(traffic={("chat", bucket_of(T0 + 3 * 86400)): 5}, drift_events=[_event(0, T0, None)]))
    settings = load_settings(
        None, ["dev=true", f"database.url={db_url}", "reward.enabled=false", "actions.incident_timeout_s=3600"]
    )
    ActionWorker(settings, store).ingest_events()
    (row,) = incident_overview(store, settings)
    assert row["open_incident_since"] is None and row["incidents_24h"] == 0  # three days later
    store.close()


# Later migrations stack on 0009: the upgrade runs to whatever the head is today.
HEAD = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
assert HEAD is not None and HEAD >= "0009"


def _alembic(conn: sa.Connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = conn
    return cfg


def test_migration_0009_adds_and_drops_the_detail_column(db_url: str) -> None:
    old = Store(db_url, migrate=False)
    old.migrate("0008")
    ev = {k: v for k, v in _event(0, T0, None).items() if k != "detail"}
    with old.engine.begin() as conn:
        conn.execute(sa.insert(sa.table("drift_events", *(sa.column(k) for k in ev))).values(**ev))
    old.close()
    store = Store(db_url)  # upgrades to head
    assert store.revision() == HEAD
    (before,) = store.drift_events()
    assert before["detail"] is None and before["episode_id"] == "e0"  # rows from before keep NULL
    store.commit_batch(BatchWrite(drift_events=[_event(1, T0 + 1, DETAIL)]))
    assert store.drift_events()[-1]["detail"] == DETAIL
    with store.engine.begin() as conn:
        command.downgrade(_alembic(conn), "0008")
    assert store.revision() == "0008"
    cols = {c["name"] for c in sa.inspect(store.engine).get_columns("drift_events")}
    assert "detail" not in cols and "published_at" in cols
    with store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM drift_events")).scalar_one() == 2  # rows kept
    store.migrate()
    assert store.revision() == HEAD and store.drift_events()[-1]["detail"] is None
    store.close()
