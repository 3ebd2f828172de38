"""Reviewer quality from canaries, and the assistance experiment's report.

Only ``canary_labels`` are read here (with their ``canaries``): no real label enters a quality
measure, and no canary label enters anything else.

Outcomes of one canary label (skips are left out):

* ``perturbed`` (a single worse response): **detected** when the reviewer set any flag, or rated
  it below the *reference*: the median human rating of the unperturbed original, from the real
  labels of the source episode and the ``original`` presentations of it to other reviewers. With
  no reference yet, only a flag counts as a detection (a conservative estimate).
* ``pair`` (original and perturbed side by side, order randomised): **detected** when the
  reviewer preferred the original; a tie or the perturbed one is a miss.
* ``original`` (unchanged): a **false flag** when the reviewer set any flag.

Rates come with Wilson score intervals; a difference of two rates with Newcombe's hybrid score
interval (method 10). Time per item is the mean of ``time_spent_ms`` in seconds with a normal
interval, mean +/- z * s / sqrt(n) (n >= 2; a mean of skewed times is close to normal at the
sample sizes a day of canaries gives, and the interval is honest about its width); a difference
of two means with Welch's normal interval. ``z`` is 1.96 (95%).
"""

from __future__ import annotations

import math
import statistics
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from monitor.store import Store
from monitor.store import tables as t

Z95 = 1.959963984540054
DAY_S = 86_400


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of a proportion k/n (None when n is 0).

    >>> lo, hi = wilson(8, 10)
    >>> round(lo, 3), round(hi, 3)
    (0.49, 0.943)
    """
    if n <= 0:
        return None
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def newcombe(k1: int, n1: int, k2: int, n2: int, z: float = Z95) -> tuple[float, float] | None:
    """Newcombe's hybrid score interval of p1 - p2 (None when either sample is empty)."""
    a, b = wilson(k1, n1, z), wilson(k2, n2, z)
    if a is None or b is None:
        return None
    p1, p2 = k1 / n1, k2 / n2
    d = p1 - p2
    lo = d - math.sqrt((p1 - a[0]) ** 2 + (b[1] - p2) ** 2)
    hi = d + math.sqrt((a[1] - p1) ** 2 + (p2 - b[0]) ** 2)
    return max(-1.0, lo), min(1.0, hi)


def mean_ci(xs: list[float], z: float = Z95) -> dict[str, Any]:
    """Mean with its normal interval (None with fewer than 2 values)."""
    if not xs:
        return {"mean": None, "ci": None, "n": 0}
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return {"mean": m, "ci": None, "n": 1}
    h = z * statistics.stdev(xs) / math.sqrt(len(xs))
    return {"mean": m, "ci": (m - h, m + h), "n": len(xs)}


def welch(a: list[float], b: list[float], z: float = Z95) -> dict[str, Any]:
    """mean(a) - mean(b) with Welch's normal interval (None with fewer than 2 values in either)."""
    if len(a) < 2 or len(b) < 2:
        d = statistics.fmean(a) - statistics.fmean(b) if a and b else None
        return {"diff": d, "ci": None}
    d = statistics.fmean(a) - statistics.fmean(b)
    h = z * math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return {"diff": d, "ci": (d - h, d + h)}


def rate(k: int, n: int) -> dict[str, Any]:
    return {"rate": k / n if n else None, "ci": wilson(k, n), "k": k, "n": n}


@dataclass(frozen=True)
class Outcome:
    """One scored canary label."""

    reviewer: str
    kind: str
    presentation: str
    detected: bool | None  # perturbed or pair; None for an original
    false_flag: bool | None  # original; None otherwise
    seconds: float
    created_at: float
    experiment: str | None
    condition: str | None


def _reference(conn: sa.Connection, episodes: set[str]) -> dict[str, float]:
    """Median human rating of each source's unperturbed original: real labels and the original
    presentations of canaries."""
    if not episodes:
        return {}
    lb, cl = t.labels, t.canary_labels
    ratings: dict[str, list[float]] = defaultdict(list)
    ids = sorted(episodes)
    for i in range(0, len(ids), 500):  # bounded IN lists
        chunk = ids[i : i + 500]
        for r in conn.execute(
            sa.select(lb.c.episode_id, lb.c.rating).where(
                lb.c.episode_id.in_(chunk), lb.c.skipped == sa.false(), lb.c.rating.is_not(None)
            )
        ):
            ratings[r.episode_id].append(float(r.rating))
        for r in conn.execute(
            sa.select(cl.c.episode_id, cl.c.rating).where(
                cl.c.episode_id.in_(chunk),
                cl.c.presentation == "original",
                cl.c.skipped == sa.false(),
                cl.c.rating.is_not(None),
            )
        ):
            ratings[r.episode_id].append(float(r.rating))
    return {e: statistics.median(v) for e, v in ratings.items() if v}


def outcomes(store: Store, since: float | None = None) -> list[Outcome]:
    """Every non-skipped canary label, scored (see the module's docstring)."""
    cl, u = t.canary_labels, t.users
    q = (
        sa.select(
            cl.c.episode_id,
            cl.c.kind,
            cl.c.presentation,
            cl.c.rating,
            cl.c.flags,
            cl.c.preference,
            cl.c.time_spent_ms,
            cl.c.created_at,
            cl.c.assist_experiment,
            cl.c.assist_condition,
            u.c.name,
        )
        .join(u, u.c.id == cl.c.user_id)
        .where(cl.c.skipped == sa.false())
        .order_by(cl.c.created_at, cl.c.id)
    )
    if since is not None:
        q = q.where(cl.c.created_at >= since)
    with store.engine.connect() as conn:
        rows = conn.execute(q).all()
        ref = _reference(conn, {r.episode_id for r in rows if r.presentation == "perturbed"})
    out = []
    for r in rows:
        flagged = bool(r.flags)
        detected: bool | None = None
        false_flag: bool | None = None
        if r.presentation == "perturbed":
            base = ref.get(r.episode_id)
            detected = flagged or (base is not None and r.rating is not None and r.rating < base)
        elif r.presentation == "pair":
            detected = r.preference == "response"
        else:
            false_flag = flagged
        out.append(
            Outcome(
                reviewer=r.name,
                kind=r.kind,
                presentation=r.presentation,
                detected=detected,
                false_flag=false_flag,
                seconds=int(r.time_spent_ms) / 1000.0,
                created_at=float(r.created_at),
                experiment=r.assist_experiment,
                condition=r.assist_condition,
            )
        )
    return out


def summarise(items: Iterable[Outcome]) -> dict[str, Any]:
    """Detection rate, false-flag rate and time per item of a group of outcomes."""
    items = list(items)
    det = [o.detected for o in items if o.detected is not None]
    ff = [o.false_flag for o in items if o.false_flag is not None]
    return {
        "detection": rate(sum(det), len(det)),
        "false_flag": rate(sum(ff), len(ff)),
        "seconds": mean_ci([o.seconds for o in items]),
        "n": len(items),
    }


def low(summary: dict[str, Any], level: float) -> bool:
    """Detection below ``level`` with confidence: the interval's upper bound is below it."""
    ci = summary["detection"]["ci"]
    return ci is not None and ci[1] < level


def reviewer_quality(
    store: Store, level: float, since: float | None = None, bucket: str = "day"
) -> list[dict[str, Any]]:
    """Per reviewer: overall, per kind, and per day (or week) of the canary labels since ``since``."""
    width = DAY_S if bucket == "day" else 7 * DAY_S
    by: dict[str, list[Outcome]] = defaultdict(list)
    for o in outcomes(store, since):
        by[o.reviewer].append(o)
    out = []
    for name in sorted(by):
        items = by[name]
        kinds: dict[str, list[Outcome]] = defaultdict(list)
        buckets: dict[float, list[Outcome]] = defaultdict(list)
        for o in items:
            kinds[o.kind].append(o)
            buckets[o.created_at - o.created_at % width].append(o)
        per_kind = []
        for k in sorted(kinds):
            s = summarise(kinds[k])
            per_kind.append({"kind": k, **s, "low": low(s, level)})
        overall = summarise(items)
        out.append(
            {
                "reviewer": name,
                **overall,
                "low": low(overall, level),
                "kinds": per_kind,
                "trend": [{"start": b, **summarise(buckets[b])} for b in sorted(buckets)],
            }
        )
    return out


def control_of(conditions: list[str]) -> str | None:
    """The experiment's control: the condition named ``none``, else the first."""
    if not conditions:
        return None
    return "none" if "none" in conditions else conditions[0]


def experiment_report(store: Store, experiment: str, conditions: list[str]) -> dict[str, Any]:
    """Per condition and kind (and ``all`` kinds): detection rate and time per item with their
    intervals, and each condition's difference from the control with its interval."""
    groups: dict[tuple[str, str], list[Outcome]] = defaultdict(list)
    seen = list(conditions)
    for o in outcomes(store):
        if o.experiment != experiment or o.condition is None:
            continue
        if o.condition not in seen:
            seen.append(o.condition)  # a condition since removed from the configuration
        groups[(o.condition, o.kind)].append(o)
        groups[(o.condition, "all")].append(o)
    control = control_of(seen)
    kinds = [*sorted({k for _, k in groups} - {"all"}), "all"]
    rows = []
    for c in seen:
        for k in kinds:
            items = groups.get((c, k), [])
            if not items:
                continue
            s = summarise(items)
            row: dict[str, Any] = {"condition": c, "kind": k, **s, "control": c == control}
            base = groups.get((control, k), []) if control is not None else []
            if c != control and base:
                d1 = [o.detected for o in items if o.detected is not None]
                d0 = [o.detected for o in base if o.detected is not None]
                ci = newcombe(sum(d1), len(d1), sum(d0), len(d0))
                row["detection_diff"] = {
                    "diff": (sum(d1) / len(d1) - sum(d0) / len(d0)) if d1 and d0 else None,
                    "ci": ci,
                }
                row["seconds_diff"] = welch([o.seconds for o in items], [o.seconds for o in base])
            else:
                row["detection_diff"] = None
                row["seconds_diff"] = None
            rows.append(row)
    return {"experiment": experiment, "control": control, "conditions": seen, "rows": rows}


def window_start(days: float, now: float | None = None) -> float:
    return (time.time() if now is None else now) - days * DAY_S
