"""The admin page's summary: queue, reviewer throughput, agreement, recent drift events and action
requests, and the estimates over all traffic (computed in ``monitor.quality``)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import sqlalchemy as sa

from monitor.actions.worker import incident_overview
from monitor.config import Settings
from monitor.drift import detail_text
from monitor.review.label_stats import LabelStats, compute
from monitor.review.queue import queue_depth
from monitor.store import Store
from monitor.store import tables as t


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
    """The newest drift events, with the fields the admin page shows."""
    return [
        {
            "stream": ev["stream"],
            "signal": ev["signal"],
            "detector": ev["detector"],
            "size": detail_text(ev.get("detail")),
            "statistic": ev["statistic"],
            "threshold": ev["threshold"],
            "episode_id": ev["episode_id"],
            "input_index": ev["input_index"],
            "event_ts": ev["event_ts"],
            "created_at": ev["created_at"],
            "detail": ev.get("detail"),
        }
        for ev in store.drift_events(limit=limit, newest_first=True)
    ]


def rm_agreement(store: Store, settings: Settings) -> dict[str, Any] | None:
    """The active reward-model version and its agreement with reviewers per stream (None: no version)."""
    from monitor.quality.oversight import compute
    from monitor.reward.registry import Registry

    registry = Registry.for_settings(store, settings)
    active = registry.active()
    if active is None:
        return None
    out: dict[str, Any] = {"active version": active[0]}
    # Made active by a person over its gate's verdict (``oversight rm promote``): the page says so.
    override = ((registry.get(active[0]) or {}).get("gate") or {}).get("override")
    if isinstance(override, dict):
        out["made active by hand"] = (
            f"by {override.get('by')} over the gate's verdict {override.get('verdict_before') or 'none'}:"
            f" {override.get('reason')}"
        )
    for stream, r in sorted(compute(store, active[0]).items()):
        a = r.get("agreement")
        if a is not None:
            out[f"{stream}: agreement ({a['pairs']} pairs)"] = a["value"]
    return out


def recent_requests(store: Store, limit: int = 20) -> list[dict[str, Any]]:
    from monitor.store.requests import listing

    keep = ("id", "kind", "stream", "state", "attempts", "created_at", "updated_at", "last_error")
    return [{k: r[k] for k in keep} for r in listing(store, limit=limit)]


def admin_summary(
    store: Store, settings: Settings, now: float | None = None, labels: LabelStats | None = None
) -> dict[str, Any]:
    """``labels``: what the summary takes from every label (agreement, estimates), computed here
    when not given (the review app passes its :class:`LabelStatsCache`'s)."""
    now = time.time() if now is None else now
    labels = compute(store, settings, now, chart=False) if labels is None else labels
    return {
        "queue": queue_depth(store, now),
        "throughput": throughput(store, now),
        "agreement": labels.agreement,
        "rm_agreement": rm_agreement(store, settings),
        "drift_events": recent_drift_events(store),
        "drift_streams": incident_overview(store, settings),
        "requests": recent_requests(store),
        "estimates": labels.estimates,
        "labels_computed_at": labels.computed_at,
        "labels_window_days": labels.window_days,
    }
