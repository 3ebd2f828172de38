"""The retention purge (``monitor/store/retention.py``) on a large store: rows deleted per second,
and the size of the store before and after.

    python bench/retention.py [--episodes 200000] [--days 30] [--keep-days 7] [--db URL]

Fills a fresh database (SQLite in a temporary folder by default, or ``--db``, which must be
empty) with what the service stores for ``--episodes`` sampled episodes spread over ``--days`` of
event time in 4 streams: each episode with 1-2 samples, an rm score for half of them, its traffic
minute, and a label with a done review task for 1 in 50. Then purges to ``--keep-days`` and prints
the rows deleted, the seconds, and for SQLite the file's size (after VACUUM) before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from monitor.config import RetentionConfig
from monitor.store import Store
from monitor.store import tables as t
from monitor.store.retention import purge
from monitor.store.store import bucket_of

BASE = 1_767_225_600.0
STREAMS = 4


def fill(store: Store, n: int, days: float, seed: int = 0) -> None:
    rng = random.Random(seed)
    span = days * 86400.0
    texts = ["".join(rng.choice("abcdefgh ") for _ in range(rng.randint(200, 2000))) for _ in range(500)]
    with store.engine.begin() as conn:
        uid = conn.execute(
            t.users.insert()
            .values(name="ann", role="reviewer", password_hash="x", created_at=1.0)
            .returning(t.users.c.id)
        ).scalar_one()
    traffic: dict[tuple[str, int], int] = {}
    for start in range(0, n, 5000):
        episodes, samples, scores, tasks, labels = [], [], [], [], []
        for i in range(start, min(n, start + 5000)):
            stream = f"s{i % STREAMS}"
            ts = BASE + span * i / n
            eid = f"e{i}"
            text = rng.choice(texts)
            episodes.append(
                {"episode_id": eid, "stream": stream, "model": "m", "ts": ts, "prompt": text[:200], "response": text}
                | {"metadata": None, "source": "bench", "position": f"0:{i}", "ingested_at": ts, "messages": None}
            )
            channels = ["rm"] if i % 3 else ["rm", "drift"]
            if i % 50 == 0:
                channels.append("human")
                tasks.append({"episode_id": eid, "slot": 0, "stream": stream, "status": "done", "created_at": ts})
                labels.append(
                    {"episode_id": eid, "slot": 0, "user_id": uid, "stream": stream, "skipped": False, "rating": 5}
                    | {"flags": [], "critique": "", "time_spent_ms": 1000, "created_at": ts}
                )
            for ch in channels:
                samples.append(
                    {"episode_id": eid, "channel": ch, "stream": stream, "ts": ts, "inclusion_probability": 0.1}
                    | {"status": "scored", "created_at": ts}
                )
            if i % 2 == 0:
                scores.append(
                    {"episode_id": eid, "version": "v1", "stream": stream, "score": 0.5, "ts": ts, "created_at": ts}
                )
            key = (stream, bucket_of(ts))
            traffic[key] = traffic.get(key, 0) + 10
        with store.engine.begin() as conn:
            for table, rows in (
                (t.episodes, episodes),
                (t.samples, samples),
                (t.rm_scores, scores),
                (t.review_tasks, tasks),
                (t.labels, labels),
            ):
                if rows:
                    conn.execute(table.insert(), rows)
    with store.engine.begin() as conn:
        conn.execute(t.traffic.insert(), [{"stream": s, "bucket": b, "episodes": c} for (s, b), c in traffic.items()])


def sqlite_mb(store: Store) -> float | None:
    url = store.engine.url
    if url.get_backend_name() != "sqlite" or not url.database:
        return None
    conn = sqlite3.connect(url.database, isolation_level=None)  # VACUUM runs outside a transaction
    try:
        conn.execute("VACUUM")
    finally:
        conn.close()
    return round(os.path.getsize(url.database) / 1e6, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--episodes", type=int, default=200_000)
    ap.add_argument("--days", type=float, default=30.0)
    ap.add_argument("--keep-days", type=float, default=7.0)
    ap.add_argument("--chunk", type=int, default=1000)
    ap.add_argument("--db", help="an empty database (default: SQLite in a temporary folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(args.db or f"sqlite:///{tmp}/bench.db")
        t0 = time.perf_counter()
        fill(store, args.episodes, args.days)
        filled_s = time.perf_counter() - t0
        before_mb = sqlite_mb(store)
        t0 = time.perf_counter()
        purged = purge(store, RetentionConfig(days=args.keep_days, chunk=args.chunk))
        took = time.perf_counter() - t0
        rows = sum(purged.deleted.values())
        print(
            json.dumps(
                {
                    "backend": store.dialect,
                    "episodes": args.episodes,
                    "days": args.days,
                    "keep_days": args.keep_days,
                    "fill_s": round(filled_s, 1),
                    "purge_s": round(took, 2),
                    "deleted": purged.deleted,
                    "rows_per_s": round(rows / took) if took > 0 else None,
                    "episodes_per_s": round(purged.deleted["episodes"] / took) if took > 0 else None,
                    "sqlite_mb_before": before_mb,
                    "sqlite_mb_after": sqlite_mb(store),
                }
            )
        )
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
