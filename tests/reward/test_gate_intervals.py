"""The gate tells the truth: intervals on every agreement and on the paired gain, verdicts that
wait for evidence, and intervals that cover over seeded repetitions.

Reviewer ratings are simulated (a latent quality, a noisy 1-7 rating of it) and paired by the real
``pairs_from_ratings`` with absolute pairing, so held-out pairs share responses as they do in
production. The scorers are stand-ins for reward models (quality plus per-response noise: the
noise level sets how well each agrees with the reviewers); they implement the scorer contract."""

from __future__ import annotations

import math
import random
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import pytest

from monitor.config import load_settings
from monitor.metrics import Metrics
from monitor.reward.data import Pair, pairs_from_ratings
from monitor.reward.registry import Registry
from monitor.reward.update import (
    caveats,
    decide,
    dyadic_variance,
    gate,
    labels_needed,
    outcomes,
    render_gate,
    side_report,
    wilson,
)
from monitor.store import Store

Z95 = NormalDist().inv_cdf(0.95)


class NoisyScorer:
    """Stand-in for a reward model: quality plus a fixed per-response noise of ``sd``."""

    def __init__(self, quality: dict[tuple[str, str], float], sd: float, seed: int, version: str = "stand-in"):
        rng = random.Random(seed)
        self.scores = {k: q + rng.gauss(0, sd) for k, q in sorted(quality.items())}
        self.version = version

    def score(self, prompts: list[str], responses: list[str], batch_size: int = 32) -> list[float]:
        return [self.scores[(p, r)] for p, r in zip(prompts, responses, strict=True)]


def _population(n: int, seed: int) -> tuple[list[Pair], dict[tuple[str, str], float]]:
    """n rated responses (two per prompt) paired as the update pairs them (absolute, 8 partners)."""
    rng = random.Random(seed)
    quality, records = {}, []
    for i in range(n):
        prompt, response = f"prompt {seed}-{i // 2}", f"response {seed}-{i}"
        q = rng.gauss(0, 1)
        quality[(prompt, response)] = q
        rating = min(7, max(1, round(4 + 1.5 * (q + rng.gauss(0, 0.5)))))
        records.append({"prompt": prompt, "response": response, "rating": rating})
    return pairs_from_ratings(records, 1.0, across_prompts=True, partners=8, seed=seed), quality


def _reports(n: int, seed: int, cand_sd: float, act_sd: float) -> tuple[dict[str, Any] | None, list[Pair]]:
    pairs, quality = _population(n, seed)
    cand, act = NoisyScorer(quality, cand_sd, seed + 1), NoisyScorer(quality, act_sd, seed + 2)
    return side_report(cand, act, pairs, Z95), pairs


def test_wilson_and_dyadic_variance() -> None:
    lo, hi = wilson(0.5, 100, 1.96)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson(1.0, 20, Z95)[1] == pytest.approx(1.0) and wilson(1.0, 20, Z95)[0] < 0.95
    assert wilson(0.7, 0, Z95) == (0.0, 1.0)
    x = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    # Every pair its own two responses: the usual variance of a mean.
    distinct = dyadic_variance(x, np.arange(0, 12, 2), np.arange(1, 12, 2))
    assert distinct == pytest.approx(x.var() / len(x))
    # The same outcomes where the correct pairs all share one response: they covary, so more variance.
    shared = dyadic_variance(x, np.array([0, 1, 0, 0, 2, 0]), np.array([3, 4, 5, 6, 7, 8]))
    assert shared > 1.5 * distinct


def test_large_gain_on_enough_pairs_promotes() -> None:
    new, _ = _reports(300, seed=1, cand_sd=0.2, act_sd=1.5)
    assert new is not None and new["n"] >= 1000
    cand, act, g = new["candidate"], new["active"], new["gain"]
    for a in (cand, act):
        assert a["lo"] <= a["agreement"] <= a["hi"] and 0 < a["n_eff"] <= new["n"]
    assert g["lo"] > 0.1 and g["gain"] == pytest.approx(cand["agreement"] - act["agreement"], abs=1e-3)
    assert gate(new, None, 0.02, 0.02, 100) == ("promote", gate(new, None, 0.02, 0.02, 100)[1])
    assert "lower bound" in gate(new, None, 0.02, 0.02, 100)[1]


def test_tiny_gain_on_few_pairs_is_undecided_and_says_how_many_labels() -> None:
    new, _ = _reports(40, seed=8, cand_sd=0.9, act_sd=1.0)
    assert new is not None and new["gain"] is not None
    assert 0 < new["gain"]["gain"] < 0.05 and new["gain"]["lo"] < 0 < new["gain"]["hi"], new
    verdict, rule = gate(new, None, 0.0, 0.02, 500)
    assert verdict == "undecided" and "min_gate_pairs" in rule
    # Enough pairs by count, but the interval still straddles zero.
    verdict, rule = gate(new, None, 0.0, 0.02, 100)
    assert verdict == "undecided" and "straddles" in rule
    assert labels_needed(new, 0.0, 100_000, Z95, 0.3) == {
        "pairs": 100_000 - new["n"],
        "labels": pytest.approx(math.ceil((100_000 - new["n"]) * new["responses"] / new["n"] / 0.3)),
    }
    needs = labels_needed(new, 0.0, 10, Z95, 0.3)
    assert needs is not None and needs["pairs"] > new["n"] and needs["labels"] > 0
    # The figure follows the normal approximation: (z * se / gain)^2 * n pairs in all.
    g = new["gain"]
    assert needs["pairs"] == math.ceil(new["n"] * (Z95 * g["se"] / g["gain"]) ** 2 - new["n"])
    # A gain below the margin: more labels would not promote it, so no figure.
    assert labels_needed(new, 0.5, 10, Z95, 0.3) is None


def test_worse_candidate_is_rejected() -> None:
    new, _ = _reports(200, seed=5, cand_sd=3.0, act_sd=0.3)
    assert new is not None and new["gain"]["hi"] < 0
    verdict, rule = gate(new, None, 0.02, 0.02, 100)
    assert verdict == "reject" and "upper bound" in rule
    # Worse on the old stream by more than allowed, significantly: rejected even with a new-window gain.
    better, _ = _reports(300, seed=1, cand_sd=0.2, act_sd=1.5)
    verdict, rule = gate(better, new, 0.02, 0.02, 100)
    assert verdict == "reject" and "old-window" in rule
    # No active version (bootstrap): the earlier rule, beat chance by the margin.
    assert better is not None
    boot = {**better, "active": None, "gain": None}
    assert gate(boot, None, 0.02, 0.02, 100)[0] == "promote"
    assert gate({**boot, "candidate": {**boot["candidate"], "agreement": 0.51}}, None, 0.02, 0.0, 100)[0] == "reject"
    assert gate(None, None, 0.0, 0.0, 100)[0] == "reject"


def test_identical_candidate_is_rejected_not_undecided() -> None:
    pairs, quality = _population(60, seed=9)
    same = NoisyScorer(quality, 1.0, 4)
    new = side_report(same, same, pairs, Z95)
    assert new is not None and new["gain"]["lo"] == new["gain"]["hi"] == 0.0
    assert gate(new, None, 0.0, 0.02, 1)[0] == "reject"


def _truth(cand_sd: float, act_sd: float) -> tuple[float, float]:
    """Agreements of the two scorer kinds on a large population paired the same way."""
    cand, act = [], []
    for seed in range(1000, 1006):
        pairs, quality = _population(500, seed)
        cand.append(outcomes(NoisyScorer(quality, cand_sd, seed + 1), pairs))
        act.append(outcomes(NoisyScorer(quality, act_sd, seed + 2), pairs))
    c, a = np.concatenate(cand), np.concatenate(act)
    return float(c.mean()), float(c.mean() - a.mean())


def test_intervals_cover_over_seeded_repetitions() -> None:
    """Each one-sided bound holds in at least its nominal 95% of repetitions, less a margin for the
    simulation's own noise (200 repetitions: sd of a 95% share is 1.5 points)."""
    true_agreement, true_gain = _truth(0.8, 1.2)
    reps = 200
    hits = {"agree_lo": 0, "agree_hi": 0, "gain_lo": 0, "gain_hi": 0}
    for rep in range(reps):
        new, _ = _reports(80, seed=rep * 10, cand_sd=0.8, act_sd=1.2)
        assert new is not None
        c, g = new["candidate"], new["gain"]
        hits["agree_lo"] += c["lo"] <= true_agreement
        hits["agree_hi"] += true_agreement <= c["hi"]
        hits["gain_lo"] += g["lo"] <= true_gain
        hits["gain_hi"] += true_gain <= g["hi"]
    coverage = {k: v / reps for k, v in hits.items()}
    assert all(v >= 0.95 - 0.04 for v in coverage.values()), (coverage, true_agreement, true_gain)


def test_decide_records_an_undecided_verdict(
    tmp_path: Path, small_models: dict[str, Any], alpaca_split: dict[str, list[dict[str, Any]]]
) -> None:
    """Too few held-out pairs to decide: the candidate is kept as undecided with its record, the
    active version stays, and the outcome is counted (and was pre-zeroed)."""
    # The held-out rule alone: sensitivity per perturbation kind has its own tests (test_rm_sensitivity.py).
    overrides = ["dev=true", "database.url=sqlite://", f"reward.models_dir={tmp_path / 'm'}"]
    settings = load_settings(None, [*overrides, "reward.update.sensitivity_pairs=0"])
    registry = Registry.for_settings(Store("sqlite://"), settings)
    metrics = Metrics()
    assert metrics.registry.get_sample_value("oversight_rm_updates_total", {"outcome": "undecided"}) == 0
    trained, untrained = small_models["trained"], small_models["untrained"]
    v0 = registry.register(untrained, data_window={}, metrics={})
    registry.promote(v0)
    test = alpaca_split["test"]
    split = {"holdout_new": test[:40], "holdout_old": test[40:60], "train_new": [], "train_old": []}
    verdict = decide(settings, registry, trained, untrained, split, data_window={}, train_metrics={}, metrics=metrics)
    assert verdict["verdict"] == "undecided" and verdict["could_not_decide"] and not verdict["passed"], verdict
    assert verdict["new"]["n"] == 40 and verdict["old"]["n"] == 20 and verdict["min_gate_pairs"] == 100
    assert verdict["new"]["gain"]["gain"] == pytest.approx(verdict["candidate_new"] - verdict["active_new"], abs=1e-3)
    active = registry.active()
    assert active is not None and active[0] == v0
    row = registry.get(verdict["version"])
    assert row is not None and row["status"] == "undecided" and row["gate"]["verdict"] == "undecided"
    assert metrics.registry.get_sample_value("oversight_rm_updates_total", {"outcome": "undecided"}) == 1
    text = render_gate(verdict)
    assert "could not decide" in text and "new: 40 pairs" in text and "active" in text
    assert verdict["caveats"] == [] and row["gate"]["caveats"] == []  # only a promotion carries them


def test_cli_prints_the_verdict_in_words(capsys: pytest.CaptureFixture[str]) -> None:
    """``rm update`` / ``rm register --gate`` print the verdict on stderr, stdout stays JSON."""
    from monitor.cli.rm import print_gate

    new, _ = _reports(40, seed=8, cand_sd=0.9, act_sd=1.0)
    assert new is not None
    verdict, rule = gate(new, None, 0.0, 0.02, 100)
    needs = labels_needed(new, 0.0, 100, Z95, 0.3)
    assert needs is not None
    record = {
        "verdict": verdict,
        "could_not_decide": True,
        "rule": rule,
        "reason": rule,
        "new": new,
        "old": None,
        "confidence": 0.95,
        "needs_more": needs,
    }
    print_gate(record)
    print_gate({"passed": True, "reason": "activated by hand"})  # not a gate verdict: nothing printed
    out, err = capsys.readouterr()
    g = new["gain"]
    assert out == "" and err.count("\n") == 1
    assert err.startswith("gate undecided (could not decide; the active version stays); ")
    assert f"new: {new['n']} pairs of 40 responses" in err and f"gain {g['gain']:+.3f} [{g['lo']:+.3f}, " in err
    assert f"needs about {needs['labels']} more labels" in err


def test_the_record_says_what_the_pairs_could_measure() -> None:
    """Held-out pairs across prompts measure ratings across prompts; the record counts the pairs
    within one prompt and gives both versions' agreements on those apart, and "the longer answer
    wins" on the same pairs, each checked here against a computation of its own."""
    from monitor.reward.train import length_baseline

    pairs, quality = _population(120, seed=3)
    # Lengths that disagree with quality on some pairs, so "longer wins" is neither 0 nor 1.
    rng = random.Random(4)
    lengths = {k: max(1, int(50 + 30 * q + rng.gauss(0, 40))) for k, q in quality.items()}
    padded = {k: k[1] + "." * n for k, n in lengths.items()}
    pairs = [
        {
            **p,
            "chosen": padded[(p["prompt"], p["chosen"])],
            "rejected": padded[(p.get("rejected_prompt") or p["prompt"], p["rejected"])],
        }
        for p in pairs
    ]
    quality = {(k[0], padded[k]): q for k, q in quality.items()}
    cand, act = NoisyScorer(quality, 0.3, 5), NoisyScorer(quality, 2.0, 6)
    rep = side_report(cand, act, pairs, Z95)
    assert rep is not None
    same = [p for p in pairs if p.get("rejected_prompt") in (None, p["prompt"])]
    assert 0 < len(same) < len(pairs) // 4  # two answers a prompt: most pairs join two prompts
    lw = rep["longer_wins"]
    assert lw["agreement"] == pytest.approx(length_baseline(pairs), abs=1e-4) and 0.2 < lw["agreement"] < 0.95
    assert lw["lo"] <= lw["agreement"] <= lw["hi"]
    within = rep["within_prompt"]
    assert within["n"] == len(same)
    for who, model in (("candidate", cand), ("active", act)):
        direct = float(outcomes(model, same).mean())
        assert within[who]["agreement"] == pytest.approx(direct, abs=1e-4)
        assert within[who]["lo"] <= direct <= within[who]["hi"] and within[who]["n_eff"] <= len(same)
    line = render_gate({"verdict": "undecided", "reason": "r", "new": rep, "old": None, "confidence": 0.95})
    assert f"longer wins {lw['agreement']:.3f} [" in line
    assert f"{len(same)} of the {len(pairs)} pairs within one prompt (candidate " in line and ", active " in line
    # No pair within a prompt: counted as none, no agreements; a record written before these were kept
    # still renders.
    across = [p for p in pairs if p not in same]
    rep2 = side_report(cand, None, across, Z95)
    assert rep2 is not None and rep2["within_prompt"] == {"n": 0, "candidate": None, "active": None}
    old = {k: v for k, v in rep.items() if k not in ("longer_wins", "within_prompt")}
    assert "longer wins" not in render_gate({"verdict": "reject", "reason": "r", "new": old, "confidence": 0.95})


def _padded(seed: int) -> tuple[list[Pair], dict[tuple[str, str], float]]:
    """:func:`_population` with each response padded to a length that follows its quality closely, so
    "the longer answer wins" agrees with the ratings about as well as the quality itself does."""
    pairs, quality = _population(400, seed)
    rng = random.Random(seed + 100)
    padded = {k: k[1] + "." * max(1, int(60 + 30 * q + rng.gauss(0, 5))) for k, q in quality.items()}
    out = [
        {
            **p,
            "chosen": padded[(p["prompt"], p["chosen"])],
            "rejected": padded[(p.get("rejected_prompt") or p["prompt"], p["rejected"])],
        }
        for p in pairs
    ]
    return out, {(k[0], padded[k]): q for k, q in quality.items()}


def test_a_promotion_says_what_its_gain_does_not_show() -> None:
    """A candidate that beats the version it replaces is promoted, but where it still orders the new
    pairs worse than chance or than "longer wins", the record and the gate's line say so; a
    candidate that is not promoted, or one that clears both, carries no caveat."""
    pairs, quality = _padded(seed=11)
    # Better than the active version, still below "the longer answer wins" on these pairs.
    rep = side_report(
        NoisyScorer(quality, 1.0, 1), NoisyScorer({k: -q for k, q in quality.items()}, 0.3, 2), pairs, Z95
    )
    assert rep is not None and gate(rep, None, 0.02, 0.02, 100)[0] == "promote"
    assert rep["candidate"]["hi"] < rep["longer_wins"]["lo"] and rep["candidate"]["lo"] > 0.5
    (said,) = caveats(rep, "promote")
    assert said.startswith('still below "longer wins"') and f"{rep['longer_wins']['agreement']:.3f}" in said
    line = render_gate(
        {
            "verdict": "promote",
            "reason": "passed",
            "rule": "r",
            "caveats": [said],
            "new": rep,
            "old": None,
            "confidence": 0.95,
        }
    )
    assert f"caveat: {said}" in line
    assert caveats(rep, "undecided") == [] and caveats(rep, "reject") == []
    # Worse than chance, better than an active version that inverts the ratings.
    worse = side_report(
        NoisyScorer({k: -0.4 * q for k, q in quality.items()}, 0.3, 3),
        NoisyScorer({k: -q for k, q in quality.items()}, 0.1, 4),
        pairs,
        Z95,
    )
    assert worse is not None and gate(worse, None, 0.02, 0.02, 100)[0] == "promote"
    got = caveats(worse, "promote")
    assert len(got) == 2 and got[0].startswith("still worse than chance") and worse["candidate"]["hi"] < 0.5
    # Not significantly below either: no caveat; a bootstrap (no active version) is held to chance by
    # its own rule.
    good = side_report(NoisyScorer(quality, 0.05, 5), NoisyScorer(quality, 3.0, 6), pairs, Z95)
    assert good is not None and good["candidate"]["hi"] >= good["longer_wins"]["lo"] > 0.5
    assert caveats(good, "promote") == []
    assert caveats(side_report(NoisyScorer(quality, 1.0, 1), None, pairs, Z95), "promote") == []
