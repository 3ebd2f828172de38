"""A reward-model update: fresh human labels -> candidate -> gate -> promote or reject.

Data. Prompts are split first by a keyed hash: a ``holdout_fraction`` of them never reach
training and serve the gate. Within each side reviewers' ratings become pairs
(``pairs_from_ratings``): two responses whose ratings differ by at least
``reward.update.rating_gap``, within a prompt, and with ``pairing: absolute`` (the default:
the review UI's scale is the same for every prompt) also across prompts. A pair is *new* when
one of its responses comes from the drifted stream at or after the change (the drift event's
event time), *old* otherwise.

Gate. The candidate is trained from the active version on the training pairs (new and old,
so it does not forget), then both are scored on the held-out pairs. Agreement is the share of
held-out pairs a model orders as the reviewers did (ties count half); the gain is candidate minus
active on the *same* pairs. Held-out pairs are not independent: with ``pairing: absolute`` every
rated response sits in up to ``2 * partners`` pairs, so one misjudged response moves many of them.
Every interval therefore uses a dyadic-robust variance (pairs that share a response covary) turned
into an effective number of pairs (never more than the pairs themselves), then a Wilson interval:
for an agreement on the pairs, for the gain on the discordant pairs (the share of those the
candidate wins, mapped back to the gain, as McNemar's test does). Each bound is one-sided at
``gate_confidence`` (0.95: together a 90% interval). The verdict, on the new held-out pairs:

* ``reject``: the gain's upper bound is below ``margin`` (the candidate is not better by the margin
  it needs, and more labels would not change that), or the old pairs' gain is below
  ``-max_regression`` with its upper bound below zero (significantly worse on the old stream);
* ``undecided`` (``could_not_decide``): fewer than ``min_gate_pairs`` new held-out pairs, or an
  interval that straddles; the active version stays, the candidate is kept with status
  ``undecided`` and the record says about how many more labels the observed gain would need;
* ``promote``: the gain's lower bound is above zero and the gain is at least ``margin``.

Without an active version (bootstrap) the rule stays "beat chance (0.5) by ``margin``", with the
intervals recorded. Either way the candidate is kept (folder and row) with this record.

Sensitivity. Both versions also score one seeded probe set of perturbed/original pairs
(``monitor.reward.sensitivity``); a candidate that loses sensitivity on any perturbation kind
beyond ``max_sensitivity_loss`` (significantly: the loss's lower bound above zero, on at least
``sensitivity_min_pairs`` pairs, on a kind the active version detects better than
``sensitivity_floor``) is rejected whatever its gain, and the rule names the kind. The
per-kind tables go into the record (``sensitivity``) and the ``oversight_rm_sensitivity`` gauges.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from statistics import NormalDist
from typing import Any

import numpy as np
import sqlalchemy as sa

from monitor.config import Settings
from monitor.metrics import Metrics
from monitor.reward import augment
from monitor.reward import sensitivity as rm_sensitivity
from monitor.reward.data import Pair, pairs_from_ratings, split_of
from monitor.reward.registry import ActiveChanged, Registry
from monitor.reward.train import length_outcomes, pair_texts
from monitor.store import Store
from monitor.store import tables as t
from monitor.store.adjudications import finals
from sampling import reliability

log = logging.getLogger(__name__)
HOLDOUT_SEED = 104729


class UpdateError(RuntimeError):
    pass


def rated_records(store: Store, stream: str | None = None, since: float | None = None) -> list[dict[str, Any]]:
    """Labelled episodes (not skipped, rated): prompt, response, rating, stream, ts (episode event
    time), user_id, and ``adjudicated``: one record per label, except that an adjudicated episode
    (:mod:`monitor.quality.adjudication`) gives one record, its final label (the adjudicator's
    ``user_id``), in place of its reviewers' disagreeing labels."""
    lb, ep = t.labels, t.episodes
    q = (
        sa.select(ep.c.episode_id, ep.c.stream, ep.c.ts, ep.c.prompt, ep.c.response, lb.c.rating, lb.c.user_id)
        .join(ep, ep.c.episode_id == lb.c.episode_id)
        .where(lb.c.skipped.is_(False), lb.c.rating.is_not(None))
    )
    if stream is not None:
        q = q.where(ep.c.stream == stream)
    if since is not None:
        q = q.where(ep.c.ts >= since)
    with store.engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(q.order_by(ep.c.ts, ep.c.episode_id)).all()]
    final = finals(store, stream)
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for r in rows:
        f = final.get(r["episode_id"])
        if f is None:
            out.append({**r, "adjudicated": False})
        elif r["episode_id"] not in seen:
            seen.add(r["episode_id"])
            out.append({**r, "rating": f.rating, "user_id": f.user_id, "adjudicated": True})
    return out


def calibrated_records(records: Sequence[dict[str, Any]], prior_labels: float = 5.0) -> list[dict[str, Any]]:
    """``quality.reliability_weighting`` for training data: one record per episode, its rating the
    calibrated value of its labels (``sampling.reliability``: reviewer bias removed, ratings
    weighted by reviewer precision) instead of one record per label averaged as equals.

    An adjudicated record keeps its final rating: the adjudicator already settled the item, and
    is no reviewer whose bias the fit could estimate."""
    fit = reliability.fit(
        [(r["episode_id"], r["user_id"], float(r["rating"])) for r in records if not r.get("adjudicated")],
        prior_labels=prior_labels,
    )
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        rating = r["rating"] if r.get("adjudicated") else fit.items[r["episode_id"]]
        out.setdefault(r["episode_id"], {**r, "rating": rating})
    return list(out.values())


def fresh_label_count(store: Store, stream: str, since: float) -> int:
    return len(rated_records(store, stream, since))


def held_out(prompt: str, holdout_fraction: float) -> bool:
    """Whether the gate holds ``prompt`` out: its labels never reach training."""
    return split_of(prompt, holdout_fraction, seed=HOLDOUT_SEED) == "test"


def add_perturbation_pairs(
    split: dict[str, list[Pair]],
    records: Sequence[dict[str, Any]],
    ucfg: Any,
    probe: rm_sensitivity.GateProbe | None,
) -> None:
    """``split["train_perturbed"]``: the training side's rated answers chosen over copies made
    worse (``monitor.reward.augment``; ``reward.update.perturbation_pairs`` per kind, at most
    ``perturbation_share`` of the ratings' training pairs in all), never of a prompt the gate holds
    out or probes with."""
    exclude = probe.prompts if probe is not None else set()
    train_side = [r for r in records if not held_out(r["prompt"], ucfg.holdout_fraction)]
    rated_pairs = len(split["train_new"]) + len(split["train_old"])
    split["train_perturbed"] = augment.perturbation_pairs(
        train_side,
        per_kind=ucfg.perturbation_pairs,
        seed=ucfg.sensitivity_seed,
        exclude_prompts=exclude,
        max_total=int(ucfg.perturbation_share * rated_pairs),
    )


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
        sides["holdout" if held_out(r["prompt"], holdout_fraction) else "train"].append(r)
    for side, recs in sides.items():
        for p in pairs_from_ratings(recs, min_gap=float(rating_gap), across_prompts=across_prompts, partners=partners):
            chosen, rejected = pair_texts(p)
            new = chosen in new_texts or rejected in new_texts
            out[f"{side}_{'new' if new else 'old'}"].append(p)
    return out


def outcomes(model: Any, pairs: Sequence[Pair]) -> np.ndarray:
    """Per pair: 1 when ``model`` orders it as the reviewers did, 0 when not, 0.5 on a tie."""
    texts: dict[tuple[str, str], int] = {}
    idx = [tuple(texts.setdefault(x, len(texts)) for x in pair_texts(p)) for p in pairs]
    if not idx:
        return np.zeros(0)
    scores = np.asarray(model.score([x[0] for x in texts], [x[1] for x in texts]), dtype=float)
    d = np.array([scores[c] - scores[r] for c, r in idx])
    return np.where(d > 0, 1.0, np.where(d == 0, 0.5, 0.0))


def response_ends(pairs: Sequence[Pair]) -> tuple[np.ndarray, np.ndarray]:
    """For each pair, the indices of its two responses (a response = its (prompt, text))."""
    ids: dict[tuple[str, str], int] = {}
    ends = [[ids.setdefault(x, len(ids)) for x in pair_texts(p)] for p in pairs]
    arr = np.array(ends, dtype=np.int64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def dyadic_variance(x: np.ndarray, left: np.ndarray, right: np.ndarray) -> float:
    """Variance of ``mean(x)`` when pairs sharing a response covary (dyadic-robust): the sum over
    responses of the squared summed residuals of their pairs, less each pair's own square once
    (each pair has two responses), over n squared. Independent pairs give the usual var/n."""
    n = len(x)
    if n == 0:
        return 0.0
    e = x - x.mean()
    size = int(max(left.max(), right.max())) + 1
    per_response = np.bincount(left, e, size) + np.bincount(right, e, size)
    return float(max((per_response @ per_response - e @ e) / n**2, 0.0))


def wilson(p: float, n: float, z: float) -> tuple[float, float]:
    """Wilson score bounds for a share ``p`` observed on ``n`` (effective) trials."""
    if n <= 0:
        return 0.0, 1.0
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _effective(n: int, naive: float, robust: float) -> float:
    """Pairs worth of independent evidence: n over the design effect (at least 1: never more than n)."""
    if robust <= 0 or naive <= 0:
        return float(n)
    return n / max(1.0, robust / naive)


def agreement_interval(x: np.ndarray, left: np.ndarray, right: np.ndarray, z: float) -> dict[str, Any]:
    n, p = len(x), float(x.mean())
    n_eff = _effective(n, float(x.var()) / n, dyadic_variance(x, left, right))
    lo, hi = wilson(p, n_eff, z)
    return {"agreement": round(p, 4), "lo": round(lo, 4), "hi": round(hi, 4), "n_eff": round(n_eff, 1)}


def gain_interval(cand: np.ndarray, act: np.ndarray, left: np.ndarray, right: np.ndarray, z: float) -> dict[str, Any]:
    """The paired gain and its bounds: a Wilson interval on the share of the discordant pairs the
    candidate wins (effective size from the dyadic variance of the differences), mapped to the gain."""
    n, diff = len(cand), cand - act
    gain = float(diff.mean())
    robust = dyadic_variance(diff, left, right)
    wins, losses = float(np.clip(diff, 0, None).sum()), float(np.clip(-diff, 0, None).sum())
    disc = wins + losses
    if disc == 0:
        lo = hi = 0.0
    else:
        m_eff = _effective(n, float(diff.var()) / n, robust) * disc / n
        w_lo, w_hi = wilson(wins / disc, m_eff, z)
        lo, hi = disc / n * (2 * w_lo - 1), disc / n * (2 * w_hi - 1)
    return {
        "gain": round(gain, 4),
        "lo": round(lo, 4),
        "hi": round(hi, 4),
        "se": round(math.sqrt(robust), 4),
        "discordant": round(disc, 1),
    }


def within_prompt(pairs: Sequence[Pair]) -> np.ndarray:
    """Per pair: whether both responses answer the same prompt (else a pair across prompts)."""
    return np.array([a[0] == b[0] for a, b in map(pair_texts, pairs)], dtype=bool)


def side_report(candidate: Any, active: Any, pairs: Sequence[Pair], z: float) -> dict[str, Any] | None:
    """n, responses, both agreements with intervals and the paired gain on ``pairs`` (None if empty),
    "the longer answer wins" on the same pairs, and the pairs within one prompt on their own.

    With ``pairing: absolute`` most held-out pairs join answers to *different* prompts: their
    agreement measures ratings across prompts, where a prompt's difficulty moves a rating as much
    as the answer does, while a policy is trained and compared on answers to the same prompt. The
    record says how many pairs are of each kind, and the within-prompt agreements apart, so a
    reader sees what the verdict could and could not measure (the verdict itself reads all pairs)."""
    if not pairs:
        return None
    left, right = response_ends(pairs)
    cand = outcomes(candidate, pairs)
    act = None if active is None else outcomes(active, pairs)
    out: dict[str, Any] = {
        "n": len(pairs),
        "responses": int(max(left.max(), right.max())) + 1,
        "candidate": agreement_interval(cand, left, right, z),
        "active": None,
        "gain": None,
        "longer_wins": agreement_interval(np.asarray(length_outcomes(pairs)), left, right, z),
        "within_prompt": within_report(pairs, cand, act, z),
    }
    if act is not None:
        out["active"] = agreement_interval(act, left, right, z)
        out["gain"] = gain_interval(cand, act, left, right, z)
    return out


def within_report(pairs: Sequence[Pair], cand: np.ndarray, act: np.ndarray | None, z: float) -> dict[str, Any]:
    """The pairs of ``pairs`` within one prompt: their number and, when there are any, both
    versions' agreements on them with intervals (``cand``/``act``: the outcomes on all pairs)."""
    mask = within_prompt(pairs)
    out: dict[str, Any] = {"n": int(mask.sum()), "candidate": None, "active": None}
    if out["n"]:
        sub = [p for p, m in zip(pairs, mask, strict=True) if m]
        left, right = response_ends(sub)
        out["candidate"] = agreement_interval(cand[mask], left, right, z)
        if act is not None:
            out["active"] = agreement_interval(act[mask], left, right, z)
    return out


def labels_needed(
    new: dict[str, Any], margin: float, min_pairs: int, z: float, holdout_fraction: float
) -> dict[str, int] | None:
    """About how many more held-out pairs (and fresh labels) the observed gain needs for its lower
    bound to clear zero (normal approximation, the SE shrinking as 1/sqrt(n)); None when the gain
    observed is below the margin: more labels would then reject, not promote."""
    gain, n = new["gain"]["gain"], new["n"]
    if gain <= 0 or gain < margin:
        return None
    se = new["gain"]["se"]
    target = max(float(min_pairs), n * (z * se / gain) ** 2 if se > 0 else float(n))
    pairs = max(0, math.ceil(target - n))
    # Labels per held-out pair as observed; only holdout_fraction of new labels reach the gate.
    labels = math.ceil(pairs * new["responses"] / n / holdout_fraction)
    return {"pairs": pairs, "labels": labels}


def gate(
    new: dict[str, Any] | None, old: dict[str, Any] | None, margin: float, max_regression: float, min_pairs: int
) -> tuple[str, str]:
    """(verdict, the rule that decided) from the side reports; see the module docstring."""
    if new is None:
        return "reject", "no held-out pairs from the new window"
    cand = new["candidate"]
    if new["gain"] is None:  # bootstrap: no active version to compare with
        if cand["agreement"] >= 0.5 + margin:
            return "promote", f"bootstrap: agreement {cand['agreement']:.3f} >= chance 0.5 + margin {margin}"
        return "reject", f"bootstrap: agreement {cand['agreement']:.3f} < chance 0.5 + margin {margin}"
    g = new["gain"]
    doubt = None  # an old-window loss that is not significant: undecided, unless a rule rejects
    if old is not None and old["gain"] is not None and old["gain"]["gain"] < -max_regression:
        og = old["gain"]
        if og["hi"] < 0:
            return "reject", f"old-window gain {og['gain']:+.3f} < -{max_regression}, upper bound {og['hi']:+.3f} < 0"
        doubt = f"old-window gain {og['gain']:+.3f} < -{max_regression} but not significant"
    # Before the doubt: a candidate the new window rejects is rejected, not sent back for labels
    # that cannot change that.
    if g["hi"] < margin or g["hi"] <= 0:
        return "reject", f"new-window gain upper bound {g['hi']:+.3f} < margin {margin}"
    if doubt is not None:
        return "undecided", doubt
    if new["n"] < min_pairs:
        return "undecided", f"{new['n']} new held-out pairs < min_gate_pairs {min_pairs}"
    if g["lo"] > 0 and g["gain"] >= margin:
        return "promote", f"new-window gain {g['gain']:+.3f} >= margin {margin}, lower bound {g['lo']:+.3f} > 0"
    return "undecided", f"new-window gain {g['gain']:+.3f}, interval [{g['lo']:+.3f}, {g['hi']:+.3f}] straddles"


def caveats(new: dict[str, Any] | None, outcome: str) -> list[str]:
    """What a promotion leaves true that its gain does not show. The gain is against the version
    the candidate replaces, so a candidate can win it and still order the new held-out pairs worse
    than chance, or worse than "the longer answer wins" (significantly: its upper bound below 0.5,
    or below the baseline's lower bound), where the active version was trained for other traffic.
    Said in the record and in the gate's line, never a reason to refuse: the version it replaces is
    worse still. Measured: ``bench/closed_loop.py --dev`` promoted such a candidate (0.423 on the
    gate's new pairs against the active version's 0.263; "longer wins" 0.871)."""
    if outcome != "promote" or new is None or new["active"] is None:
        return []
    cand = new["candidate"]
    out = []
    if cand["hi"] < 0.5:
        out.append(f"still worse than chance on the new held-out pairs: {_interval(cand, 'agreement')}")
    base = new.get("longer_wins")
    if base is not None and cand["hi"] < base["lo"]:
        out.append(
            f'still below "longer wins" on the new held-out pairs: {_interval(cand, "agreement")} against'
            f" {_interval(base, 'agreement')}"
        )
    return out


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
    if settings.quality.reliability_weighting:
        records = calibrated_records(records, settings.quality.reliability_prior_labels)
    split = build_pairs(
        records,
        stream,
        since,
        ucfg.rating_gap,
        ucfg.holdout_fraction,
        across_prompts=ucfg.pairing == "absolute",
        partners=ucfg.partners,
    )
    if not split["train_new"] or not split["holdout_new"]:
        counts = {k: len(v) for k, v in split.items()}
        raise UpdateError(f"not enough rated pairs from the new window of {stream}: {counts}")
    from monitor.reward.kinds.updates import active_kind, update_kind

    brought_in = active_kind(registry)
    # Drawn once, before training: the perturbed training pairs keep out of its prompts, and the
    # gate measures on the very same items.
    probe = rm_sensitivity.gate_probe(ucfg, store, stream)
    if brought_in is None or brought_in[1] == "hf":  # what trains here; a judge's calibration does not
        add_perturbation_pairs(split, records, ucfg, probe)
    else:
        split["train_perturbed"] = []
    train_pairs = split["train_new"] + split["train_old"] + split["train_perturbed"]
    counts = {k: len(v) for k, v in split.items()}

    if brought_in is not None:  # a brought-in kind: LoRA, or calibration plus a training request
        return update_kind(
            settings,
            store,
            registry,
            split,
            records,
            stream=stream,
            since=since,
            metrics=metrics,
            request_id=request_id,
            progress=progress,
            probe=probe,
        )
    loaded = registry.load_active(settings.reward.device)
    active = None if loaded is None else loaded[0]
    generation = -1 if loaded is None else loaded[1]  # what the gate compares with: promote only over it
    cfg = load_train_config(None, [f"{k}={v}" for k, v in ucfg.train.items()])
    t0 = time.perf_counter()
    candidate, train_metrics = train(
        train_pairs,
        cfg,
        base=active if ucfg.start == "active" else None,
        progress=progress,
        description=f"reviewer ratings, stream {stream}",
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
        probe=probe,
        generation=generation,
    )
    return {
        "version": verdict["version"],
        "parent": None if active is None else active.version,
        "promoted": verdict["passed"],
        "gate": verdict,
        "pairs": counts,
        "train_seconds": round(train_s, 1),
    }


OUTCOMES = {"promote": "promoted", "reject": "rejected", "undecided": "undecided"}


def candidate_id(candidate: Any) -> str | None:
    """The id the registry will file ``candidate`` under, where it can tell before saving it: a
    built-in model's content id, a brought-in kind's version (None: it cannot tell)."""
    content = getattr(candidate, "content_id", None)
    if callable(content):
        return str(content())
    version = getattr(candidate, "version", None)
    return None if version is None else str(version)


def unchanged(same: Mapping[str, Any], active: Any, confidence: float) -> dict[str, Any]:
    """The verdict of a candidate the registry holds already: nothing to gate, nothing written."""
    version = str(same["version"])
    rule = f"the candidate is version {version} ({same['status']}) itself: nothing changed"
    return {
        "version": version,
        "active": None if active is None else active.version,
        "passed": False,
        "verdict": "unchanged",
        "could_not_decide": False,
        "reason": rule,
        "rule": rule,
        "caveats": [],
        "needs_more": None,
        "new": None,
        "old": None,
        "confidence": confidence,
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
    probe: rm_sensitivity.GateProbe | None = None,
    generation: int | None = None,
) -> dict[str, Any]:
    """Gate ``candidate`` against ``active`` on the held-out pairs; register it, then promote it,
    reject it or keep it undecided (the active version stays). Returns the verdict record.
    ``probe``: the sensitivity probe set drawn before training (default: drawn now).
    ``generation``: the active version's generation when ``active`` was read; a promotion over
    another (a rollback or update since) keeps the candidate undecided instead.

    A candidate that is the active version itself (training kept its start: the same weights, the
    same id; or the active folder registered again) changes nothing: its row keeps its status and
    record (it was marked rejected while active, its override erased). Another stored version is
    gated as any candidate (``gate_version`` gates registered versions, again after more labels)."""
    ucfg = settings.reward.update
    known, current = candidate_id(candidate), registry.active()
    same = registry.get(known) if known is not None and current is not None and known == current[0] else None
    if same is not None:
        nothing = unchanged(same, active, ucfg.gate_confidence)
        log.info("reward model: %s", nothing["rule"])
        return nothing
    z = NormalDist().inv_cdf(ucfg.gate_confidence)
    new = side_report(candidate, active, split["holdout_new"], z)
    old = side_report(candidate, active, split["holdout_old"], z)
    outcome, rule = gate(new, old, ucfg.margin, ucfg.max_regression, ucfg.min_gate_pairs)
    # The reward model tested as reviewers are: a significant loss of sensitivity on any
    # perturbation kind refuses a candidate however it does on the held-out labels.
    sens = rm_sensitivity.gate_sensitivity(
        ucfg, registry.store, candidate, active, data_window.get("stream"), z, probe=probe
    )
    if sens is not None and sens["failed"] and outcome != "reject":
        outcome, rule = "reject", rm_sensitivity.failure_rule(sens)
    needs = None
    if outcome == "undecided" and new is not None and new["gain"] is not None:
        needs = labels_needed(new, ucfg.margin, ucfg.min_gate_pairs, z, ucfg.holdout_fraction)
    version = registry.register(candidate, data_window=data_window, metrics=train_metrics)
    verdict: dict[str, Any] = {
        **_points(new, old),
        "version": version,
        "active": None if active is None else active.version,
        "passed": outcome == "promote",
        "verdict": outcome,
        "could_not_decide": outcome == "undecided",
        # "passed" on a promotion, as before (reports and tests key on it); the rule says why.
        "reason": "passed" if outcome == "promote" else rule,
        "rule": rule,
        "caveats": caveats(new, outcome),
        "needs_more": needs,
        "new": new,
        "old": old,
        "confidence": ucfg.gate_confidence,
        "min_gate_pairs": ucfg.min_gate_pairs,
        "margin": ucfg.margin,
        "max_regression": ucfg.max_regression,
        "holdout": {k: len(v) for k, v in split.items() if k.startswith("holdout")},
        "sensitivity": sens,
    }
    if outcome == "promote":
        try:
            registry.promote(version, verdict, expect_generation=generation)
        except ActiveChanged as e:
            outcome = "undecided"
            verdict.update(passed=False, verdict=outcome, could_not_decide=True, reason=str(e), rule=str(e))
            registry.hold(version, verdict)
    elif outcome == "reject":
        registry.reject(version, verdict)
    else:
        registry.hold(version, verdict)
    if metrics is not None:
        publish_gate_sensitivity(metrics, sens, version, None if active is None else active.version, outcome)
        metrics.rm_updates.labels(OUTCOMES[outcome]).inc()
        metrics.rm_last_training.set(time.time())
    log.info("reward model %s %s", version, render_gate(verdict))
    return verdict


def publish_gate_sensitivity(
    metrics: Metrics, sens: dict[str, Any] | None, version: str, active: str | None, outcome: str
) -> None:
    """The gauges after a gate: a promoted candidate becomes the active role; otherwise the
    candidate role shows the refused or held candidate beside the active version."""
    if sens is None:
        return
    if outcome == "promote":
        rm_sensitivity.publish(metrics, version, sens["candidate"], "active")
        metrics.clear_rm_sensitivity("candidate")
        return
    if active is not None and sens["active"] is not None:
        rm_sensitivity.publish(metrics, active, sens["active"], "active")
    rm_sensitivity.publish(metrics, version, sens["candidate"], "candidate")


def _points(new: dict[str, Any] | None, old: dict[str, Any] | None) -> dict[str, float | None]:
    """The point agreements under their earlier keys (candidate_new, active_old, ...)."""
    out: dict[str, float | None] = {}
    for side, rep in (("new", new), ("old", old)):
        for who in ("candidate", "active"):
            out[f"{who}_{side}"] = None if rep is None or rep[who] is None else rep[who]["agreement"]
    return out


def _interval(a: dict[str, Any], key: str, sign: str = "") -> str:
    return f"{a[key]:{sign}.3f} [{a['lo']:{sign}.3f}, {a['hi']:{sign}.3f}]"


def render_baselines(rep: dict[str, Any]) -> str:
    """The "longer wins" baseline and the within-prompt pairs of one side's report (absent from
    records written before they were kept)."""
    txt = ""
    if rep.get("longer_wins") is not None:
        txt += f", longer wins {_interval(rep['longer_wins'], 'agreement')}"
    within = rep.get("within_prompt")
    if within is not None:
        txt += f"; {within['n']} of the {rep['n']} pairs within one prompt"
        if within["candidate"] is not None:
            txt += f" (candidate {_interval(within['candidate'], 'agreement')}"
            if within["active"] is not None:
                txt += f", active {_interval(within['active'], 'agreement')}"
            txt += ")"
    return txt


def render_gate(verdict: dict[str, Any]) -> str:
    """One line for people: the verdict, the sizes, every agreement and the gain with its bounds."""
    head = f"gate {verdict['verdict']}"
    if verdict.get("could_not_decide"):
        head += " (could not decide; the active version stays)"
    parts = [head, str(verdict.get("rule", verdict["reason"]))]
    parts += [f"caveat: {c}" for c in verdict.get("caveats") or ()]  # absent from earlier records
    for side in ("new", "old"):
        rep = verdict.get(side)
        if rep is None:
            continue
        cand = _interval(rep["candidate"], "agreement")
        txt = f"{side}: {rep['n']} pairs of {rep['responses']} responses, candidate {cand}"
        if rep["active"] is not None:
            txt += f", active {_interval(rep['active'], 'agreement')}, gain {_interval(rep['gain'], 'gain', '+')}"
        txt += render_baselines(rep)
        parts.append(txt)
    sens = verdict.get("sensitivity")
    if sens and sens.get("comparison"):
        worst = max(sens["comparison"].items(), key=lambda kv: kv[1]["loss"])
        parts.append(
            f"sensitivity on {sens['probe']['pairs']} probe pairs: largest loss {worst[0]} {worst[1]['loss']:+.2f}"
            f" (lower bound {worst[1]['lo']:+.2f}); failed: {', '.join(sens['failed']) or 'none'}"
        )
    parts.append(f"bounds one-sided at {verdict['confidence']}")
    if verdict.get("needs_more"):
        m = verdict["needs_more"]
        parts.append(f"needs about {m['labels']} more labels ({m['pairs']} more held-out pairs) at the observed gain")
    return "; ".join(parts)
