"""Estimates over all traffic of a stream from its sampled items (Horvitz-Thompson).

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
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa

from monitor.quality.adjudication import Final, finals
from monitor.quality.labels import label_rows, per_item
from monitor.quality.window import Windows
from monitor.store import Store
from monitor.store import tables as t
from sampling import RunningSums, horvitz_thompson, reliability

BUILTIN_QUANTITIES = ("response_chars", "prompt_chars", "empty_response")
RATE_BOUNDS = (0.0, 1.0)


def raw_quantity(row: dict[str, Any], quantity: str) -> Any:
    """The quantity on a stored episode as found: a number, a boolean, or None (absent)."""
    if quantity == "response_chars":
        return float(len(row["response"]))
    if quantity == "prompt_chars":
        return float(len(row["prompt"]))
    if quantity == "empty_response":
        return not row["response"].strip()
    _check_quantity(quantity)
    return metadata_value(row.get("metadata"), quantity)


def _check_quantity(quantity: str) -> None:
    if quantity not in BUILTIN_QUANTITIES and not quantity.startswith("metadata."):
        raise ValueError(f"unknown quantity {quantity!r}: use one of {', '.join(BUILTIN_QUANTITIES)} or metadata.KEY")


def metadata_value(metadata: Any, quantity: str) -> Any:
    """``metadata.A.B``'s value in an episode's metadata, as found, or None (absent)."""
    cur = metadata
    for part in quantity.split(".")[1:]:
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def quantity_value(row: dict[str, Any], quantity: str) -> float | None:
    """The value of a per-episode quantity on a stored episode, or None if it has none."""
    return _number(raw_quantity(row, quantity))


def _number(cur: Any) -> float | None:
    if isinstance(cur, bool):
        return 1.0 if cur else 0.0
    if isinstance(cur, int | float) and math.isfinite(cur):
        return float(cur)
    return None


# What str.strip() removes (every character whose isspace() is true), for the database to strip the same.
_WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680"
    + "".join(map(chr, range(0x2000, 0x200B)))
    + ("\u2028\u2029\u202f\u205f\u3000")
)


def _quantity_column(quantity: str, dialect: str) -> sa.ColumnElement[Any]:
    """The database expression that gives :func:`raw_quantity` its input, computed where the row is:
    a length, a stripped length, or the metadata (texts are never read out)."""
    e = t.episodes
    if quantity == "response_chars":
        return sa.func.length(e.c.response)
    if quantity == "prompt_chars":
        return sa.func.length(e.c.prompt)
    if quantity == "empty_response":
        strip = sa.func.btrim if dialect == "postgresql" else sa.func.trim
        return sa.func.length(strip(e.c.response, _WHITESPACE))
    _check_quantity(quantity)
    return e.c.metadata


def _stored_quantity(value: Any, quantity: str) -> Any:
    """:func:`raw_quantity` of the value :func:`_quantity_column` read."""
    if quantity == "empty_response":
        return value == 0
    if quantity in BUILTIN_QUANTITIES:
        return float(value)
    return metadata_value(value, quantity)


def estimate_stream(
    store: Store,
    stream: str,
    channel: str,
    quantity: str,
    since: float | None = None,
    until: float | None = None,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """The estimate of ``quantity`` over all traffic of ``stream`` in the window.

    A quantity whose every value is a boolean (``empty_response``, a boolean metadata field) is a
    rate: it gets the score interval of a quantity bounded by 0 and 1 (Hajek mean), so 0 events
    among 30 items reads [0%, 11%], not [0%, 0%]. Other quantities get the normal interval.

    A built-in quantity (every episode has it) is the Horvitz-Thompson mean over all traffic of the
    window; ``metadata.KEY`` is the mean over the episodes that carry the key (Hajek), whether or not
    the sample holds one without it.
    """
    column = _quantity_column(quantity, store.engine.dialect.name)
    # One pass over the values, none of them held: only the quantity and the probability are read,
    # computed by the database, a chunk at a time (Store.iter_sampled).
    sums = RunningSums()
    missing, binary = 0, True
    for row in store.iter_sampled(stream, channel, (column, t.samples.c.inclusion_probability), since, until):
        raw = _stored_quantity(row[0], quantity)
        v = _number(raw)
        if v is None:
            missing += 1
            continue
        binary = binary and isinstance(raw, bool)
        sums.add(v, float(row[1]))
    population = store.traffic_count(stream, since, until)
    # A metadata key may be absent from some episodes: its target is the mean over the episodes that
    # carry it, always the ratio (Hajek), whose population (those episodes) is estimated, not counted.
    # Chosen by whether the sample happened to hold an episode without the key, the target switched
    # at random: with the key on 80% of the traffic, windows with none missing in their sample
    # divided by all traffic, absent values counting as 0 (0.79 of the truth, coverage 0.81).
    known = population if (population and not missing and not quantity.startswith("metadata.")) else None
    # A quantity whose every value is a boolean is a rate: bounded by 0 and 1.
    est = sums.estimate(known, confidence, RATE_BOUNDS if binary and sums.n else None)
    out = est.to_dict()
    for k, v in list(out.items()):
        if isinstance(v, float) and not math.isfinite(v):
            out[k] = None
    return {
        "stream": stream,
        "channel": channel,
        "quantity": quantity,
        "since": since,
        "until": until,
        "population": population,
        "n_missing": missing,
        "estimate": out,
    }


RATING_BOUNDS = (1.0, 7.0)
FLAG_BOUNDS = (0.0, 1.0)


def finite(d: dict[str, Any]) -> dict[str, Any]:
    """NaN/inf (no labels) become None."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def estimates(
    store: Store,
    flags: list[str],
    rows: list[Any] | None = None,
    *,
    reliability_weighting: bool = False,
    prior_labels: float = 5.0,
    final: Mapping[str, Final] | None = None,
    windows: Windows | None = None,
) -> list[dict[str, Any]]:
    """Per stream: the rating estimate and the flag rates over all traffic (``windows``: over each
    stream's window, :mod:`monitor.quality.window`; pass the same to :func:`label_rows` for
    ``rows``).

    With ``reliability_weighting`` (``quality.reliability_weighting``) an item's rating is its
    calibrated value (``sampling.reliability``: each reviewer's bias removed, ratings weighted by
    their precision) instead of the plain mean; the stream then also reports ``rating_unweighted``
    (the estimate without weighting, to show the effect) and ``reliability`` (the fit).

    An adjudicated item (``final``, default: :func:`monitor.quality.adjudication.finals`) counts
    with its final label in place of its reviewers' labels, weighted or not; the reliability fit
    still reads the reviewers' own labels (it measures them), with the final ratings as gold."""
    rows = label_rows(store, windows=windows) if rows is None else rows
    final = finals(store) if final is None else final
    by_stream: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for eid, it in per_item(rows, final).items():
        by_stream[it["stream"]].append({**it, "episode_id": eid})
    rel = (
        reliability.fit(
            [(r.episode_id, r.user_id, float(r.rating)) for r in rows if not r.skipped and r.rating is not None],
            prior_labels=prior_labels,
            bounds=RATING_BOUNDS,
            # An adjudicated rating is the best truth there is: each reviewer's error there is
            # measured against it rather than against the other reviewers.
            gold={eid: float(f.rating) for eid, f in final.items()},
        )
        if reliability_weighting
        else None
    )
    calibrated = None if rel is None else rel.items
    out = []
    for stream in sorted(by_stream):
        items = by_stream[stream]
        probs = [it["p"] for it in items]
        plain = [statistics.fmean(r for r, _ in it["labels"]) for it in items]
        values = (
            plain
            if calibrated is None
            else [plain[i] if it["adjudicated"] else calibrated[it["episode_id"]] for i, it in enumerate(items)]
        )
        rating = horvitz_thompson(values, probs, bounds=RATING_BOUNDS)
        flag_est = {}
        for f in flags:
            vals = [sum(1 for _, fl in it["labels"] if f in fl) / len(it["labels"]) for it in items]
            flag_est[f] = finite(horvitz_thompson(vals, probs, bounds=FLAG_BOUNDS).to_dict())
        row: dict[str, Any] = {
            "stream": stream,
            "population": store.traffic_count(stream, None if windows is None else windows.get(stream)),
            "window_start": None if windows is None else windows.get(stream),
            "n_labelled": len(items),
            "n_adjudicated": sum(1 for it in items if it["adjudicated"]),
            "rating": finite(rating.to_dict()),
            "flags": flag_est,
        }
        if rel is not None:
            row["rating_unweighted"] = finite(horvitz_thompson(plain, probs, bounds=RATING_BOUNDS).to_dict())
            row["reliability"] = {"weighted": True, **rel.to_dict()}
        out.append(row)
    return out


def estimate_series(
    store: Store,
    stream: str,
    bucket_s: int = 3600,
    rows: list[Any] | None = None,
    final: Mapping[str, Final] | None = None,
    windows: Windows | None = None,
) -> list[dict[str, Any]]:
    """The rating estimate per time bucket of episode time (for the chart), adjudicated items at
    their final label. Pass ``rows`` (from :func:`label_rows`) and ``final`` (from
    :func:`monitor.quality.adjudication.finals`) to chart several streams from one read;
    ``windows`` (without ``rows``): the buckets of each stream's window only."""
    buckets: dict[int, list[dict[str, Any]]] = defaultdict(list)
    # The stream's rows first: grouping every stream's labels into items once per stream charted
    # took the admin page 15 s for 10 streams at 200,000 labels.
    mine = [r for r in (label_rows(store, windows=windows) if rows is None else rows) if r.stream == stream]
    for it in per_item(mine, finals(store, stream) if final is None else final).values():
        buckets[int(it["ts"] // bucket_s) * bucket_s].append(it)
    out = []
    for start in sorted(buckets):
        items = buckets[start]
        est = horvitz_thompson(
            [statistics.fmean(r for r, _ in it["labels"]) for it in items],
            [it["p"] for it in items],
            bounds=RATING_BOUNDS,
        )
        d = finite(est.to_dict())
        out.append({"start": start, "mean": d["mean"], "ci_low": d["ci_low"], "ci_high": d["ci_high"], "n": len(items)})
    return out
