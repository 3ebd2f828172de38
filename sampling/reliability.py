"""Reviewer reliability: per-reviewer calibration of ratings, fitted by EM on overlapping labels.

Model (the continuous analogue of Dawid-Skene, as in Raykar et al. 2010): reviewer ``j`` rating
item ``i`` reports ``r_ij = mu_i + b_j + e_ij`` with ``e_ij ~ N(0, s_j^2)``: an item's true
rating ``mu_i``, the reviewer's bias ``b_j`` (a harsh or lenient reviewer) and their noise
``s_j^2`` (a careless or random one; an adversarial reviewer, who rates the opposite, shows up as
very large noise). Given the reviewers, the best estimate of an item is the precision-weighted
mean of its bias-corrected ratings, weights ``1 / s_j^2``; given the items, each reviewer's bias
and noise follow from their residuals. The fit alternates the two (EM with the items' posterior
means as the E step) until nothing moves.

Only items with two or more labels say anything about a reviewer (a lone rating is its own
estimate): residuals are taken against the *other* reviewers' estimate of the item (leave one
out), whose own variance is subtracted. Reviewers with few overlapping labels are shrunk
towards the pooled noise with a prior worth ``prior_labels`` labels, and their bias towards 0;
biases are centred so that the precision-weighted mean bias is 0 (the reliable reviewers define
the scale). Without any overlap every reviewer gets the pooled noise and no bias, so the
calibrated item values are the plain means: weighting cannot invent information.

Pure: no database, no numpy; the callers (``monitor.quality``, ``monitor.reward.update``) read
the labels and use the calibrated item values in place of the plain per-item means.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Integer ratings carry at least rounding noise (the variance of a uniform over one step).
MIN_VARIANCE = 1.0 / 12.0


@dataclass(frozen=True)
class Reviewer:
    """A reviewer's fitted calibration: ``n`` labels, ``overlap`` of them on shared items."""

    bias: float
    variance: float
    n: int
    overlap: int

    @property
    def weight(self) -> float:
        return 1.0 / self.variance


@dataclass
class Reliability:
    """The fit: reviewers, calibrated item values and how the fit went."""

    reviewers: dict[Hashable, Reviewer]
    items: dict[Hashable, float]
    iterations: int
    converged: bool
    pooled_variance: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "reviewers": {
                str(k): {"bias": round(r.bias, 4), "variance": round(r.variance, 4), "n": r.n, "overlap": r.overlap}
                for k, r in self.reviewers.items()
            },
            "iterations": self.iterations,
            "converged": self.converged,
            "pooled_variance": round(self.pooled_variance, 4),
        }


def fit(
    labels: Iterable[tuple[Hashable, Hashable, float]],
    *,
    gold: Mapping[Any, float] | None = None,
    prior_labels: float = 5.0,
    bounds: tuple[float, float] | None = (1.0, 7.0),
    max_iter: int = 200,
    tol: float = 1e-6,
) -> Reliability:
    """Fit the model to ``(item, reviewer, rating)`` labels (one per reviewer and item: a repeated
    one replaces the earlier). ``gold`` holds items whose true value is known (for example canaries
    with a known answer): a reviewer's residual there is taken against it, so even a lone label
    says something. Calibrated item values are clipped to ``bounds``."""
    gold = dict(gold or {})
    if prior_labels <= 0:
        raise ValueError("prior_labels must be positive")
    by_item: dict[Hashable, dict[Hashable, float]] = defaultdict(dict)
    for item, reviewer, rating in labels:
        r = float(rating)
        if not math.isfinite(r):
            raise ValueError(f"rating of item {item!r} by {reviewer!r} is not a finite number")
        by_item[item][reviewer] = r
    counts: dict[Hashable, int] = defaultdict(int)
    overlap: dict[Hashable, int] = defaultdict(int)
    for ratings in by_item.values():
        for j in ratings:
            counts[j] += 1
            overlap[j] += len(ratings) > 1 or item in gold
    shared = {i: rs for i, rs in by_item.items() if len(rs) > 1 or i in gold}
    pooled = _pooled_variance(shared)
    bias = dict.fromkeys(counts, 0.0)
    var = dict.fromkeys(counts, pooled)
    it, converged = 0, not shared
    while shared and it < max_iter:
        it += 1
        new_bias, new_var = _m_step(shared, gold, bias, var, pooled, prior_labels)
        delta = max(*(abs(new_bias[j] - bias[j]) for j in bias), *(abs(math.log(new_var[j] / var[j])) for j in var))
        bias, var = new_bias, new_var
        if delta < tol:
            converged = True
            break
    items = {i: _clip(_item_value(rs, bias, var), bounds) for i, rs in by_item.items()}
    reviewers = {j: Reviewer(bias[j], var[j], counts[j], overlap[j]) for j in counts}
    notes = [] if shared else ["no item has two labels: every reviewer gets the same weight and no bias"]
    return Reliability(reviewers, items, it, converged, pooled, notes)


def _clip(x: float, bounds: tuple[float, float] | None) -> float:
    return x if bounds is None else min(max(x, bounds[0]), bounds[1])


def _item_value(ratings: dict[Hashable, float], bias: dict[Hashable, float], var: dict[Hashable, float]) -> float:
    w = {j: 1.0 / var[j] for j in ratings}
    return sum(w[j] * (r - bias[j]) for j, r in ratings.items()) / sum(w.values())


def _pooled_variance(shared: dict[Hashable, dict[Hashable, float]]) -> float:
    """Within-item variance of the items with two or more labels (every reviewer alike): the prior noise."""
    ss, df = 0.0, 0
    for rs in shared.values():
        if len(rs) < 2:
            continue
        vals = list(rs.values())
        ss += statistics.pvariance(vals) * len(vals)
        df += len(vals) - 1
    return max(ss / df, MIN_VARIANCE) if df else 1.0


def _m_step(
    shared: dict[Hashable, dict[Hashable, float]],
    gold: Mapping[Any, float],
    bias: dict[Hashable, float],
    var: dict[Hashable, float],
    pooled: float,
    prior: float,
) -> tuple[dict[Hashable, float], dict[Hashable, float]]:
    """Each reviewer's bias and noise from leave-one-out residuals on the shared items."""
    res: dict[Hashable, list[float]] = defaultdict(list)
    extra: dict[Hashable, list[float]] = defaultdict(list)
    for i, rs in shared.items():
        for j, r in rs.items():
            if i in gold:  # the truth is known: the residual is the reviewer's own error
                res[j].append(r - gold[i])
                extra[j].append(0.0)
                continue
            others = {k: v for k, v in rs.items() if k != j}
            res[j].append(r - _item_value(others, bias, var))
            extra[j].append(1.0 / sum(1.0 / var[k] for k in others))  # the variance of the others' estimate
    new_bias: dict[Hashable, float] = {}
    new_var: dict[Hashable, float] = {}
    for j in bias:
        rj = res.get(j, [])
        n = len(rj)
        b = sum(rj) / (n + prior) if n else 0.0  # shrunk towards 0
        ss = sum((x - b) ** 2 - e for x, e in zip(rj, extra.get(j, []), strict=True))
        new_bias[j] = b
        new_var[j] = max((ss + prior * pooled) / (n + prior), MIN_VARIANCE)
    # Centre: the precision-weighted mean bias is 0, so the scale is the reliable reviewers'.
    w = {j: 1.0 / new_var[j] for j in new_bias}
    centre = sum(w[j] * new_bias[j] for j in new_bias) / sum(w.values())
    return {j: b - centre for j, b in new_bias.items()}, new_var


def item_values(
    labels: Sequence[tuple[Hashable, Hashable, float]], *, weighting: bool, prior_labels: float = 5.0
) -> dict[Hashable, float]:
    """Per item: the calibrated value with ``weighting``, else the plain mean of its ratings."""
    if weighting:
        return fit(labels, prior_labels=prior_labels).items
    by_item: dict[Hashable, list[float]] = defaultdict(list)
    for item, _, rating in labels:
        by_item[item].append(float(rating))
    return {i: statistics.fmean(v) for i, v in by_item.items()}
