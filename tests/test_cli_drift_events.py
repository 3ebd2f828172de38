"""``oversight drift events`` as users run it (a subprocess) on SQLite and the real PostgreSQL:
newest first, one stream's, at most ``--limit``."""

from __future__ import annotations

import json
import subprocess
import sys

from monitor.store import BatchWrite, Store
from monitor.store.store import bucket_of


def _seed(db_url: str) -> None:
    store = Store(db_url)
    store.commit_batch(
        BatchWrite(
            traffic={("chat", bucket_of(100.0)): 10, ("code", bucket_of(100.0)): 5},
            drift_events=[
                {
                    "stream": stream,
                    "signal": "response_log_chars",
                    "detector": "page_hinkley",
                    "statistic": 12.0,
                    "threshold": 10.0,
                    "p_val": None,
                    "episode_id": eid,
                    "input_index": i,
                    "event_ts": 100.0 + i,
                    "created_at": 1.0,
                }
                for i, (stream, eid) in enumerate([("chat", "c1"), ("code", "k1"), ("chat", "c2"), ("chat", "c3")])
            ],
        )
    )
    store.close()


def _events(db_url: str, *args: str) -> list[dict[str, object]]:
    res = subprocess.run(
        [sys.executable, "-m", "monitor.cli", "drift", "events", "--db", db_url, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    return [json.loads(line) for line in res.stdout.splitlines()]


def test_drift_events_lists_newest_first_by_stream_and_limit(db_url: str) -> None:
    _seed(db_url)
    every = _events(db_url)
    assert [e["episode_id"] for e in every] == ["c3", "c2", "k1", "c1"]
    assert every[0]["stream"] == "chat" and every[0]["input_index"] == 3 and every[0]["published_at"] is None
    assert [e["episode_id"] for e in _events(db_url, "--stream", "chat", "--limit", "2")] == ["c3", "c2"]
    assert [e["episode_id"] for e in _events(db_url, "--stream", "code")] == ["k1"]
