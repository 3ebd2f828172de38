"""Disagreements between reviewers of the same item, and the adjudicated labels that settle them.

An item with overlap (``review.overlap``, ``review.overlap_fraction``) gets two or more labels.
They *disagree* when their ratings spread by at least ``review.adjudication.rating_gap`` points,
when a flag is set by some of them and not by the others (``flags_disagree``), or when a pair's
preferences differ. An administrator who did not label the item settles it with an
adjudication: a final rating, flags and preference with a note saying why
(:mod:`monitor.review.adjudication` writes them, append-only).

What reads what:

* estimates over all traffic (:mod:`monitor.quality.estimates`) and reward-model training data
  (:func:`monitor.reward.update.rated_records`) use an adjudicated item's final label *in place
  of* its reviewers' labels (:func:`finals`);
* agreement statistics (Krippendorff's alpha, Cohen's kappa) and reviewer reliability keep the
  reviewers' own labels: they measure the reviewers, and the adjudicator is not one of them.

>>> rule = Rule(rating_gap=2)
>>> rule.reasons([Given(3, frozenset()), Given(6, frozenset())])
['rating']
>>> rule.reasons([Given(5, frozenset({"harmful"})), Given(5, frozenset())])
['flags']
>>> rule.reasons([Given(5, frozenset()), Given(4, frozenset())])
[]
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from monitor.config import AdjudicationConfig
from monitor.store import Store
from monitor.store import tables as t
from monitor.store.adjudications import Final, finals

__all__ = [
    "Disagreement",
    "Final",
    "Given",
    "LabelSeen",
    "Rule",
    "disagreements",
    "finals",
    "split_flags",
    "waiting_per_stream",
]


@dataclass(frozen=True)
class Given:
    """One reviewer's (non-skipped) answer on an item, as the rule compares them."""

    rating: int
    flags: frozenset[str]
    preference: str | None = None


@dataclass(frozen=True)
class Rule:
    """When labels of one item disagree (``review.adjudication``)."""

    rating_gap: int = 2
    flags_disagree: bool = True

    @classmethod
    def of(cls, cfg: AdjudicationConfig) -> Rule:
        return cls(rating_gap=cfg.rating_gap, flags_disagree=cfg.flags_disagree)

    def reasons(self, given: Sequence[Given]) -> list[str]:
        """Why the labels disagree (``rating``, ``flags``, ``preference``); empty when they
        agree or when there are fewer than two."""
        if len(given) < 2:
            return []
        out = []
        ratings = [g.rating for g in given]
        if max(ratings) - min(ratings) >= self.rating_gap:
            out.append("rating")
        if self.flags_disagree and split_flags(given):
            out.append("flags")
        prefs = {g.preference for g in given if g.preference is not None}
        if len(prefs) > 1:
            out.append("preference")
        return out


def split_flags(given: Sequence[Given]) -> list[str]:
    """Flags that some of the labels set and others did not."""
    every = frozenset.intersection(*(g.flags for g in given)) if given else frozenset()
    some = frozenset().union(*(g.flags for g in given))
    return sorted(some - every)


@dataclass(frozen=True)
class LabelSeen:
    """A reviewer's label of a disagreeing item, as the adjudicator is shown it."""

    label_id: int
    user_id: int
    reviewer: str
    rating: int
    flags: list[str]
    preference: str | None
    critique: str
    created_at: float


@dataclass(frozen=True)
class Disagreement:
    episode_id: str
    stream: str
    reasons: list[str]
    rating_spread: int
    split_flags: list[str]
    labels: list[LabelSeen]
    first_label_at: float
    adjudicated: bool


def _rated() -> sa.ColumnElement[bool]:
    lb = t.labels
    return sa.and_(lb.c.skipped.is_(False), lb.c.rating.is_not(None))


def _candidates(
    rule: Rule, stream: str | None, include_adjudicated: bool, episode_id: str | None = None
) -> sa.Select[Any]:
    """Episodes whose labels may disagree under ``rule`` (episode_id, stream, first label time),
    decided by the database over the labels grouped per episode: the listing then reads only
    those episodes' labels, and counting them reads none.

    Flags are compared as their stored JSON text: a label's flags are stored sorted (the queue
    writes them so), so equal sets give equal text; any difference is caught, and a difference of
    order alone would only make a candidate that :meth:`Rule.reasons` then drops."""
    lb = t.labels
    differ = [
        sa.func.max(lb.c.rating) - sa.func.min(lb.c.rating) >= rule.rating_gap,
        sa.func.count(sa.distinct(lb.c.preference)) > 1,
    ]
    if rule.flags_disagree:
        differ.append(sa.func.count(sa.distinct(sa.cast(lb.c.flags, sa.Text))) > 1)
    q = (
        sa.select(
            lb.c.episode_id,
            sa.func.min(lb.c.stream).label("stream"),
            sa.func.min(lb.c.created_at).label("first_label_at"),
        )
        .where(_rated())
        .group_by(lb.c.episode_id)
        .having(sa.and_(sa.func.count() >= 2, sa.or_(*differ)))
    )
    if stream is not None:
        q = q.where(lb.c.stream == stream)
    if episode_id is not None:
        q = q.where(lb.c.episode_id == episode_id)
    if not include_adjudicated:
        q = q.where(lb.c.episode_id.not_in(sa.select(t.adjudications.c.episode_id)))
    return q


def _adjudicated_among(conn: sa.Connection, episode_ids: list[str]) -> set[str]:
    a = t.adjudications
    done: set[str] = set()
    for i in range(0, len(episode_ids), 500):
        q = sa.select(a.c.episode_id).where(a.c.episode_id.in_(episode_ids[i : i + 500])).distinct()
        done.update(conn.execute(q).scalars())
    return done


def _labels_of(conn: sa.Connection, episode_ids: list[str]) -> list[Any]:
    """The non-skipped labels of these episodes with their reviewers' names, in batches (a bounded
    number of bound parameters per statement)."""
    lb, u = t.labels, t.users
    cols = [lb.c.id, lb.c.episode_id, lb.c.stream, lb.c.user_id, u.c.name, lb.c.rating, lb.c.flags]
    cols += [lb.c.preference, lb.c.critique, lb.c.created_at]
    rows: list[Any] = []
    for i in range(0, len(episode_ids), 500):
        q = (
            sa.select(*cols)
            .join(u, u.c.id == lb.c.user_id)
            .where(_rated(), lb.c.episode_id.in_(episode_ids[i : i + 500]))
            .order_by(lb.c.episode_id, lb.c.id)
        )
        rows.extend(conn.execute(q).all())
    return rows


def disagreements(
    store: Store,
    rule: Rule,
    stream: str | None = None,
    include_adjudicated: bool = False,
    limit: int | None = None,
    episode_id: str | None = None,
) -> list[Disagreement]:
    """Items whose labels disagree under ``rule``, the longest waiting first (by their first
    label); adjudicated ones only with ``include_adjudicated``; ``episode_id``: that item only."""
    cand = _candidates(rule, stream, include_adjudicated, episode_id).subquery()
    q = sa.select(cand.c.episode_id).order_by(cand.c.first_label_at, cand.c.episode_id)
    if limit is not None:
        q = q.limit(limit)
    with store.engine.connect() as conn:
        ids = list(conn.execute(q).scalars())
        rows = _labels_of(conn, ids)
        done = _adjudicated_among(conn, ids) if include_adjudicated else set()
    by_episode: dict[str, list[Any]] = defaultdict(list)
    for r in rows:
        by_episode[r.episode_id].append(r)
    out = []
    for eid in ids:
        labels = by_episode[eid]
        given = [Given(int(r.rating), frozenset(r.flags or []), r.preference) for r in labels]
        reasons = rule.reasons(given)
        if not reasons:
            continue
        ratings = [g.rating for g in given]
        out.append(
            Disagreement(
                episode_id=eid,
                stream=labels[0].stream,
                reasons=reasons,
                rating_spread=max(ratings) - min(ratings),
                split_flags=split_flags(given),
                labels=[_seen(r) for r in labels],
                first_label_at=min(float(r.created_at) for r in labels),
                adjudicated=eid in done,
            )
        )
    return out


def _seen(r: Any) -> LabelSeen:
    return LabelSeen(
        label_id=int(r.id),
        user_id=int(r.user_id),
        reviewer=r.name,
        rating=int(r.rating),
        flags=sorted(r.flags or []),
        preference=r.preference,
        critique=r.critique or "",
        created_at=float(r.created_at),
    )


def waiting_per_stream(store: Store, rule: Rule) -> dict[str, int]:
    """Disagreements not yet adjudicated, per stream that has any (the metrics' gauge, the admin
    page), counted by the database: no label leaves it."""
    cand = _candidates(rule, None, include_adjudicated=False).subquery()
    q = sa.select(cand.c.stream, sa.func.count()).group_by(cand.c.stream)
    with store.engine.connect() as conn:
        return {str(r[0]): int(r[1]) for r in conn.execute(q).all()}
