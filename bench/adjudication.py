"""Adjudication of disagreements: how many items it sends to an administrator, what it changes, what it costs.

    python bench/adjudication.py [--items 20000] [--overlap 0.1] [--seeds 5] [--first-seed 0] [--gap 2]
                                 [--db URL] [--json]

Per seed, ``--items`` episodes of one stream are stored as the pipeline stores them (episodes, their
human-channel samples at inclusion probability 0.05, traffic counts); each gets a *true* rating
(1-7) and a true ``incorrect`` flag (15%). Eight simulated reviewers label them: six careful
(rating noise SD 0.8, see 80% of true flags, 5% false flags), one harsh (the same, 1.5 points
lower) and one careless (noise SD 2.5, flags at random 30%). Each item gets one reviewer; an
``--overlap`` share gets two different ones, as ``review.overlap_fraction`` does. Then, through
the product's code:

* ``monitor.quality.adjudication.disagreements`` under ``review.adjudication`` (``--gap``; flags
  disagree): the items sent to adjudication, per 1,000 labelled items and as a share of the
  overlapping ones; the time to list them all, the first 100 (the API's default page) and to
  count them per stream (``waiting_per_stream``: the metrics' gauge and the dashboard);
* a simulated adjudicator (an expert: truth plus noise SD 0.5, the true flag) settles each one
  with ``monitor.review.adjudication.adjudicate``;
* before and after: the mean absolute error against the truth of the adjudicated items' ratings
  and flags as estimates and training read them (``per_item`` / ``rated_records``), and the error
  of the stream's Horvitz-Thompson rating and flag estimates (``monitor.quality.estimates``).

The reviewers here are invented; their noise levels are the ones ``tests/test_reliability.py``
uses. What transfers is the mechanism (which items go to adjudication, and that the final label
replaces the disagreeing ones everywhere it should), not the exact shares.

Prints a table and one JSON line ``{"bench": "adjudication", ...}``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from monitor.quality import estimates as quality_estimates  # noqa: E402
from monitor.quality.adjudication import Rule, disagreements, finals, waiting_per_stream  # noqa: E402
from monitor.quality.labels import label_rows, per_item  # noqa: E402
from monitor.review import adjudication, auth  # noqa: E402
from monitor.reward.update import rated_records  # noqa: E402
from monitor.store import BatchWrite, Store  # noqa: E402
from monitor.store import tables as t  # noqa: E402
from monitor.store.store import bucket_of  # noqa: E402

FLAGS = ["incorrect"]
P = 0.05
REVIEWERS = [("careful", 0.0, 0.8)] * 6 + [("harsh", -1.5, 0.8), ("careless", 0.0, 2.5)]


def clip(x: float) -> int:
    return min(7, max(1, round(x)))


def build(store: Store, n: int, rng: random.Random) -> dict[str, tuple[int, bool]]:
    """Episodes, samples and traffic as the pipeline writes them; the truth per episode."""
    batch = BatchWrite()
    truth: dict[str, tuple[int, bool]] = {}
    ts = 1_700_000_000.0
    for i in range(n):
        eid = f"b{i:06d}"
        truth[eid] = (clip(rng.gauss(4.5, 1.5)), rng.random() < 0.15)
        batch.episodes.append(
            {
                "episode_id": eid,
                "stream": "s",
                "model": "m",
                "ts": ts + i,
                "prompt": f"prompt {i % 500}",
                "response": f"response {i}",
                "metadata": None,
                "source": "bench",
                "position": f"0:{i}",
                "ingested_at": ts + i,
            }
        )
        batch.samples.append(
            {
                "episode_id": eid,
                "channel": "human",
                "stream": "s",
                "ts": ts + i,
                "inclusion_probability": P,
                "created_at": ts + i,
            }
        )
        key = ("s", bucket_of(ts + i))
        batch.traffic[key] = batch.traffic.get(key, 0) + round(1 / P)
    store.commit_batch(batch)
    return truth


def label(
    store: Store, truth: dict[str, tuple[int, bool]], users: list[auth.User], overlap: float, rng: random.Random
) -> None:
    rows = []
    for eid, (rating, flagged) in truth.items():
        k = 2 if rng.random() < overlap else 1
        for j in rng.sample(range(len(users)), k):
            kind, bias, noise = REVIEWERS[j]
            # A careless reviewer flags at random; the others see most true flags.
            flag = rng.random() < (0.3 if kind == "careless" else 0.8 if flagged else 0.05)
            rows.append(
                {
                    "episode_id": eid,
                    "slot": 0,
                    "user_id": users[j].id,
                    "stream": "s",
                    "skipped": False,
                    "rating": clip(rating + bias + rng.gauss(0, noise)),
                    "flags": ["incorrect"] if flag else [],
                    "critique": "",
                    "time_spent_ms": 1000,
                    "created_at": time.time(),
                }
            )
    with store.engine.begin() as conn:
        conn.execute(t.labels.insert(), rows)


def item_errors(store: Store, ids: set[str], truth: dict[str, tuple[int, bool]]) -> dict[str, float]:
    """Mean absolute error of the items' rating and flag share as estimates and training read them."""
    items = per_item(label_rows(store), finals(store))
    est_r = [abs(statistics.fmean(r for r, _ in items[e]["labels"]) - truth[e][0]) for e in ids]
    est_f = [
        abs(sum(1 for _, f in items[e]["labels"] if "incorrect" in f) / len(items[e]["labels"]) - truth[e][1])
        for e in ids
    ]
    per: dict[str, list[float]] = {}
    for r in rated_records(store):
        if r["episode_id"] in ids:
            per.setdefault(r["episode_id"], []).append(float(r["rating"]))
    train = [abs(statistics.fmean(v) - truth[e][0]) for e, v in per.items()]
    return {"rating": statistics.fmean(est_r), "flag": statistics.fmean(est_f), "training": statistics.fmean(train)}


def stream_errors(store: Store, truth: dict[str, tuple[int, bool]]) -> dict[str, float]:
    (row,) = quality_estimates.estimates(store, FLAGS)
    true_rating = statistics.fmean(r for r, _ in truth.values())
    true_flag = statistics.fmean(1.0 if f else 0.0 for _, f in truth.values())
    return {
        "rating": row["rating"]["mean"] - true_rating,
        "flag": row["flags"]["incorrect"]["mean"] - true_flag,
    }


def run_seed(seed: int, args: argparse.Namespace, url: str) -> dict[str, Any]:
    rng = random.Random(seed)
    store = Store(url)
    try:
        pw = auth.hash_password("bench-password-unused")
        with store.engine.begin() as conn:
            conn.execute(
                t.users.insert(),
                [
                    {"name": f"r{j}", "role": "reviewer", "password_hash": pw, "created_at": time.time()}
                    for j in range(len(REVIEWERS))
                ]
                + [{"name": "expert", "role": "admin", "password_hash": pw, "created_at": time.time()}],
            )
        users = {u.name: u for u in auth.list_users(store)}
        truth = build(store, args.items, rng)
        label(store, truth, [users[f"r{j}"] for j in range(len(REVIEWERS))], args.overlap, rng)
        rule = Rule(rating_gap=args.gap)
        t0 = time.perf_counter()
        found = disagreements(store, rule)
        list_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        disagreements(store, rule, limit=100)  # the API's default page
        page_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        waiting_per_stream(store, rule)  # the metrics' gauge and the dashboard
        count_s = time.perf_counter() - t0
        overlapped = _overlapped(store)
        ids = {d.episode_id for d in found}
        before_items = item_errors(store, ids, truth) if ids else {}
        before_stream = stream_errors(store, truth)
        t0 = time.perf_counter()
        for d in found:
            rating, flagged = truth[d.episode_id]
            verdict = adjudication.Verdict(
                clip(rating + rng.gauss(0, 0.5)), ("incorrect",) if flagged else (), note="bench: expert"
            )
            adjudication.adjudicate(store, users["expert"], d.episode_id, verdict, FLAGS, rule)
        adjudicate_s = time.perf_counter() - t0
        after_items = item_errors(store, ids, truth) if ids else {}
        after_stream = stream_errors(store, truth)
        return {
            "seed": seed,
            "labelled": args.items,
            "overlapped": overlapped,
            "disagreements": len(found),
            "by_reason": {r: sum(1 for d in found if r in d.reasons) for r in ("rating", "flags")},
            "list_ms": 1000 * list_s,
            "list_us_per_disagreement": 1e6 * list_s / max(1, len(found)),
            "page_ms": 1000 * page_s,
            "count_ms": 1000 * count_s,
            "adjudicate_ms": 1000 * adjudicate_s / max(1, len(found)),
            "items_before": before_items,
            "items_after": after_items,
            "stream_before": before_stream,
            "stream_after": after_stream,
        }
    finally:
        store.close()


def _overlapped(store: Store) -> int:
    lb = t.labels
    q = sa.select(lb.c.episode_id).group_by(lb.c.episode_id).having(sa.func.count() >= 2).subquery()
    with store.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(q)).scalar_one())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--overlap", type=float, default=0.1)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    ap.add_argument("--gap", type=int, default=2)
    ap.add_argument("--db", default=None, help="a database URL (default: a fresh SQLite file per seed)")
    ap.add_argument("--json", action="store_true", help="only the JSON line")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            url = args.db or f"sqlite:///{Path(tmp) / f'adj{seed}.db'}"
            results.append(run_seed(seed, args, url))

    def mean(path: list[str]) -> float:
        vals = []
        for r in results:
            v: Any = r
            for p in path:
                v = v[p]
            vals.append(float(v))
        return statistics.fmean(vals)

    summary = {
        "bench": "adjudication",
        "items": args.items,
        "overlap": args.overlap,
        "gap": args.gap,
        "seeds": args.seeds,
        "overlapped": mean(["overlapped"]),
        "disagreements": mean(["disagreements"]),
        "per_1000_labelled": 1000 * mean(["disagreements"]) / args.items,
        "share_of_overlapped": mean(["disagreements"]) / max(1.0, mean(["overlapped"])),
        "by_reason": {k: mean(["by_reason", k]) for k in ("rating", "flags")},
        "list_ms": mean(["list_ms"]),
        "list_us_per_disagreement": mean(["list_us_per_disagreement"]),
        "page_ms": mean(["page_ms"]),
        "count_ms": mean(["count_ms"]),
        "adjudicate_ms": mean(["adjudicate_ms"]),
        "items_mae_before": {k: mean(["items_before", k]) for k in ("rating", "flag", "training")},
        "items_mae_after": {k: mean(["items_after", k]) for k in ("rating", "flag", "training")},
        "stream_error_before": {k: mean(["stream_before", k]) for k in ("rating", "flag")},
        "stream_error_after": {k: mean(["stream_after", k]) for k in ("rating", "flag")},
    }
    if not args.json:
        s = summary
        print(f"{args.items} items, overlap {args.overlap}, rating gap {args.gap}, {args.seeds} seeds (means)")
        print(f"  overlapping items        {s['overlapped']:.0f}")
        print(
            f"  sent to adjudication     {s['disagreements']:.0f}"
            f" = {s['per_1000_labelled']:.1f} per 1,000 labelled items"
            f" = {100 * s['share_of_overlapped']:.0f}% of the overlapping"
            f" (rating {s['by_reason']['rating']:.0f}, flags {s['by_reason']['flags']:.0f})"
        )
        print(
            f"  listing all of them      {s['list_ms']:.0f} ms ({s['list_us_per_disagreement']:.0f} us each);"
            f" the first 100 {s['page_ms']:.0f} ms; counting them {s['count_ms']:.0f} ms;"
            f" one adjudication {s['adjudicate_ms']:.1f} ms"
        )
        b, a = s["items_mae_before"], s["items_mae_after"]
        print("  adjudicated items, mean absolute error vs truth: before -> after")
        print(f"    rating (estimates)     {b['rating']:.2f} -> {a['rating']:.2f}")
        print(f"    incorrect flag share   {b['flag']:.2f} -> {a['flag']:.2f}")
        print(f"    rating (training data) {b['training']:.2f} -> {a['training']:.2f}")
        b, a = s["stream_error_before"], s["stream_error_after"]
        print("  stream estimate minus truth: before -> after")
        print(f"    mean rating            {b['rating']:+.3f} -> {a['rating']:+.3f}")
        print(f"    incorrect rate         {b['flag']:+.4f} -> {a['flag']:+.4f}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
