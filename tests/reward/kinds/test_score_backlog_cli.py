"""``oversight rm score-backlog`` as users run it (subprocesses, a real database, the STAND-IN judge
server): stream filter, limit, counts of scored/failed/deferred, exit codes, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa
from standin import StandIn

from monitor.config import Settings, load_settings
from monitor.reward.kinds import KindVersion
from monitor.reward.registry import Registry
from monitor.store import Store
from monitor.store import tables as t

OVERSIGHT = [sys.executable, "-m", "monitor.cli"]


def _waiting(store: Store, stream: str, n: int) -> None:
    """n episodes of ``stream`` sampled for the rm channel, without a score (the backlog)."""
    now = time.time()
    eps = [
        {
            "episode_id": f"{stream}-{i}",
            "stream": stream,
            "model": "policy",
            "ts": 1000.0 + i,
            "prompt": "Q?",
            "response": "A" * (10 * i),
            "metadata": {},
            "source": "test",
            "position": f"{stream}-{i}",
            "ingested_at": now,
        }
        for i in range(n)
    ]
    samples = [
        {
            "episode_id": e["episode_id"],
            "channel": "rm",
            "stream": stream,
            "ts": e["ts"],
            "inclusion_probability": 1.0,
            "created_at": now + i,
        }
        for i, e in enumerate(eps)
    ]
    with store.engine.begin() as conn:
        conn.execute(t.episodes.insert(), eps)
        conn.execute(t.samples.insert(), samples)


def test_score_backlog_command(tmp_path: Path, judge_standin: StandIn) -> None:
    db, models = f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "models"
    common = ["--dev", "--db", db, "--set", f"reward.models_dir={models}"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [*OVERSIGHT, "rm", "score-backlog", *args, *common]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)

    store = Store(db)
    registry = Registry.for_settings(store, _settings(db, models))
    _waiting(store, "chat", 12)
    _waiting(store, "code", 3)

    r = run()
    assert r.returncode == 1 and "no active reward-model version" in r.stderr and "Traceback" not in r.stderr
    judge = {
        "base_url": f"{judge_standin.url}/v1",
        "model": "stand-in",
        "resilience": {"max_attempts": 1, "backoff_s": 0.01, "breaker_failures": 100},
    }
    version = registry.register(KindVersion.create("judge", judge), data_window={}, metrics={})
    registry.promote(version)
    r = run("--limit", "0")
    assert r.returncode == 2 and "--limit" in r.stderr and "Traceback" not in r.stderr
    # --version names a reward-model version (it once printed the package's and exited 0).
    r = run("--version", "nope")
    assert r.returncode == 1 and "no registered version nope" in r.stderr and "Traceback" not in r.stderr

    # The endpoint fails: every item tried stays waiting, counted; exit 1, one JSON object.
    judge_standin.script.mode = "fail"
    r = run("--stream", "chat", "--limit", "4")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    out = json.loads(r.stdout)
    assert (out["scored"], out["failed"], out["deferred"], out["waiting"]) == (0, 4, 8, 12)

    # Back up: a limited run scores the oldest first and defers the rest; the stream filter holds.
    judge_standin.script.mode = "ok"
    r = run("--stream", "chat", "--limit", "5", "--batch", "2", "--version", version)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["scored"], out["failed"], out["deferred"], out["version"]) == (5, 0, 7, version)
    with store.engine.connect() as conn:
        ids = set(conn.execute(sa.select(t.rm_scores.c.episode_id)).scalars())
    assert ids == {f"chat-{i}" for i in range(5)}
    r = run("--progress")
    assert r.returncode == 0 and "scored" in r.stderr
    out = json.loads(r.stdout)
    assert (out["scored"], out["waiting"], out["before"]) == (10, 0, 10)
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(t.rm_scores)).scalar_one() == 15
    store.close()


def _settings(db: str, models: Path) -> Settings:
    return load_settings(None, ["dev=true", f"database.url={db}", f"reward.models_dir={models}"])
