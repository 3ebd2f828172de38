"""What the review service and the oversight gauges read at production volume: a queue of millions
of waiting tasks (retention keeps a pending task for its whole horizon; without a human budget 1% of
1,000 episodes/s is 864,000 a day) and hundreds of thousands of labels (kept for ever).

    python bench/review_scale.py [--waiting 2000000] [--labels 200000] [--streams 20] [--db sqlite|postgres]

Fills a store straight in SQL (SQLite in a temporary file, or a temporary schema of the ``test``
PostgreSQL database): ``--waiting`` pending review tasks, and ``--labels`` labelled episodes spread
over five reviewers, each with its human sample, an rm sample and a score of an active version.
Then measures, each the median of its repeats:

* a reviewer's claim and label with canaries on (the default), and the item page's reads (the
  progress with the queue ahead, the undo left);
* the review queue's depth per stream (what every scrape of the review service reads);
* a refresh of the oversight gauges, with and without an active version, and the memory it took;
* the admin page's summary (agreement, estimates, queue, incidents), and the memory it took.

Every tenth labelled item has a second label by another reviewer (the default
``review.overlap_fraction``). The labelled episodes span a year of episode time, each with its
traffic minute, as a service that has run that long keeps them; the waiting ones follow.

Prints a table and one JSON line ``{"bench": "review_scale", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from monitor.config import load_settings
from monitor.quality import oversight
from monitor.review import auth, queue, stats, workday
from monitor.store import Store

PG_BASE = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")
REVIEWERS = 5
YEAR_S = 365 * 86400.0


def _series(dialect: str, n: int, start: int = 1) -> tuple[str, str]:
    """A CTE prefix and a FROM clause that give g = start .. start + n - 1."""
    if dialect == "postgresql":
        return "", f"FROM generate_series({start}, {start + n - 1}) AS g"
    return f"WITH RECURSIVE s(g) AS (SELECT {start} UNION ALL SELECT g + 1 FROM s WHERE g < {start + n - 1}) ", "FROM s"


def fill(store: Store, waiting: int, labels: int, streams: int) -> list[auth.User]:
    """The tasks, the labelled episodes and their rows (module docstring); returns the reviewers."""
    users = [auth.create_user(store, f"rev{i}", "reviewer", "correct horse battery") for i in range(REVIEWERS)]
    d = store.dialect
    # Labelled episodes e1..eL over a year of episode time, then the waiting ones eL+1..eL+W, two a second.
    spacing = YEAR_S / labels
    ts = f"(CASE WHEN g <= {labels} THEN g * {spacing} ELSE {labels * spacing} + (g - {labels}) * 0.5 END)"
    with store.engine.begin() as conn:
        pre, src = _series(d, labels + waiting)
        conn.execute(
            sa.text(
                pre + "INSERT INTO episodes (episode_id, stream, model, ts, prompt, response, metadata, source,"
                f" position, ingested_at) SELECT 'e' || g, 's' || (g % {streams}), 'm', {ts}, 'A question?',"
                " 'The answer is yes. It was fine. Paris is in France.', '{}', 't', 'e' || g, g " + src
            )
        )
        pre, src = _series(d, labels)
        for channel, p in (("human", 0.01), ("rm", 0.05)):
            conn.execute(
                sa.text(
                    pre + "INSERT INTO samples (episode_id, channel, stream, ts, inclusion_probability, created_at)"
                    f" SELECT 'e' || g, '{channel}', 's' || (g % {streams}), g * {spacing}, {p}, g " + src
                )
            )
        conn.execute(
            sa.text(
                pre + "INSERT INTO rm_scores (episode_id, version, stream, score, ts, created_at)"
                f" SELECT 'e' || g, 'v1', 's' || (g % {streams}), (g % 97) / 97.0, g * {spacing}, g " + src
            )
        )
        # Each labelled episode's traffic minute (a human sample of 1% stands for 100 episodes).
        conn.execute(
            sa.text(
                pre + "INSERT INTO traffic (stream, bucket, episodes)"
                f" SELECT 's' || (g % {streams}), CAST(g * {spacing} / 60 AS INTEGER) * 60, 100 " + src
            )
        )
        user_of = f"(CASE g % {REVIEWERS} " + " ".join(f"WHEN {i} THEN {u.id}" for i, u in enumerate(users)) + " END)"
        conn.execute(
            sa.text(
                pre + "INSERT INTO labels (episode_id, slot, user_id, stream, skipped, rating, flags, critique,"
                f" time_spent_ms, created_at) SELECT 'e' || g, 0, {user_of}, 's' || (g % {streams}),"
                f" false, 1 + (g % 7), '[]', '', 1000, g * {spacing} " + src
            )
        )
        conn.execute(
            sa.text(
                pre + "INSERT INTO review_tasks (episode_id, slot, stream, status, fence, created_at, done_at)"
                f" SELECT 'e' || g, 0, 's' || (g % {streams}), 'done', 0, g, g " + src
            )
        )
        # The default overlap (review.overlap_fraction 0.1): every tenth item reviewed a second time,
        # by the next reviewer, sometimes with another rating.
        second = (
            f"(CASE (g + 1) % {REVIEWERS} " + " ".join(f"WHEN {i} THEN {u.id}" for i, u in enumerate(users)) + " END)"
        )
        conn.execute(
            sa.text(
                pre + "INSERT INTO labels (episode_id, slot, user_id, stream, skipped, rating, flags, critique,"
                f" time_spent_ms, created_at) SELECT 'e' || g, 1, {second}, 's' || (g % {streams}),"
                f" false, 1 + ((g / 10) % 7), '[]', '', 1000, g * {spacing} + 1 " + src + " WHERE g % 10 = 0"
            )
        )
        pre, src = _series(d, waiting, labels + 1)
        conn.execute(
            sa.text(
                pre + "INSERT INTO review_tasks (episode_id, slot, stream, status, fence, created_at)"
                f" SELECT 'e' || g, 0, 's' || (g % {streams}), 'pending', 0, g " + src
            )
        )
    with store.engine.connect() as conn:
        conn.execute(sa.text("ANALYZE"))
        conn.commit()
    return users


def timed(fn: Callable[[], object], repeat: int) -> float:
    """The median of ``repeat`` runs, in milliseconds."""
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return statistics.median(out)


def measure(store: Store, users: list[auth.User], claims: int) -> dict[str, Any]:
    canaries = load_settings(None, ["dev=true"]).review.canaries
    reviewer = users[0]
    claim_ms = []
    for _ in range(claims):
        t0 = time.perf_counter()
        item = queue.claim(store, reviewer, 600, b"bench-key" * 4, canaries=canaries)
        claim_ms.append((time.perf_counter() - t0) * 1000)
        assert item is not None
        c = item.claim
        queue.submit(store, reviewer, c.episode_id, c.slot, c.fence, queue.LabelIn(rating=4), [])
    out: dict[str, Any] = {
        "claim_ms_median": statistics.median(claim_ms),
        "claim_ms_max": max(claim_ms),
        "progress_ms": timed(lambda: workday.progress(store, reviewer), 5),
        "undo_left_ms": timed(lambda: workday.undo_left(store, reviewer, 30.0), 5),
        "queue_depth_ms": timed(lambda: queue.queue_depth(store), 3),
    }
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out["gauges_ms"] = timed(lambda: oversight.compute(store, None), 3)
    out["gauges_with_version_ms"] = timed(lambda: oversight.compute(store, "v1"), 3)
    out["gauges_peak_rss_growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    settings = load_settings(None, ["dev=true"])
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out["admin_summary_ms"] = timed(lambda: stats.admin_summary(store, settings), 1)
    out["admin_summary_peak_rss_growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--waiting", type=int, default=2_000_000)
    ap.add_argument("--labels", type=int, default=200_000)
    ap.add_argument("--streams", type=int, default=20)
    ap.add_argument("--claims", type=int, default=40)
    ap.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    args = ap.parse_args()
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_BASE, isolation_level="AUTOCOMMIT") if args.db == "postgres" else None
    with tempfile.TemporaryDirectory() as tmp:
        if admin is not None:
            with admin.connect() as conn:
                conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
            url = f"{PG_BASE}?options=-csearch_path%3D{schema}"
        else:
            url = f"sqlite:///{Path(tmp) / 'scale.db'}"
        try:
            store = Store(url)
            t0 = time.perf_counter()
            users = fill(store, args.waiting, args.labels, args.streams)
            fill_s = time.perf_counter() - t0
            res = measure(store, users, args.claims)
            store.close()
        finally:
            if admin is not None:
                with admin.connect() as conn:
                    conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
                admin.dispose()
    size = f"{args.waiting:,} waiting tasks, {args.labels:,} labels in {args.streams} streams"
    print(f"{args.db}: {size} (filled in {fill_s:.0f} s)")
    for key, value in res.items():
        print(f"  {key:34s} {value:10.1f}")
    print(json.dumps({"bench": "review_scale", "db": args.db, "waiting": args.waiting, "labels": args.labels, **res}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
