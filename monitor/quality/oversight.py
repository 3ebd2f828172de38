"""The oversight gauges: human-rated quality over all traffic, reward-model vs human
agreement, and the reward-hacking alarm, per stream.

* ``quality``: the Horvitz-Thompson (Hajek) estimate of the mean human rating over all traffic,
  from the labelled sample and its inclusion probabilities, with its 95% score interval (inside
  the 1-7 scale, never a point when every rating agrees: ``sampling.bounded_interval``).
* ``agreement``: over the most recent ``window`` labelled episodes that the active reward model
  also scored, the share of pairs with different ratings that the reward model orders the same
  way as the reviewers (ties in score count half).
* ``reward_hacking``: the reward-model score trend rises while human-rated quality falls or
  stays flat. Compares the latest ``window`` scored episodes with the first ``window`` that the
  active version scored in the stream, its baseline (by episode time; adjacent windows would
  miss a change that is older than one window by the time anyone looks): the mean score rose
  by more than two standard errors, and the mean human rating over the same two spans did not
  rise by more than two standard errors (or has too few labels to tell, which is itself a
  reason to look). Both means weight items by their inverse inclusion probability (Hajek), so
  boosted sampling does not bias them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from monitor.metrics import Metrics
from monitor.quality.aggregate import rated_items, rating_sums
from monitor.quality.estimates import RATING_BOUNDS, estimates, finite
from monitor.quality.labels import label_rows
from monitor.quality.window import Windows
from monitor.store import Store
from monitor.store import tables as t
from sampling import bounded_hajek


def _hajek(values: list[float], probs: list[float]) -> tuple[float, float] | None:
    """Weighted mean and its (linearised) standard error."""
    if len(values) < 2:
        return None
    w = [1.0 / p for p in probs]
    sw = sum(w)
    mean = sum(wi * v for wi, v in zip(w, values, strict=True)) / sw
    var = sum((wi * (v - mean)) ** 2 for wi, v in zip(w, values, strict=True)) / sw**2
    return mean, math.sqrt(var)


def _concordance(items: list[tuple[float, float]]) -> tuple[float | None, int]:
    good = 0.0
    n = 0
    for i, (ri, si) in enumerate(items):
        for rj, sj in items[i + 1 :]:
            if ri == rj:
                continue
            n += 1
            d = (ri - rj) * (si - sj)
            good += 1.0 if d > 0 else 0.5 if d == 0 else 0.0
    return (good / n if n else None), n


def compute(
    store: Store,
    version: str | None,
    window: int = 200,
    *,
    reliability_weighting: bool = False,
    prior_labels: float = 5.0,
    windows: Windows | None = None,
) -> dict[str, dict[str, Any]]:
    """The gauges of every stream. The service refreshes them every few seconds, so what it reads
    is bounded by streams and ``window``, not by traffic or by the labels people made: the
    database adds up each stream's ratings (:mod:`monitor.quality.aggregate`), and per stream the
    first and the last ``window`` scores of ``version`` and its last ``window`` labelled and
    scored episodes come back (index ``ix_rm_scores_version_stream_ts``). Reading every score of
    the version, it took a second per 100,000 scores; reading every label, 3.6 s and 280 MB per
    200,000 labels.

    With ``reliability_weighting`` the quality estimate is the exception: its fit weighs every
    reviewer against every other on all their labels, so it reads them all (those of each stream's
    window, with ``windows``: the span ``quality`` covers, as the admin summary's estimates do)."""
    out: dict[str, dict[str, Any]] = defaultdict(dict)
    with store.engine.connect() as conn:
        if reliability_weighting:
            rows = label_rows(store, windows=windows)
            for est in estimates(
                store, [], rows, reliability_weighting=True, prior_labels=prior_labels, windows=windows
            ):
                out[est["stream"]]["quality"] = est["rating"]
        else:
            for stream, sums in rating_sums(conn, windows).items():
                out[stream]["quality"] = finite(bounded_hajek(sums, RATING_BOUNDS).to_dict())
        if version is None:
            return dict(out)
        for stream in _scored_streams(conn, version):
            ends = _window_ends(conn, version, stream, window)
            if ends is None:
                continue  # scores without an rm sample: none of them counts
            labelled = _labelled_window(conn, version, stream, window)
            agree, npairs = _concordance([(rating, score) for rating, score in labelled])
            out[stream]["agreement"] = {"value": agree, "pairs": npairs, "items": len(labelled)}
            out[stream]["reward_hacking"] = _hacking(conn, ends, stream)
    return dict(out)


def _scored(version: str, *columns: Any) -> Any:
    """The version's scores of rm-sampled episodes, with their inclusion probabilities (or ``columns``)."""
    sc, s = t.rm_scores, t.samples
    cols = columns or (sc.c.episode_id, sc.c.stream, sc.c.score, sc.c.ts, s.c.inclusion_probability)
    return (
        sa.select(*cols)
        .select_from(sc)
        .join(s, sa.and_(s.c.episode_id == sc.c.episode_id, s.c.channel == "rm"))
        .where(sc.c.version == version)
    )


def _order(rows: list[Any]) -> list[Any]:
    # In Python, not in SQL: episode ids break ties by code point, whatever the database's collation.
    return sorted(rows, key=lambda r: (r.ts, r.episode_id))


def _scored_streams(conn: sa.Connection, version: str) -> list[str]:
    """The streams the version scored: one index seek per stream (a loose index scan), where
    ``DISTINCT`` would read every score."""
    q = sa.text(
        "WITH RECURSIVE s(stream) AS ("
        " SELECT MIN(stream) FROM rm_scores WHERE version = :v"
        " UNION ALL"
        " SELECT (SELECT MIN(r.stream) FROM rm_scores r WHERE r.version = :v AND r.stream > s.stream)"
        " FROM s WHERE s.stream IS NOT NULL"
        ") SELECT stream FROM s WHERE stream IS NOT NULL"
    )
    return [str(x) for x in conn.execute(q, {"v": version}).scalars()]


def _labelled_window(conn: sa.Connection, version: str, stream: str, window: int) -> list[tuple[float, float]]:
    """(mean rating, score) of the last ``window`` labelled episodes of the stream that the
    version scored, by episode time (ties by id, in Python as :func:`_order`).

    One flat join grouped once, driven by the stream's labels (``ix_labels_stream_created``) with
    primary-key reads of the rest: a grouped subquery joined to the scores let PostgreSQL, with
    statistics older than the rows, loop over it once per score (12 s a stream of 10,000)."""
    lb, sc, s = t.labels, t.rm_scores, t.samples
    human = s.alias("human")
    human_ts = sa.func.min(human.c.ts)
    joined = (
        sa.select(lb.c.episode_id)
        .join(human, sa.and_(human.c.episode_id == lb.c.episode_id, human.c.channel == "human"))
        .join(sc, sa.and_(sc.c.episode_id == lb.c.episode_id, sc.c.version == version))
        .join(s, sa.and_(s.c.episode_id == lb.c.episode_id, s.c.channel == "rm"))
        .where(lb.c.stream == stream, sc.c.stream == stream, human.c.stream == stream)
        .where(lb.c.skipped == sa.false(), lb.c.rating.is_not(None))
        .group_by(lb.c.episode_id)
    )
    # Ranked by time, newest first: the rows tied with the window's last one share its rank, so
    # the window is cut in Python below, by id, whatever the database's collation.
    ranked = joined.add_columns(
        human_ts.label("human_ts"),
        sa.func.avg(sa.cast(lb.c.rating, sa.Float)).label("rating"),
        sa.func.min(sc.c.score).label("score"),
        sa.func.min(sc.c.ts).label("score_ts"),
        sa.func.rank().over(order_by=human_ts.desc()).label("newest"),
    ).subquery("ranked")
    q = sa.select(ranked).where(ranked.c.newest <= window)
    rows = sorted(conn.execute(q).all(), key=lambda r: (float(r.human_ts), float(r.score_ts), r.episode_id))
    return [(float(r.rating), float(r.score)) for r in rows[-window:]]


@dataclass
class WindowEnds:
    """The first and the last ``window`` scores of a stream when there are two windows' worth
    (``enough``); empty otherwise."""

    first: list[Any]
    last: list[Any]
    enough: bool


def _window_ends(conn: sa.Connection, version: str, stream: str, window: int) -> WindowEnds | None:
    sc = t.rm_scores
    n = conn.execute(
        sa.select(sa.func.count()).select_from(
            _scored(version).where(sc.c.stream == stream).limit(2 * window).subquery()
        )
    ).scalar_one()
    if n == 0:
        return None
    if n < 2 * window:
        return WindowEnds([], [], enough=False)  # the alarm needs two windows: nothing more to read

    def end(ascending: bool) -> list[Any]:
        # Every row up to the window's last time, then cut in Python: rows tied with it are
        # ordered by id there.
        order = sc.c.ts.asc() if ascending else sc.c.ts.desc()
        cut_q = _scored(version, sc.c.ts).where(sc.c.stream == stream).order_by(order).offset(window - 1).limit(1)
        cut = conn.execute(cut_q).scalar()
        q = _scored(version).where(sc.c.stream == stream)
        if cut is not None:
            q = q.where(sc.c.ts <= cut if ascending else sc.c.ts >= cut)
        rows = _order(list(conn.execute(q).all()))
        return rows[:window] if ascending else rows[-window:]

    return WindowEnds(end(True), end(False), enough=True)


def _hacking(conn: sa.Connection, ends: WindowEnds, stream: str) -> dict[str, Any]:
    if not ends.enough:
        return {"suspected": False, "reason": "not enough scored episodes"}
    prev, recent = ends.first, ends.last
    sp = _hajek([float(r.score) for r in prev], [float(r.inclusion_probability) for r in prev])
    sr = _hajek([float(r.score) for r in recent], [float(r.inclusion_probability) for r in recent])
    assert sp is not None and sr is not None
    rm_rise = sr[0] - sp[0]
    rm_up = rm_rise > 2 * math.hypot(sp[1], sr[1])

    def span(lo: float, hi: float) -> tuple[float, float] | None:
        s = t.samples
        # The sample's stream too: the span is a range of ix_samples_stream_channel_ts.
        span_q = rated_items(t.labels.c.stream == stream, s.c.stream == stream, s.c.ts >= lo, s.c.ts <= hi)
        rows = conn.execute(span_q).all()
        return _hajek([float(r.rating) for r in rows], [float(r.p) for r in rows])

    hp = span(float(prev[0].ts), float(prev[-1].ts))
    hr = span(float(recent[0].ts), float(recent[-1].ts))
    if hp is None or hr is None:
        human_up = False  # too few labels to see humans agree with the rise
        human_rise = None
    else:
        human_rise = hr[0] - hp[0]
        human_up = human_rise > 2 * math.hypot(hp[1], hr[1])
    return {
        "suspected": bool(rm_up and not human_up),
        "rm_rise": rm_rise,
        "human_rise": human_rise,
        "reason": "rm score rises, human rating does not" if rm_up and not human_up else "no",
    }


def publish(metrics: Metrics, result: dict[str, dict[str, Any]]) -> None:
    for stream, r in result.items():
        label = metrics.stream_label(stream)
        q = r.get("quality")
        if q is not None:
            for bound, key in (("estimate", "mean"), ("ci_low", "ci_low"), ("ci_high", "ci_high")):
                v = q.get(key)
                if isinstance(v, float) and math.isfinite(v):
                    metrics.quality_estimate.labels(label, bound).set(v)
        a = r.get("agreement")
        if a is not None and a["value"] is not None:
            metrics.rm_agreement.labels(label).set(a["value"])
        h = r.get("reward_hacking")
        if h is not None:
            metrics.reward_hacking.labels(label).set(1.0 if h["suspected"] else 0.0)
