"""Admin statistics: queue, throughput, inter-annotator agreement, estimates over all traffic.

Estimates of human-rated quality and flag rates use the labelled items of the
human channel weighted by their inclusion probabilities. Only part of the
sampled items is labelled at any time, so the ratio (Hajek) estimator is used:
it needs no population count, and treats which sampled items got labelled so
far as unrelated to their labels (the queue is served oldest first).

Ratings (1-7) and flag rates (0-1) are bounded, so their intervals are the score
intervals of :func:`sampling.bounded_interval`: inside the scale, and never a point
when every label agrees (no flag in 30 labels is a rate below about 11%, not 0%).
"""

from __future__ import annotations

import math
import statistics
import time
from collections import defaultdict
from typing import Any

import sqlalchemy as sa

from monitor.config import Settings
from monitor.review.queue import queue_depth
from monitor.store import Store
from monitor.store import tables as t
from sampling import horvitz_thompson


def krippendorff_alpha_interval(units: list[list[float]]) -> float | None:
    """Krippendorff's alpha with the interval metric; units with fewer than 2 values are ignored."""
    units = [u for u in units if len(u) >= 2]
    n = sum(len(u) for u in units)
    if n < 2:
        return None
    d_o = 0.0
    for u in units:
        m = len(u)
        d_o += sum((a - b) ** 2 for i, a in enumerate(u) for j, b in enumerate(u) if i != j) / (m - 1)
    d_o /= n
    values = [v for u in units for v in u]
    d_e = sum((a - b) ** 2 for i, a in enumerate(values) for j, b in enumerate(values) if i != j) / (n * (n - 1))
    if d_e == 0:
        return None  # every rating identical: no variation to agree on
    return 1.0 - d_o / d_e


def cohen_kappa(pairs: list[tuple[bool, bool]]) -> float | None:
    """Cohen's kappa for two binary ratings per item."""
    n = len(pairs)
    if n == 0:
        return None
    po = sum(1 for a, b in pairs if a == b) / n
    pa = sum(1 for a, _ in pairs if a) / n
    pb = sum(1 for _, b in pairs if b) / n
    pe = pa * pb + (1 - pa) * (1 - pb)
    if pe == 1.0:
        # Both reviewers gave the same answer to every item (e.g. never used the flag):
        # agreement is not measurable, and 1.0 would overstate it.
        return None
    return (po - pe) / (1 - pe)


def _labels(store: Store, since: float | None = None) -> list[Any]:
    lb, s = t.labels, t.samples
    q = (
        sa.select(
            lb.c.episode_id,
            lb.c.stream,
            lb.c.user_id,
            lb.c.rating,
            lb.c.flags,
            lb.c.skipped,
            lb.c.time_spent_ms,
            lb.c.created_at,
            s.c.inclusion_probability,
            s.c.ts,
        )
        .join(s, sa.and_(s.c.episode_id == lb.c.episode_id, s.c.channel == "human"))
        .order_by(lb.c.episode_id, lb.c.id)
    )
    if since is not None:
        q = q.where(lb.c.created_at >= since)
    with store.engine.connect() as conn:
        return list(conn.execute(q).all())


def label_rows(store: Store) -> list[Any]:
    """Every label with its inclusion probability (one read for several estimates)."""
    return _labels(store)


RATING_BOUNDS = (1.0, 7.0)
FLAG_BOUNDS = (0.0, 1.0)


def _finite(d: dict[str, Any]) -> dict[str, Any]:
    """NaN/inf (no labels) become None."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _per_item(rows: list[Any]) -> dict[str, dict[str, Any]]:
    """Non-skipped labels grouped by episode: mean rating, flag shares, probability, stream, ts."""
    items: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r.skipped:
            continue
        it = items.setdefault(
            r.episode_id, {"stream": r.stream, "p": float(r.inclusion_probability), "ts": float(r.ts), "labels": []}
        )
        it["labels"].append((int(r.rating), set(r.flags or [])))
    return items


def estimates(store: Store, flags: list[str], rows: list[Any] | None = None) -> list[dict[str, Any]]:
    rows = _labels(store) if rows is None else rows
    by_stream: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for it in _per_item(rows).values():
        by_stream[it["stream"]].append(it)
    out = []
    for stream in sorted(by_stream):
        items = by_stream[stream]
        probs = [it["p"] for it in items]
        rating = horvitz_thompson(
            [statistics.fmean(r for r, _ in it["labels"]) for it in items], probs, bounds=RATING_BOUNDS
        )
        flag_est = {}
        for f in flags:
            vals = [sum(1 for _, fl in it["labels"] if f in fl) / len(it["labels"]) for it in items]
            flag_est[f] = _finite(horvitz_thompson(vals, probs, bounds=FLAG_BOUNDS).to_dict())
        out.append(
            {
                "stream": stream,
                "population": store.traffic_count(stream),
                "n_labelled": len(items),
                "rating": _finite(rating.to_dict()),
                "flags": flag_est,
            }
        )
    return out


def estimate_series(
    store: Store, stream: str, bucket_s: int = 3600, rows: list[Any] | None = None
) -> list[dict[str, Any]]:
    """The rating estimate per time bucket of episode time (for the chart). Pass ``rows``
    (from :func:`label_rows`) to chart several streams from one read of the labels."""
    buckets: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for it in _per_item(_labels(store) if rows is None else rows).values():
        if it["stream"] == stream:
            buckets[int(it["ts"] // bucket_s) * bucket_s].append(it)
    out = []
    for start in sorted(buckets):
        items = buckets[start]
        est = horvitz_thompson(
            [statistics.fmean(r for r, _ in it["labels"]) for it in items],
            [it["p"] for it in items],
            bounds=RATING_BOUNDS,
        )
        d = _finite(est.to_dict())
        out.append({"start": start, "mean": d["mean"], "ci_low": d["ci_low"], "ci_high": d["ci_high"], "n": len(items)})
    return out


def agreement(rows: list[Any], flags: list[str]) -> dict[str, Any]:
    ratings: dict[str, list[float]] = defaultdict(list)
    flagsets: dict[str, list[set[str]]] = defaultdict(list)
    for r in rows:
        if r.skipped:
            continue
        ratings[r.episode_id].append(float(r.rating))
        flagsets[r.episode_id].append(set(r.flags or []))
    units = [v for v in ratings.values() if len(v) >= 2]
    kappa = {}
    for f in flags:
        pairs = [(f in fs[0], f in fs[1]) for fs in flagsets.values() if len(fs) == 2]
        kappa[f] = {"kappa": cohen_kappa(pairs), "n": len(pairs)}
    return {"krippendorff_alpha": krippendorff_alpha_interval(units), "n_items": len(units), "kappa": kappa}


def throughput(store: Store, now: float) -> list[dict[str, Any]]:
    lb, u = t.labels, t.users
    q = (
        sa.select(u.c.name, lb.c.created_at, lb.c.skipped, lb.c.time_spent_ms)
        .join(u, u.c.id == lb.c.user_id)
        .where(lb.c.created_at >= now - 86400)
    )
    per: dict[str, dict[str, Any]] = {}
    with store.engine.connect() as conn:
        for name, at, skipped, ms in conn.execute(q):
            p = per.setdefault(name, {"labels_1h": 0, "labels_24h": 0, "skips_24h": 0, "times": []})
            if skipped:
                p["skips_24h"] += 1
                continue
            p["labels_24h"] += 1
            p["labels_1h"] += at >= now - 3600
            p["times"].append(ms / 1000.0)
    return [
        {
            "reviewer": name,
            "labels_1h": p["labels_1h"],
            "labels_24h": p["labels_24h"],
            "skips_24h": p["skips_24h"],
            "median_time_s": statistics.median(p["times"]) if p["times"] else None,
        }
        for name, p in sorted(per.items())
    ]


def recent_drift_events(store: Store, limit: int = 20) -> list[dict[str, Any]]:
    e = t.drift_events
    q = (
        sa.select(
            e.c.stream,
            e.c.signal,
            e.c.detector,
            e.c.statistic,
            e.c.threshold,
            e.c.episode_id,
            e.c.input_index,
            e.c.event_ts,
            e.c.created_at,
        )
        .order_by(e.c.id.desc())
        .limit(limit)
    )
    with store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(q)]


def rm_agreement(store: Store, settings: Settings) -> dict[str, Any] | None:
    """The active reward-model version and its agreement with reviewers per stream (None: no version)."""
    from monitor.actions.oversight import compute
    from monitor.reward.registry import Registry

    active = Registry(store, settings.reward.models_dir, settings.reward.stream_set).active()
    if active is None:
        return None
    out: dict[str, Any] = {"active version": active[0]}
    for stream, r in sorted(compute(store, active[0]).items()):
        a = r.get("agreement")
        if a is not None:
            out[f"{stream}: agreement ({a['pairs']} pairs)"] = a["value"]
    return out


def recent_requests(store: Store, limit: int = 20) -> list[dict[str, Any]]:
    from monitor.actions.requests import listing

    keep = ("id", "kind", "stream", "state", "attempts", "created_at", "updated_at", "last_error")
    return [{k: r[k] for k in keep} for r in listing(store, limit=limit)]


def admin_summary(store: Store, settings: Settings, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    flags = settings.review.flags
    rows = _labels(store)
    return {
        "queue": queue_depth(store, now),
        "throughput": throughput(store, now),
        "agreement": agreement(rows, flags),
        "rm_agreement": rm_agreement(store, settings),
        "drift_events": recent_drift_events(store),
        "requests": recent_requests(store),
        "estimates": estimates(store, flags, rows),
    }
