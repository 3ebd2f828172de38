"""Labels as the estimators and agreement statistics read them: every label joined with its episode's
human inclusion probability, grouped per item, and agreement between reviewers."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa

from monitor.quality.adjudication import Final
from monitor.quality.window import Windows, in_window
from monitor.store import Store
from monitor.store import tables as t


def krippendorff_alpha_interval(units: list[list[float]]) -> float | None:
    """Krippendorff's alpha with the interval metric; units with fewer than 2 values are ignored.

    >>> round(krippendorff_alpha_interval([[1, 2], [3, 3]]), 4)
    0.7273

    Both disagreements are sums of squared differences over ordered pairs of values, taken in one
    pass each (:func:`pair_spread`). Summed pair by pair they were quadratic in the labels: the
    expected disagreement pairs every value with every other, and with the default overlap (10% of
    items reviewed twice) an admin page at 200,000 labels paired 36,000 values, about 70 s of the
    review service's interpreter per view, growing with the square of the labels kept.
    """
    units = [u for u in units if len(u) >= 2]
    n = sum(len(u) for u in units)
    if n < 2:
        return None
    values = [v for u in units for v in u]
    if len(set(values)) == 1:
        return None  # every rating identical: no variation to agree on
    d_o = sum(pair_spread(u) / (len(u) - 1) for u in units) / n
    d_e = pair_spread(values) / (n * (n - 1))
    return 1.0 - d_o / d_e


def pair_spread(values: list[float]) -> float:
    """The sum over ordered pairs i != j of (values[i] - values[j])**2, in one pass: it is
    2 m sum((v - mean)**2) for m values.

    >>> pair_spread([1, 2, 3, 3])  # 2 * (1 + 4 + 4 + 1 + 1 + 0)
    22.0
    """
    m = len(values)
    mean = sum(values) / m
    return 2.0 * m * sum((v - mean) ** 2 for v in values)


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


def label_rows(store: Store, since: float | None = None, windows: Windows | None = None) -> list[Any]:
    """Every label with its inclusion probability (one read for several estimates); ``since``:
    labels made since then; ``windows``: labels of episodes in their stream's window
    (:mod:`monitor.quality.window`)."""
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
    if windows is not None:
        q = q.where(in_window(windows, s))
    with store.engine.connect() as conn:
        return list(conn.execute(q).all())


def per_item(rows: list[Any], final: Mapping[str, Final] | None = None) -> dict[str, dict[str, Any]]:
    """Non-skipped labels grouped by episode: (rating, flags) per label, probability, stream, ts.

    ``final``: adjudicated labels (:func:`monitor.quality.adjudication.finals`); an adjudicated
    item's labels are replaced by its one final label (``adjudicated`` True on the item)."""
    items: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r.skipped:
            continue
        it = items.setdefault(
            r.episode_id,
            {
                "stream": r.stream,
                "p": float(r.inclusion_probability),
                "ts": float(r.ts),
                "labels": [],
                "adjudicated": False,
            },
        )
        it["labels"].append((int(r.rating), set(r.flags or [])))
    for eid, f in (final or {}).items():
        if eid in items:
            items[eid]["labels"] = [(f.rating, set(f.flags))]
            items[eid]["adjudicated"] = True
    return items


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
