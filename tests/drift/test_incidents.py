"""Incident hygiene of the action worker: alarms while an incident is open attach to it (no new
request), an incident closes by timeout or by an applied re-reference, and new incidents per stream
are rate-limited, with the limits in metrics. SQLite and the real PostgreSQL."""

from __future__ import annotations

import time
from pathlib import Path

import sqlalchemy as sa

from monitor.actions.worker import ActionWorker
from monitor.config import Settings, load_settings
from monitor.drift import request_rereference
from monitor.metrics import Metrics
from monitor.store import BatchWrite, Store
from monitor.store import requests as rq
from monitor.store import tables as t

T0 = 1_767_225_600.0
HOUR = 3600.0


def _settings(db_url: str, tmp_path: Path, *extra: str) -> Settings:
    return load_settings(
        None,
        [
            "dev=true",
            f"database.url={db_url}",
            f"reward.models_dir={tmp_path / 'models'}",
            "actions.incident_gap_s=600",
            "actions.incident_timeout_s=21600",
            *extra,
        ],
    )


def _event(store: Store, i: int, ts: float, signal: str = "response_log_chars") -> None:
    store.commit_batch(
        BatchWrite(
            drift_events=[
                {
                    "stream": "chat",
                    "signal": signal,
                    "detector": "windowed",
                    "statistic": 0.4,
                    "threshold": 0.2,
                    "p_val": 1e-9,
                    "episode_id": f"e{i}",
                    "input_index": i,
                    "event_ts": ts,
                    "created_at": time.time(),
                }
            ]
        )
    )


def _sample(m: Metrics, outcome: str) -> float | None:
    return m.registry.get_sample_value("oversight_incidents_total", {"outcome": outcome})


def test_alarms_attach_to_the_open_incident_until_it_times_out(db_url: str, tmp_path: Path) -> None:
    store, metrics = Store(db_url), Metrics()
    worker = ActionWorker(_settings(db_url, tmp_path), store, metrics)
    assert _sample(metrics, "rate_limited") == 0  # pre-zeroed
    # An alarm, then one every hour for 5 hours (beyond incident_gap_s, within the timeout).
    for i in range(6):
        _event(store, i, T0 + i * HOUR, signal=["response_log_chars", "refusal"][i % 2])
        worker.ingest_events()
    reqs = rq.listing(store, kind="rm_update")
    assert len(reqs) == 1
    assert len(reqs[0]["payload"]["drift_events"]) == 6
    assert rq.listing(store, kind="retrain") == []
    assert _sample(metrics, "opened") == 1 and _sample(metrics, "attached") == 5
    # Quiet for longer than the timeout: the next alarm opens a new incident.
    _event(store, 6, T0 + 5 * HOUR + 21600 + 1)
    worker.ingest_events()
    assert len(rq.listing(store, kind="rm_update")) == 2
    assert _sample(metrics, "closed_timeout") == 1
    old = next(r for r in rq.listing(store, kind="rm_update") if r["payload"]["since"] == T0)
    assert old["payload"]["closed"] == "timeout"


def test_an_applied_rereference_closes_the_incident(db_url: str, tmp_path: Path) -> None:
    store, metrics = Store(db_url), Metrics()
    worker = ActionWorker(_settings(db_url, tmp_path), store, metrics)
    _event(store, 0, T0)
    worker.ingest_events()
    rid = request_rereference(store, "chat", None, "policy v2 acknowledged", "tester")
    _event(store, 1, T0 + 60)  # found before the re-reference was applied: same incident
    worker.ingest_events()
    assert len(rq.listing(store, kind="rm_update")) == 1
    time.sleep(0.01)
    with store.engine.begin() as conn:  # what the drift monitor does when it applies it
        conn.execute(t.drift_audit.update().where(t.drift_audit.c.id == rid).values(applied_at=time.time()))
    time.sleep(0.01)
    _event(store, 2, T0 + 120)  # against the new reference: a new incident
    worker.ingest_events()
    assert len(rq.listing(store, kind="rm_update")) == 2
    assert _sample(metrics, "closed_rereference") == 1


def test_new_incidents_are_rate_limited_per_stream(db_url: str, tmp_path: Path) -> None:
    store, metrics = Store(db_url), Metrics()
    settings = _settings(
        db_url, tmp_path, "actions.incident_timeout_s=600", "actions.max_requests_per_stream_per_day=2"
    )
    worker = ActionWorker(settings, store, metrics)
    assert metrics.registry.get_sample_value("oversight_incident_limit_per_stream_per_day") == 2
    for i in range(5):  # 5 alarms 2 h apart: each would be a new incident
        _event(store, i, T0 + i * 2 * HOUR)
        worker.ingest_events()
    assert len(rq.listing(store, kind="rm_update")) == 2
    assert _sample(metrics, "opened") == 2 and _sample(metrics, "rate_limited") == 3
    assert metrics.registry.get_sample_value("oversight_incidents_last_day", {"stream": "chat"}) == 2
    # A day later the stream may open an incident again.
    _event(store, 9, T0 + 30 * HOUR)
    worker.ingest_events()
    assert len(rq.listing(store, kind="rm_update")) == 3
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(t.drift_events)).scalar_one() == 6
