"""A reward-model update: fresh human labels -> candidate -> gate -> promote or reject.

Data. Prompts are split first by a keyed hash: a ``holdout_fraction`` of them never reach
training and serve the gate. Within each side reviewers' ratings become pairs
(``pairs_from_ratings``): two responses whose ratings differ by at least
``reward.update.rating_gap``, within a prompt, and with ``pairing: absolute`` (the default:
the review UI's scale is the same for every prompt) also across prompts. A pair is *new* when
one of its responses comes from the drifted stream at or after the change (the drift event's
event time), *old* otherwise.

Gate. The candidate is trained from the active version on the training pairs (new and old,
so it does not forget). It is promoted only if, on the held-out pairs, its pairwise
agreement beats the active version's on *new* pairs by ``margin`` and does not fall more
than ``max_regression`` below it on *old* pairs; otherwise it is registered as rejected.
Either way it is kept (folder and row) with its gate numbers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from monitor.config import Settings
from monitor.metrics import Metrics
from monitor.reward.data import Pair, pairs_from_ratings, split_of
from monitor.reward.registry import Registry
from monitor.reward.train import pair_texts
from monitor.store import Store
from monitor.store import tables as t

log = logging.getLogger(__name__)
HOLDOUT_SEED = 104729


class UpdateError(RuntimeError):
    pass


def rated_records(store: Store, stream: str | None = None, since: float | None = None) -> list[dict[str, Any]]:
    """Labelled episodes (not skipped, rated): prompt, response, rating, stream, ts (episode event time)."""
    lb, ep = t.labels, t.episodes
    q = (
        sa.select(ep.c.episode_id, ep.c.stream, ep.c.ts, ep.c.prompt, ep.c.response, lb.c.rating)
        .join(ep, ep.c.episode_id == lb.c.episode_id)
        .where(lb.c.skipped.is_(False), lb.c.rating.is_not(None))
    )
    if stream is not None:
        q = q.where(ep.c.stream == stream)
    if since is not None:
        q = q.where(ep.c.ts >= since)
    with store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(q.order_by(ep.c.ts, ep.c.episode_id)).all()]


def fresh_label_count(store: Store, stream: str, since: float) -> int:
    return len(rated_records(store, stream, since))


def build_pairs(
    records: Sequence[dict[str, Any]],
    stream: str,
    since: float,
    rating_gap: int,
    holdout_fraction: float,
    *,
    across_prompts: bool = False,
    partners: int = 8,
) -> dict[str, list[Pair]]:
    """Pairs split four ways: {train, holdout} x {new, old} as keys train_new, train_old, holdout_new, holdout_old.

    Records are split by prompt *before* pairing, so a held-out pair never shares a prompt (or,
    across prompts, a response) with a training pair."""
    new_texts = {(r["prompt"], r["response"]) for r in records if r["stream"] == stream and r["ts"] >= since}
    out: dict[str, list[Pair]] = {"train_new": [], "train_old": [], "holdout_new": [], "holdout_old": []}
    sides: dict[str, list[dict[str, Any]]] = {"train": [], "holdout": []}
    for r in records:
        test = split_of(r["prompt"], holdout_fraction, seed=HOLDOUT_SEED) == "test"
        sides["holdout" if test else "train"].append(r)
    for side, recs in sides.items():
        for p in pairs_from_ratings(recs, min_gap=float(rating_gap), across_prompts=across_prompts, partners=partners):
            chosen, rejected = pair_texts(p)
            new = chosen in new_texts or rejected in new_texts
            out[f"{side}_{'new' if new else 'old'}"].append(p)
    return out


def _accuracy(model: Any, pairs: Sequence[Pair]) -> float | None:
    from monitor.reward.train import evaluate

    return float(evaluate(model, pairs)["pairwise_accuracy"]) if pairs else None


def gate(
    cand_new: float | None,
    act_new: float | None,
    cand_old: float | None,
    act_old: float | None,
    margin: float,
    max_regression: float,
) -> tuple[bool, str]:
    if cand_new is None:
        return False, "no held-out pairs from the new window"
    base_new = act_new if act_new is not None else 0.5
    if cand_new < base_new + margin:
        return False, f"new-window agreement {cand_new:.3f} < active {base_new:.3f} + margin {margin}"
    if cand_old is not None and act_old is not None and cand_old < act_old - max_regression:
        return False, f"old-window agreement {cand_old:.3f} < active {act_old:.3f} - {max_regression}"
    return True, "passed"


def run_update(
    settings: Settings,
    store: Store,
    *,
    stream: str,
    since: float,
    metrics: Metrics | None = None,
    request_id: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train a candidate on the labels, gate it against the active version, promote or reject it."""
    from monitor.reward.train import load_train_config, train

    ucfg = settings.reward.update
    registry = Registry.for_settings(store, settings)
    registry.root.mkdir(parents=True, exist_ok=True)
    records = rated_records(store)
    split = build_pairs(
        records,
        stream,
        since,
        ucfg.rating_gap,
        ucfg.holdout_fraction,
        across_prompts=ucfg.pairing == "absolute",
        partners=ucfg.partners,
    )
    train_pairs = split["train_new"] + split["train_old"]
    counts = {k: len(v) for k, v in split.items()}
    if not split["train_new"] or not split["holdout_new"]:
        raise UpdateError(f"not enough rated pairs from the new window of {stream}: {counts}")
    loaded = registry.load_active(settings.reward.device)
    active = None if loaded is None else loaded[0]
    cfg = load_train_config(None, [f"{k}={v}" for k, v in ucfg.train.items()])
    t0 = time.perf_counter()
    candidate, train_metrics = train(
        train_pairs, cfg, base=active, progress=progress, description=f"reviewer ratings, stream {stream}"
    )
    train_s = time.perf_counter() - t0
    window = {"stream": stream, "since": since, "pairs": counts, "labels": len(records), "request": request_id}
    verdict = decide(
        settings,
        registry,
        candidate,
        active,
        split,
        data_window=window,
        train_metrics={**train_metrics, "train_seconds": round(train_s, 1)},
        metrics=metrics,
    )
    return {
        "version": verdict["version"],
        "parent": None if active is None else active.version,
        "promoted": verdict["passed"],
        "gate": verdict,
        "pairs": counts,
        "train_seconds": round(train_s, 1),
    }


def decide(
    settings: Settings,
    registry: Registry,
    candidate: Any,
    active: Any,
    split: dict[str, list[Pair]],
    *,
    data_window: dict[str, Any],
    train_metrics: dict[str, Any],
    metrics: Metrics | None = None,
) -> dict[str, Any]:
    """Gate ``candidate`` against ``active`` on the held-out pairs; register it, then promote or reject."""
    ucfg = settings.reward.update
    acc = {
        "candidate_new": _accuracy(candidate, split["holdout_new"]),
        "candidate_old": _accuracy(candidate, split["holdout_old"]),
        "active_new": None if active is None else _accuracy(active, split["holdout_new"]),
        "active_old": None if active is None else _accuracy(active, split["holdout_old"]),
    }
    ok, reason = gate(
        acc["candidate_new"],
        acc["active_new"],
        acc["candidate_old"],
        acc["active_old"],
        ucfg.margin,
        ucfg.max_regression,
    )
    version = registry.register(candidate, data_window=data_window, metrics=train_metrics)
    verdict: dict[str, Any] = {
        **acc,
        "version": version,
        "active": None if active is None else active.version,
        "passed": ok,
        "reason": reason,
        "margin": ucfg.margin,
        "max_regression": ucfg.max_regression,
        "holdout": {k: len(v) for k, v in split.items() if k.startswith("holdout")},
    }
    if ok:
        registry.promote(version, verdict)
    else:
        registry.reject(version, verdict)
    if metrics is not None:
        metrics.rm_updates.labels("promoted" if ok else "rejected").inc()
        metrics.rm_last_training.set(time.time())
    log.info("reward model %s %s (%s)", version, "promoted" if ok else "rejected", reason)
    return verdict
