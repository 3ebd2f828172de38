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
towards the pooled noise with a prior worth ``prior_labels`` labels, and their bias towards 0.
Without any overlap every reviewer gets the pooled noise and no bias, so the calibrated item
values are the plain means: weighting cannot invent information.

Overlap only ever compares reviewers with each other, so it fixes their biases up to one shift
common to every reviewer it links (moving them all and every item by the same amount fits as
well): something must say where the truth is. Per group of reviewers linked by shared items:

* the *reference* is the weighted median of their biases, each weighted by its shared labels
  (the evidence behind it). The scale is then the typical reviewer's, and a harsh or lenient
  minority is corrected without moving anyone else. Precision is no weight here: a precise
  reviewer can be precisely harsh, and a mean weighted by it (the earlier rule) let one such
  reviewer shift every careful one by their bias times their share of the weight (0.19 points
  with six careful reviewers, one harsh by -1.5 and one careless), so the estimate stayed biased;
* ``gold`` items (with a known answer: adjudicated ratings, canaries) measure the shift itself:
  the biases move by the group's gold residuals left after the reference, summed and divided by
  their number plus ``prior_labels`` per reviewer of the group (the reference counts as that
  many gold labels at no residual). Plenty of gold pins the biases to the truth, and a few
  adjudicated items (noisy, and chosen for disagreeing) move the scale by little. Not centring
  at all where there is gold would not do: the scale would then be wherever the bias prior,
  pulling every bias towards 0 alike (a plain mean, with that same weight), balances the gold,
  and with a handful of gold items one harsh reviewer would shift everyone again.

A reviewer who shares no item with anyone, and has no gold, keeps bias 0.

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
    """A reviewer's fitted calibration: ``n`` labels, ``overlap`` of them on items with another
    label or a known (gold) answer: the labels that say anything about the reviewer."""

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
    says something, and the gold sets where the biases' zero lies (the module docstring says how).
    Calibrated item values are clipped to ``bounds``."""
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
    for i, ratings in by_item.items():
        is_shared = len(ratings) > 1 or i in gold  # this item's, not the last item read's
        for j in ratings:
            counts[j] += 1
            overlap[j] += is_shared
    shared = {i: rs for i, rs in by_item.items() if len(rs) > 1 or i in gold}
    groups = _groups(shared, gold)
    pooled = _pooled_variance(shared)
    bias = dict.fromkeys(counts, 0.0)
    var = dict.fromkeys(counts, pooled)
    it, converged = 0, not shared
    while shared and it < max_iter:
        it += 1
        new_bias, new_var = _m_step(shared, gold, groups, bias, var, pooled, prior_labels)
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
    groups: Sequence[_Group],
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
    return _centre(new_bias, groups, prior), new_var


@dataclass
class _Group:
    """Reviewers linked through shared items (their biases are known relative to each other):
    each one's shared labels (the weight of its bias in the reference) and the group's residuals
    against gold, ``(reviewer, rating - gold)``."""

    evidence: dict[Hashable, int]
    gold_residuals: list[tuple[Hashable, float]]


def _groups(shared: dict[Hashable, dict[Hashable, float]], gold: Mapping[Any, float]) -> list[_Group]:
    """The linked groups (union-find over the shared items). Each needs its own reference: one
    shift for all of them would leave the groups free to drift apart."""
    parent: dict[Hashable, Hashable] = {}

    def root(j: Hashable) -> Hashable:
        while parent[j] != j:
            parent[j] = parent[parent[j]]
            j = parent[j]
        return j

    for rs in shared.values():
        first, *rest = rs
        parent.setdefault(first, first)
        for k in rest:
            parent[root(parent.setdefault(k, k))] = root(first)
    groups: dict[Hashable, _Group] = {}
    for i, rs in shared.items():
        for j, r in rs.items():
            g = groups.setdefault(root(j), _Group({}, []))
            g.evidence[j] = g.evidence.get(j, 0) + 1
            if i in gold:
                g.gold_residuals.append((j, r - gold[i]))
    return list(groups.values())


def _centre(bias: dict[Hashable, float], groups: Sequence[_Group], prior: float) -> dict[Hashable, float]:
    """Fix each group's common shift (the module docstring says why): biases relative to the
    weighted median of the group's, then moved by what the gold says is left."""
    out = dict(bias)  # a reviewer in no group has no residual: its bias stays the prior's 0
    for g in groups:
        ref = weighted_median([bias[j] for j in g.evidence], list(g.evidence.values()))
        left = sum(d - (bias[j] - ref) for j, d in g.gold_residuals)
        shift = left / (len(g.gold_residuals) + prior * len(g.evidence))
        for j in g.evidence:
            out[j] = bias[j] - ref + shift
    return out


def weighted_median(values: Sequence[float], weights: Sequence[int]) -> float:
    """The value with at most half the total weight on either side; where the weight splits
    exactly in two, the midpoint of the two values at the split (so equal weights give the
    ordinary median). Zero weights count for nothing.

    >>> weighted_median([0.1, -1.5, 0.0, -0.1], [1, 1, 1, 1])  # one harsh reviewer of four
    -0.05
    >>> weighted_median([0.0, -1.5], [300, 20])  # the reviewer behind most shared labels
    0.0
    """
    pts = sorted((v, w) for v, w in zip(values, weights, strict=True) if w > 0)
    if not pts:
        raise ValueError("weighted_median needs a positive weight")
    total, cum = sum(w for _, w in pts), 0
    for k, (v, w) in enumerate(pts):
        cum += w
        if 2 * cum == total:  # integer weights: an exact split is exact
            return (v + pts[k + 1][0]) / 2
        if 2 * cum > total:
            return v
    raise AssertionError("unreachable: the weights add up to their total")


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
