"""Label statistics the database adds up, so that a gauge refreshed every few seconds holds what
it shows (per stream), not every label ever made.

Labels are what people made, and retention keeps them for ever (:mod:`monitor.store.retention`):
five reviewers at 500 labels a day make 900,000 in a year. Read into Python at every refresh,
200,000 of them took the oversight gauges 3.6 s and 280 MB on each round of the action worker
(every ``reward.update.poll_s``, 5 s), and while a refresh held the interpreter the pipeline in
the same process ingested at about a quarter of its pace; a year of labels would have taken a
pod's whole memory limit each round.

* :func:`rating_sums`: per stream, the sums a bounded Hajek estimate of the mean rating needs
  (:class:`sampling.WeightedSums`), in two grouped passes of the database: first the weighted
  mean, then the squares around it (not ``sum(y**2) - n * mean**2``, which cancels). One row per
  stream comes back.
* :func:`rated_items`: per labelled episode, its reviewers' mean rating, inclusion probability
  and time, to be narrowed (one stream, a span of time) before anything is read.

They read what :func:`monitor.quality.labels.label_rows` and
:func:`monitor.quality.labels.per_item` read: the non-skipped labels of episodes sampled for the
human channel, an adjudicated item at its newest final rating (``tests/test_oversight_gauges.py``
compares them with :func:`monitor.quality.estimates.estimates` on both databases).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from monitor.quality.window import Windows, in_window
from monitor.store import tables as t
from sampling import WeightedSums

__all__ = ["rated_items", "rating_sums"]


def rated_items(*where: sa.ColumnElement[bool]) -> sa.Select[Any]:
    """Per labelled episode (``where`` on ``labels`` and its human ``samples`` row): ``episode_id``,
    ``stream``, ``p`` (its inclusion probability), ``ts`` (its time) and ``rating`` (the mean of
    its reviewers' ratings; skips do not count)."""
    lb, s = t.labels, t.samples
    return (
        sa.select(
            lb.c.episode_id,
            sa.func.min(lb.c.stream).label("stream"),
            sa.func.min(s.c.inclusion_probability).label("p"),
            sa.func.min(s.c.ts).label("ts"),
            sa.func.avg(sa.cast(lb.c.rating, sa.Float)).label("rating"),
        )
        .join(s, sa.and_(s.c.episode_id == lb.c.episode_id, s.c.channel == "human"))
        .where(lb.c.skipped == sa.false(), lb.c.rating.is_not(None), *where)
        .group_by(lb.c.episode_id)
    )


def _items(windows: Windows | None = None) -> sa.CTE:
    """Each labelled item's value: its newest adjudication's rating, else its reviewers' mean
    (``windows``: the items of each stream's window, :mod:`monitor.quality.window`)."""
    a = t.adjudications
    rated = (rated_items() if windows is None else rated_items(in_window(windows))).subquery("rated")
    newest = sa.select(sa.func.max(a.c.id)).group_by(a.c.episode_id)
    final = sa.select(a.c.episode_id, a.c.rating).where(a.c.id.in_(newest)).subquery("final")
    y = sa.func.coalesce(sa.cast(final.c.rating, sa.Float), rated.c.rating)
    return (
        sa.select(rated.c.stream, rated.c.p, y.label("y"))
        .select_from(rated.outerjoin(final, final.c.episode_id == rated.c.episode_id))
        .cte("item")
    )


def rating_sums(conn: sa.Connection, windows: Windows | None = None) -> dict[str, WeightedSums]:
    """Per stream with labels: the sums of its items' ratings (module docstring), over each
    stream's window when ``windows`` is given."""
    item = _items(windows)
    one = sa.literal(1.0, sa.Float)
    per = (
        sa.select(
            item.c.stream,
            sa.func.count().label("n"),
            sa.func.sum(one / item.c.p).label("sw"),
            sa.func.sum(one / (item.c.p * item.c.p)).label("sww"),
            sa.func.sum(item.c.y / item.c.p).label("swy"),
        )
        .group_by(item.c.stream)
        .cte("per")
    )
    r = item.c.y - per.c.swy / per.c.sw
    q = (
        sa.select(
            per.c.stream,
            per.c.n,
            per.c.sw,
            per.c.sww,
            per.c.swy,
            sa.func.sum((one - item.c.p) * r * r / (item.c.p * item.c.p)).label("design"),
            sa.func.sum(r * r / item.c.p).label("spread"),
        )
        .select_from(item.join(per, per.c.stream == item.c.stream))
        .group_by(per.c.stream, per.c.n, per.c.sw, per.c.sww, per.c.swy)
    )
    out = {}
    for row in conn.execute(q):
        sw = float(row.sw)
        out[str(row.stream)] = WeightedSums(
            n=int(row.n),
            sum_w=sw,
            n_effective=sw * sw / float(row.sww),
            total=float(row.swy),
            design=float(row.design) / (sw * sw),
            spread=float(row.spread) / sw,
        )
    return out
