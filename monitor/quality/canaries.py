"""Reviewer quality from canaries, and the assistance experiment's report.

Only ``canary_labels`` are read here (with their ``canaries``): no real label enters a quality
measure, and no canary label enters anything else.

Outcomes of one canary label (skips are left out):

* ``perturbed`` (a single worse response): the *rule* fires when the reviewer set any flag, or
  rated it below the *reference*: the median human rating of the unperturbed original by others
  (the real labels of the source episode and its ``original`` presentations to other reviewers;
  the reviewer's own ratings never count). With no reference yet, only a flag fires it.
* ``original`` (unchanged): the same rule against its own source's reference gives the reviewer's
  **baseline**, how often the rule fires with nothing to see; a flag here is a **false flag**.
* ``pair`` (original and perturbed side by side, order randomised): the original preferred, the
  perturbed one preferred, or a tie.

**Detection** (per reviewer, kind, day or week, condition) is corrected for chance, because the
raw rule rewards harshness: a reviewer who rates everything low "detects" most perturbations
without seeing any (in a simulation a blind reviewer rating 1.5 points below the others scored 0.8).

* Single responses. If a reviewer who misses a perturbation answers it as they answer any
  original (the rule fires with the baseline rate b), the rule fires on a perturbed canary with
  P = d + (1 - d) b, so d = (P - b) / (1 - b) = 1 - (1 - P) / (1 - b): one minus the ratio of two
  independent proportions (rule silent on perturbed canaries, on the reviewer's originals),
  clipped to [0, 1] (``rule: "baseline"``). The baseline comes from the reviewer's originals of
  every kind (an original is unchanged whatever kind was drawn for it) in the same window or
  trend bucket. Interval: the Miettinen-Nurminen score interval of the ratio, mapped through
  1 - ratio, so the uncertainty of b counts too (a harsh reviewer's ratings carry little
  information and the interval says so). With fewer than ``MIN_BASELINE`` originals, or a rule
  that fired on every original, flags alone count (``rule: "flag"``, Wilson interval): a harsh
  rating cannot inflate that (a reviewer who flags everything can, and shows in the false flags).
* Pairs. A reviewer who sees nothing cannot tell which side is the original (the order is
  random), so prefers it as often as the perturbed one: P(original) = d + g, P(perturbed) = g,
  and d = P(original) - P(perturbed), clipped to [0, 1]. So a coin that never ties scores 0, not
  0.5, and a reviewer who ties whenever unsure scores their raw rate. Interval: Newcombe's
  interval for a difference of paired proportions (method 10), the two counts coming from one
  sample.
* Both in one group: the average of the two weighted by their counts, with the MOVER interval
  (Zou and Donner) from the two intervals.

``n`` stays the count of the group's perturbed and pair canaries and ``k`` of those the raw rule
in use called detected (``raw`` = k / n); ``rate`` and ``ci`` are the corrected measure.

Rates come with Wilson score intervals; a difference of two independent rates with Newcombe's
hybrid score interval (method 10), and a difference of two detection measures with the same
square-and-add (MOVER) construction from their own intervals (it is Newcombe's hybrid when both
are plain Wilson rates).

Time per item (``time_spent_ms`` in seconds): the mean with the t interval (n - 1 degrees of
freedom), and, because times per item are right-skewed, the geometric mean with the t interval
of the mean log time back-transformed (``geomean``, ``geo_ci``; times of 0, not reported by the
client, are left out of it and counted in ``geo_n``). The arithmetic interval is exact for normal
times; on skewed times at a few items it still covers less than stated (0.87 at n = 5 for
lognormal times, sigma 0.8), where the geometric one is exact for lognormal times. A difference of
two means with Welch's t interval (Welch-Satterthwaite degrees of freedom), and the ratio of the
geometric means with Welch's interval on log times (``ratio``, ``ratio_ci``).
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from monitor.store import Store
from monitor.store import tables as t

Z95 = 1.959963984540054
DAY_S = 86_400
# Originals needed before a reviewer's baseline is estimated: with fewer, the corrected measure's
# interval is too wide to act on and its point estimate jumps with each label, so flags alone count.
MIN_BASELINE = 5
# The score statistic is solved for on log ratios in this range (ratios 2e-9 to 5e8) to this many
# halvings (a width of 40 / 2**60 on the log scale): far below anything a rate is shown with.
_LOG_RATIO_RANGE = 20.0
_BISECTIONS = 60


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


def newcombe_paired(e: int, f: int, g: int, h: int, z: float = Z95) -> tuple[float, float] | None:
    """Newcombe's interval (1998, paired method 10) of p1 - p2 = (f - g) / n from one sample of
    n = e + f + g + h, where e answered yes to both, f only to the first, g only to the second
    (None when n is 0). The two Wilson intervals are combined as in :func:`newcombe`, less the
    correlation of the two proportions (phi, continuity-corrected as Newcombe does).

    Newcombe's example (a), 36 / 12 / 2 / 0:

    >>> lo, hi = newcombe_paired(36, 12, 2, 0)
    >>> round(lo, 4), round(hi, 4)
    (0.0569, 0.3404)
    """
    n = e + f + g + h
    a, b = wilson(e + f, n, z), wilson(e + g, n, z)
    if a is None or b is None:
        return None
    p1, p2 = (e + f) / n, (e + g) / n
    d = p1 - p2
    denom = (e + f) * (g + h) * (e + g) * (f + h)
    cross = e * h - f * g
    # Newcombe's phi: a positive correlation shrunk by n/2 (and no lower than 0), a negative one kept.
    c = cross - n / 2 if cross > n / 2 else min(cross, 0)
    phi = c / math.sqrt(denom) if denom > 0 else 0.0
    dl1, du2 = p1 - a[0], b[1] - p2
    du1, dl2 = a[1] - p1, p2 - b[0]
    lo = d - math.sqrt(max(0.0, dl1 * dl1 - 2 * phi * dl1 * du2 + du2 * du2))
    hi = d + math.sqrt(max(0.0, dl2 * dl2 - 2 * phi * dl2 * du1 + du1 * du1))
    return max(-1.0, lo), min(1.0, hi)


def _ratio_score(x1: int, n1: int, x2: int, n2: int, rho: float) -> float:
    """Miettinen-Nurminen score statistic of H0: p1 / p2 = rho (decreasing in rho)."""
    n = n1 + n2
    # The maximum-likelihood p2 under H0 (p1 = rho * p2): the smaller root of qa p2^2 + qb p2 + qc,
    # written as 2 qc / (-qb + sqrt(...)) (-qb > 0), which does not cancel when rho is small.
    qa = n * rho
    qb = -(n1 * rho + x1 + n2 + x2 * rho)
    qc = x1 + x2
    p2 = min(1.0, 2 * qc / (-qb + math.sqrt(max(0.0, qb * qb - 4 * qa * qc))))
    p1 = min(1.0, max(0.0, rho * p2))
    var = (p1 * (1 - p1) / n1 + rho * rho * p2 * (1 - p2) / n2) * n / (n - 1)
    num = x1 / n1 - rho * x2 / n2
    if var <= 0:
        return 0.0 if abs(num) < 1e-12 else math.copysign(math.inf, num)
    return num / math.sqrt(var)


def _solve_decreasing(f: Callable[[float], float], target: float) -> float:
    """The log ratio where the decreasing ``f`` of a log ratio crosses ``target``, by bisection;
    -inf or +inf when it does not cross in the searched range."""
    lo, hi = -_LOG_RATIO_RANGE, _LOG_RATIO_RANGE
    if f(lo) <= target:
        return -math.inf
    if f(hi) >= target:
        return math.inf
    for _ in range(_BISECTIONS):
        mid = (lo + hi) / 2
        if f(mid) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def ratio_ci(x1: int, n1: int, x2: int, n2: int, z: float = Z95) -> tuple[float, float] | None:
    """Miettinen-Nurminen score interval of the ratio (x1/n1) / (x2/n2) of two independent
    proportions (None when either sample is empty); the upper bound is inf when x2 is 0.

    >>> lo, hi = ratio_ci(10, 40, 26, 40)
    >>> round(lo, 3), round(hi, 3)
    (0.21, 0.666)
    """
    if n1 <= 0 or n2 <= 0:
        return None

    def score(log_rho: float) -> float:
        return _ratio_score(x1, n1, x2, n2, math.exp(log_rho))

    return math.exp(_solve_decreasing(score, z)), math.exp(_solve_decreasing(score, -z))


def corrected(k: int, n: int, k0: int, n0: int, z: float = Z95) -> tuple[float, tuple[float, float]] | None:
    """Detection corrected for the reviewer's baseline: the rule fired on ``k`` of ``n`` perturbed
    canaries and on ``k0`` of ``n0`` originals. d = 1 - (1 - P) / (1 - b), clipped to [0, 1], with
    the score interval of that ratio mapped the same way (see the module's docstring). None when
    either count is 0 or the rule fired on every original (nothing to correct against).

    An honest reviewer who sees 60% (rule on 30 of 40 perturbed, 14 of 40 originals), and a harsh,
    blind one (32 of 40, and 33 of 40):

    >>> d, (lo, hi) = corrected(30, 40, 14, 40)
    >>> round(d, 3), round(lo, 3), round(hi, 3)
    (0.615, 0.334, 0.79)
    >>> d, (lo, hi) = corrected(32, 40, 33, 40)
    >>> round(d, 3), round(lo, 3), round(hi, 3)
    (0.0, 0.0, 0.531)
    """
    if n <= 0 or n0 <= 0 or k0 >= n0:
        return None
    ci = ratio_ci(n - k, n, n0 - k0, n0, z)
    assert ci is not None  # both samples are non-empty
    est = 1 - ((n - k) / n) / ((n0 - k0) / n0)
    return _clip(est), (_clip(1 - ci[1]), _clip(1 - ci[0]))


def pair_detection(original: int, perturbed: int, n: int, z: float = Z95) -> tuple[float, tuple[float, float]] | None:
    """Detection from ``n`` pairs: the original preferred ``original`` times, the perturbed one
    ``perturbed`` times (the rest ties); P(original) - P(perturbed), clipped to [0, 1], with
    Newcombe's paired interval (None when n is 0). A coin that never ties scores about 0:

    >>> d, (lo, hi) = pair_detection(21, 19, 40)
    >>> round(d, 3), round(lo, 3), round(hi, 3)
    (0.05, 0.0, 0.341)
    """
    ci = newcombe_paired(0, original, perturbed, n - original - perturbed, z)
    if ci is None:
        return None
    return _clip((original - perturbed) / n), (_clip(ci[0]), _clip(ci[1]))


def _clip(x: float) -> float:
    return min(1.0, max(0.0, x))


def mover(parts: Sequence[tuple[float, float, tuple[float, float]]]) -> tuple[float, tuple[float, float]]:
    """sum(w * est) over ``parts`` of (weight, estimate, interval), with the MOVER interval (Zou and
    Donner 2008): each bound moves by the square root of the summed squares of the parts' distances
    to their own bounds (a negative weight swaps which bound a part contributes). Two Wilson rates
    with weights 1 and -1 give Newcombe's hybrid interval.

    >>> est, (lo, hi) = mover([(1.0, 56 / 70, wilson(56, 70)), (-1.0, 48 / 80, wilson(48, 80))])
    >>> round(est, 3), round(lo, 4), round(hi, 4)
    (0.2, 0.0524, 0.3339)
    """
    est = sum(w * e for w, e, _ in parts)
    down = up = 0.0
    for w, e, (lo, hi) in parts:
        below, above = w * (e - lo), w * (hi - e)
        if w < 0:
            below, above = -above, -below
        down += below * below
        up += above * above
    return est, (est - math.sqrt(down), est + math.sqrt(up))


@functools.lru_cache(maxsize=256)
def t_quantile(df: float, confidence: float = 0.95) -> float:
    """Two-sided quantile of Student's t with ``df`` degrees of freedom.

    >>> round(t_quantile(2), 3), round(t_quantile(1e9), 3)
    (4.303, 1.96)
    """
    from scipy.special import stdtrit  # lazily: scipy.special takes 0.4 s to import

    return float(stdtrit(df, 1 - (1 - confidence) / 2))


def _t_interval(xs: Sequence[float], confidence: float) -> tuple[float, float] | None:
    """mean(xs) with its t interval (None with fewer than 2 values)."""
    if len(xs) < 2:
        return None
    m = statistics.fmean(xs)
    h = t_quantile(len(xs) - 1, confidence) * statistics.stdev(xs) / math.sqrt(len(xs))
    return m - h, m + h


def _welch_interval(a: Sequence[float], b: Sequence[float], confidence: float) -> tuple[float, float] | None:
    """mean(a) - mean(b) with Welch's t interval (None with fewer than 2 values in either)."""
    if len(a) < 2 or len(b) < 2:
        return None
    d = statistics.fmean(a) - statistics.fmean(b)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb <= 0:
        return d, d
    # Welch-Satterthwaite degrees of freedom.
    df = (va + vb) ** 2 / (va * va / (len(a) - 1) + vb * vb / (len(b) - 1))
    h = t_quantile(df, confidence) * math.sqrt(va + vb)
    return d - h, d + h


def _logs(xs: Iterable[float]) -> list[float]:
    """Log times, leaving out times of 0 (the label API's default: not reported)."""
    return [math.log(x) for x in xs if x > 0]


def _exp(ci: tuple[float, float] | None) -> tuple[float, float] | None:
    return None if ci is None else (math.exp(ci[0]), math.exp(ci[1]))


def mean_ci(xs: list[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean with its t interval, and geometric mean with its interval (see the module's docstring;
    intervals None with fewer than 2 values).

    >>> m = mean_ci([20.0, 30.0, 45.0])
    >>> round(m["mean"], 2), [round(x, 1) for x in m["ci"]]
    (31.67, [0.4, 62.9])
    >>> round(m["geomean"], 2), [round(x, 1) for x in m["geo_ci"]]
    (30.0, [11.0, 82.1])
    """
    logs = _logs(xs)
    return {
        "mean": statistics.fmean(xs) if xs else None,
        "ci": _t_interval(xs, confidence),
        "n": len(xs),
        "geomean": math.exp(statistics.fmean(logs)) if logs else None,
        "geo_ci": _exp(_t_interval(logs, confidence)),
        "geo_n": len(logs),
    }


def welch(a: list[float], b: list[float], confidence: float = 0.95) -> dict[str, Any]:
    """mean(a) - mean(b) with Welch's t interval, and the ratio of the geometric means with Welch's
    interval on log times (intervals None with fewer than 2 values in either).

    >>> w = welch([20.0, 30.0, 45.0], [10.0, 15.0, 20.0, 25.0])
    >>> round(w["diff"], 2), [round(x, 1) for x in w["ci"]]
    (14.17, [-12.2, 40.5])
    >>> round(w["ratio"], 2), [round(x, 2) for x in w["ratio_ci"]]
    (1.81, [0.8, 4.13])
    """
    la, lb = _logs(a), _logs(b)
    return {
        "diff": statistics.fmean(a) - statistics.fmean(b) if a and b else None,
        "ci": _welch_interval(a, b, confidence),
        "ratio": math.exp(statistics.fmean(la) - statistics.fmean(lb)) if la and lb else None,
        "ratio_ci": _exp(_welch_interval(la, lb, confidence)),
    }


def rate(k: int, n: int) -> dict[str, Any]:
    return {"rate": k / n if n else None, "ci": wilson(k, n), "k": k, "n": n}


@dataclass(frozen=True)
class Outcome:
    """One scored canary label."""

    reviewer: str
    kind: str
    presentation: str
    detected: bool | None  # perturbed (the raw rule) or pair (original preferred); None for an original
    false_flag: bool | None  # original; None otherwise
    seconds: float
    created_at: float
    experiment: str | None
    condition: str | None
    flagged: bool = False
    below: bool = False  # rated below the reference of others (False without a reference or a rating)
    reversed: bool = False  # pair: the perturbed response preferred

    @property
    def fires(self) -> bool:
        """The rule (see the module's docstring): a flag, or a rating below the reference."""
        return self.flagged or self.below


def _reference_ratings(conn: sa.Connection, episodes: set[str]) -> dict[str, list[tuple[int, float]]]:
    """Human ratings of each source's unperturbed original, with who gave them: real labels and
    the original presentations of canaries."""
    lb, cl = t.labels, t.canary_labels
    ratings: dict[str, list[tuple[int, float]]] = defaultdict(list)
    ids = sorted(episodes)
    for i in range(0, len(ids), 500):  # bounded IN lists
        chunk = ids[i : i + 500]
        for r in conn.execute(
            sa.select(lb.c.episode_id, lb.c.user_id, lb.c.rating).where(
                lb.c.episode_id.in_(chunk), lb.c.skipped == sa.false(), lb.c.rating.is_not(None)
            )
        ):
            ratings[r.episode_id].append((int(r.user_id), float(r.rating)))
        for r in conn.execute(
            sa.select(cl.c.episode_id, cl.c.user_id, cl.c.rating).where(
                cl.c.episode_id.in_(chunk),
                cl.c.presentation == "original",
                cl.c.skipped == sa.false(),
                cl.c.rating.is_not(None),
            )
        ):
            ratings[r.episode_id].append((int(r.user_id), float(r.rating)))
    return ratings


def _reference(ratings: list[tuple[int, float]], user_id: int) -> float | None:
    """Median rating of the original by others than ``user_id`` (None when there is none): the
    reviewer's own rating of an original would otherwise pull its reference towards itself."""
    others = [r for u, r in ratings if u != user_id]
    return statistics.median(others) if others else None


def outcomes(store: Store, since: float | None = None) -> list[Outcome]:
    """Every non-skipped canary label, scored (see the module's docstring)."""
    cl, u = t.canary_labels, t.users
    q = (
        sa.select(
            cl.c.episode_id,
            cl.c.user_id,
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
        ref = _reference_ratings(conn, {r.episode_id for r in rows if r.presentation != "pair"})
    out = []
    for r in rows:
        flagged = bool(r.flags)
        base = _reference(ref.get(r.episode_id, []), int(r.user_id))
        below = base is not None and r.rating is not None and float(r.rating) < base
        detected: bool | None = None
        if r.presentation == "perturbed":
            detected = flagged or below
        elif r.presentation == "pair":
            detected = r.preference == "response"
        out.append(
            Outcome(
                reviewer=r.name,
                kind=r.kind,
                presentation=r.presentation,
                detected=detected,
                false_flag=flagged if r.presentation == "original" else None,
                seconds=int(r.time_spent_ms) / 1000.0,
                created_at=float(r.created_at),
                experiment=r.assist_experiment,
                condition=r.assist_condition,
                flagged=flagged,
                below=below,
                reversed=r.presentation == "pair" and r.preference == "alternative",
            )
        )
    return out


def detection(items: Iterable[Outcome], originals: Iterable[Outcome] | None = None, z: float = Z95) -> dict[str, Any]:
    """The detection measure of a group of outcomes (see the module's docstring). The baseline is
    read from the originals among ``originals`` (by default, among ``items``).

    ``rate``/``ci``: the corrected measure; ``k``/``n``: detections by the raw rule in use of the
    perturbed and pair canaries (``raw`` = k / n); ``rule``: ``baseline`` or ``flag`` for single
    responses (None without one); ``baseline``: the rule on the originals (k of n, with its rate);
    ``pairs``/``pairs_reversed``: pairs among n, and those where the perturbed one was preferred.
    """
    items = list(items)
    base = [o for o in (items if originals is None else originals) if o.presentation == "original"]
    singles = [o for o in items if o.presentation == "perturbed"]
    pairs = [o for o in items if o.presentation == "pair"]
    k0 = sum(o.fires for o in base)
    parts: list[tuple[float, float, tuple[float, float]]] = []
    rule, k = None, 0
    if singles:
        fired = sum(o.fires for o in singles)
        est = corrected(fired, len(singles), k0, len(base), z) if len(base) >= MIN_BASELINE else None
        if est is not None:
            rule, k = "baseline", fired
        else:
            rule, k = "flag", sum(o.flagged for o in singles)
            est = (k / len(singles), wilson(k, len(singles), z) or (0.0, 1.0))
        parts.append((len(singles), *est))
    reversed_ = sum(o.reversed for o in pairs)
    if pairs:
        preferred = sum(bool(o.detected) for o in pairs)
        k += preferred
        est = pair_detection(preferred, reversed_, len(pairs), z)
        assert est is not None  # pairs is not empty
        parts.append((len(pairs), *est))
    n = len(singles) + len(pairs)
    rate_, ci = None, None
    if parts:
        d, (lo, hi) = mover([(w / n, e, c) for w, e, c in parts])
        rate_, ci = _clip(d), (_clip(lo), _clip(hi))
    return {
        "rate": rate_,
        "ci": ci,
        "k": k,
        "n": n,
        "rule": rule,
        "raw": k / n if n else None,
        "baseline": rate(k0, len(base)),
        "pairs": len(pairs),
        "pairs_reversed": reversed_,
    }


def summarise(items: Iterable[Outcome], originals: Iterable[Outcome] | None = None) -> dict[str, Any]:
    """Detection measure, false-flag rate and time per item of a group of outcomes; the detection
    baseline from the originals among ``originals`` (by default the group's own)."""
    items = list(items)
    ff = [o.false_flag for o in items if o.false_flag is not None]
    return {
        "detection": detection(items, originals),
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
    """Per reviewer: overall, per kind, and per day (or week) of the canary labels since ``since``.
    A kind's detection baseline is the reviewer's originals of every kind; a day's, that day's."""
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
            s = summarise(kinds[k], items)
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


def detection_diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Detection measure ``a`` minus ``b`` (two :func:`detection` results of independent groups),
    with the square-and-add interval from their own intervals (None without both)."""
    if a["rate"] is None or b["rate"] is None or a["ci"] is None or b["ci"] is None:
        return {"diff": None, "ci": None}
    d, (lo, hi) = mover([(1.0, a["rate"], a["ci"]), (-1.0, b["rate"], b["ci"])])
    return {"diff": d, "ci": (max(-1.0, lo), min(1.0, hi))}


def experiment_report(store: Store, experiment: str, conditions: list[str]) -> dict[str, Any]:
    """Per condition and kind (and ``all`` kinds): detection measure and time per item with their
    intervals, and each condition's difference from the control with its interval. A condition's
    detection baseline is its originals of every kind (an assistant may change how harshly
    reviewers rate anything, which the raw rule would count as detection)."""
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
            s = summarise(items, groups[(c, "all")])
            row: dict[str, Any] = {"condition": c, "kind": k, **s, "control": c == control}
            base = groups.get((control, k), []) if control is not None else []
            if control is not None and c != control and base:
                b = summarise(base, groups[(control, "all")])
                row["detection_diff"] = detection_diff(s["detection"], b["detection"])
                row["seconds_diff"] = welch([o.seconds for o in items], [o.seconds for o in base])
            else:
                row["detection_diff"] = None
                row["seconds_diff"] = None
            rows.append(row)
    return {"experiment": experiment, "control": control, "conditions": seen, "rows": rows}


def window_start(days: float, now: float | None = None) -> float:
    return (time.time() if now is None else now) - days * DAY_S
