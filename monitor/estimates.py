"""Estimates over all traffic of a stream from its sampled items (Horvitz-Thompson)."""

from __future__ import annotations

import math
from typing import Any

from monitor.store import Store
from sampling import horvitz_thompson

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
    if quantity.startswith("metadata."):
        cur: Any = row.get("metadata")
        for part in quantity.split(".")[1:]:
            if not isinstance(cur, dict) or part not in cur:
                return None
            cur = cur[part]
        return cur
    raise ValueError(f"unknown quantity {quantity!r}: use one of {', '.join(BUILTIN_QUANTITIES)} or metadata.KEY")


def quantity_value(row: dict[str, Any], quantity: str) -> float | None:
    """The value of a per-episode quantity on a stored episode, or None if it has none."""
    return _number(raw_quantity(row, quantity))


def _number(cur: Any) -> float | None:
    if isinstance(cur, bool):
        return 1.0 if cur else 0.0
    if isinstance(cur, int | float) and math.isfinite(cur):
        return float(cur)
    return None


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
    """
    rows = store.sampled(stream, channel, since, until)
    values: list[float] = []
    probs: list[float] = []
    missing = 0
    binary = True
    for row in rows:
        raw = raw_quantity(row, quantity)
        v = _number(raw)
        if v is None:
            missing += 1
            continue
        binary = binary and isinstance(raw, bool)
        values.append(v)
        probs.append(float(row["inclusion_probability"]))
    population = store.traffic_count(stream, since, until)
    # With missing values the known population no longer matches the items
    # we can use; the ratio (Hajek) estimator does not need it.
    known = population if (population and not missing) else None
    bounds = RATE_BOUNDS if binary and values else None
    est = horvitz_thompson(values, probs, known, confidence, bounds)
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
