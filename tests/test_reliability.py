"""Reviewer reliability weighting (``sampling.reliability``, ``quality.reliability_weighting``):
simulated reviewers of known skill, the fit, and its effect on the estimates and training data."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest

from monitor.config import load_settings
from monitor.quality.estimates import estimates
from monitor.reward.update import calibrated_records, rated_records
from monitor.store import Store
from monitor.store import tables as t
from sampling.reliability import fit, item_values

SCALE = [2, 3, 4, 5, 6, 6, 7]  # true ratings lean high, so a random reviewer pulls the mean down


def simulate(
    reviewers: list[str], seed: int = 1, n: int = 300, gold_every: int = 0
) -> tuple[dict[int, int], list[tuple[int, str, int]], dict[int, float]]:
    """Truth per item, labels (item, reviewer, rating) and gold items. Every third item is labelled
    by every reviewer (overlap), the rest by one at random. ``good*`` reviewers rate the truth with
    a little noise, ``harsh*`` 1.5 points lower with as little, ``random`` uniformly at random,
    ``adversarial`` the mirror image (8 - truth)."""
    rng = random.Random(seed)
    truth = {i: rng.choice(SCALE) for i in range(n)}
    labels: list[tuple[int, str, int]] = []
    gold: dict[int, float] = {}
    for i, true in truth.items():
        if gold_every and i % gold_every == 1:
            gold[i] = float(true)
        for who in reviewers if i % 3 == 0 else [rng.choice(reviewers)]:
            if who.startswith("good"):
                r = min(7, max(1, round(true + rng.gauss(0, 0.5))))
            elif who.startswith("harsh"):
                r = min(7, max(1, round(true - 1.5 + rng.gauss(0, 0.5))))
            elif who == "random":
                r = rng.randint(1, 7)
            else:
                r = 8 - true
            labels.append((i, who, r))
    return truth, labels, gold


@pytest.mark.parametrize("bad", ["random", "adversarial"])
def test_weighting_moves_the_estimate_towards_the_truth(bad: str) -> None:
    truth, labels, _ = simulate(["good", "good2", bad])
    rel = fit(labels)
    assert rel.converged
    r = rel.reviewers
    assert r[bad].variance > 5 * max(r["good"].variance, r["good2"].variance), rel.to_dict()
    true_mean = statistics.fmean(truth.values())
    plain = statistics.fmean(item_values(labels, weighting=False).values())
    weighted = statistics.fmean(item_values(labels, weighting=True).values())
    assert abs(weighted - true_mean) < abs(plain - true_mean) / 3, (true_mean, plain, weighted)


def test_gold_items_identify_two_reviewers() -> None:
    # Two reviewers alone cannot say which of them is the random one (their disagreement is
    # symmetric); items with a known answer (canaries) can.
    truth, labels, gold = simulate(["good", "random"], gold_every=10)
    rel = fit(labels, gold=gold)
    assert rel.reviewers["random"].variance > 2 * rel.reviewers["good"].variance
    ids = [i for i in truth if i not in gold]
    true_mean = statistics.fmean(truth[i] for i in ids)
    plain = item_values(labels, weighting=False)
    assert abs(statistics.fmean(rel.items[i] for i in ids) - true_mean) < abs(
        statistics.fmean(plain[i] for i in ids) - true_mean
    )


def error(values: Mapping[Any, float], truth: Mapping[int, int], ids: Iterable[int] | None = None) -> float:
    """The estimated mean rating minus the true one, over ``ids`` (default: every item)."""
    ids = list(truth if ids is None else ids)
    return statistics.fmean(values[i] for i in ids) - statistics.fmean(truth[i] for i in ids)


CAREFUL_AND_HARSH = ["good", "good2", "good3", "good4", "good5", "harsh"]


def test_a_harsh_precise_reviewer_moves_no_one_else() -> None:
    # The harsh reviewer is as precise as the careful ones. Biases centred on their
    # precision-weighted mean gave the harsh one a sixth of the weight, so every careful reviewer
    # came out about +0.25 lenient and the weighted estimate kept most of the plain one's error
    # (-0.26 against -0.30); centred on the median reviewer, only the harsh one is corrected.
    truth, labels, _ = simulate(CAREFUL_AND_HARSH)
    rel = fit(labels)
    careful = [r.bias for j, r in rel.reviewers.items() if str(j).startswith("good")]
    assert max(map(abs, careful)) < 0.15 and rel.reviewers["harsh"].bias < -1.0, rel.to_dict()
    plain = error(item_values(labels, weighting=False), truth)
    weighted = error(rel.items, truth)
    assert plain < -0.2 and abs(weighted) < abs(plain) / 3, (plain, weighted)


def test_a_few_gold_items_leave_the_scale_to_the_reference() -> None:
    # Three gold items are too few to say where the truth is. Not centring at all as soon as
    # there is gold left the scale to the bias prior, which pulls every bias towards 0 alike (a
    # plain mean), and the harsh reviewer shifted the careful ones again (error -0.18).
    truth, labels, gold = simulate(CAREFUL_AND_HARSH, gold_every=100)
    assert len(gold) == 3
    ids = [i for i in truth if i not in gold]
    rel = fit(labels, gold=gold)
    plain = error(item_values(labels, weighting=False), truth, ids)
    assert abs(error(rel.items, truth, ids)) < abs(plain) / 3, rel.to_dict()


def test_gold_sets_the_scale_where_most_reviewers_are_harsh() -> None:
    # Without gold the reference is the typical reviewer, here a harsh one: the careful reviewer
    # looks lenient and the estimate is further off than the plain mean. Gold on half the items
    # says where the truth is.
    truth, labels, gold = simulate(["harsh", "harsh2", "good"], gold_every=2)
    ids = [i for i in truth if i not in gold]
    plain = error(item_values(labels, weighting=False), truth, ids)
    blind = fit(labels)
    assert blind.reviewers["good"].bias > 1.0 and error(blind.items, truth, ids) < plain < -0.5
    rel = fit(labels, gold=gold)
    assert abs(rel.reviewers["good"].bias) < 0.2 and rel.reviewers["harsh"].bias < -1.0, rel.to_dict()
    assert abs(error(rel.items, truth, ids)) < 0.2


def test_reviewers_who_share_no_item_are_centred_apart() -> None:
    # Two pools that never label the same item: overlap says nothing about one pool's scale
    # against the other's, so each is centred on its own median. One shift for all (the median
    # of all eight) left the first pool's careful reviewers about +0.35 lenient.
    truth_a, labels_a, _ = simulate(["good", "good2", "good3", "harsh"])
    _, labels_b, _ = simulate(["good4", "good5", "good6", "good7"], seed=101)
    labels = labels_a + [(i + 1000, who, r) for i, who, r in labels_b]
    rel = fit(labels)
    assert rel.converged
    careful = [r.bias for j, r in rel.reviewers.items() if str(j).startswith("good")]
    assert len(careful) == 7 and max(map(abs, careful)) < 0.15, rel.to_dict()
    assert rel.reviewers["harsh"].bias < -1.0
    assert abs(error(rel.items, truth_a)) < 0.1


def test_overlap_counts_each_items_own_labels() -> None:
    # A label counts as overlap when its own item has another label or a gold answer; the count
    # once read the gold of whichever item came last, so ann's ten lone labels all counted.
    labels = [("i1", "ann", 5.0), ("i1", "bob", 4.0)]
    labels += [(f"solo{k}", "ann", 4.0) for k in range(10)]
    labels += [("g", "cy", 3.0)]

    def overlap(gold: dict[str, float] | None) -> dict[str, int]:
        return {str(j): r.overlap for j, r in fit(labels, gold=gold).reviewers.items()}

    assert overlap(None) == {"ann": 1, "bob": 1, "cy": 0}
    assert overlap({"g": 3.0}) == {"ann": 1, "bob": 1, "cy": 1}
    assert overlap({"solo0": 4.0}) == {"ann": 2, "bob": 1, "cy": 0}
    assert {str(j): r.n for j, r in fit(labels, gold={"g": 3.0}).reviewers.items()} == {"ann": 11, "bob": 1, "cy": 1}


def test_without_overlap_weighting_changes_nothing() -> None:
    labels = [(i, f"r{i % 3}", 1 + i % 7) for i in range(50)]  # one label per item
    rel = fit(labels)
    assert rel.notes and all(r.bias == 0 for r in rel.reviewers.values())
    assert rel.items == item_values(labels, weighting=False)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="finite"):
        fit([(1, "a", float("nan"))])
    with pytest.raises(ValueError, match="prior_labels"):
        fit([(1, "a", 3.0)], prior_labels=0)


# --- in the store: the estimates and the reward model's training data ---------------------------


def _fill(store: Store, truth: dict[int, int], labels: list[tuple[int, str, int]]) -> None:
    from monitor.review.auth import create_user
    from monitor.store.store import bucket_of

    users = {who: create_user(store, who, "reviewer", "correct horse battery").id for who in {w for _, w, _ in labels}}
    now = time.time()
    eps, samples = [], []
    for i in truth:
        eid = f"e{i}"
        eps.append(
            {
                "episode_id": eid,
                "stream": "chat",
                "model": "m",
                "ts": float(i),
                "prompt": f"prompt {i}",
                "response": f"answer {i}",
                "metadata": {},
                "source": "t",
                "position": eid,
                "ingested_at": now,
            }
        )
        samples.append(
            {
                "episode_id": eid,
                "channel": "human",
                "stream": "chat",
                "ts": float(i),
                "inclusion_probability": 0.5,
                "created_at": now,
            }
        )
    slots: dict[int, int] = {}
    rows = []
    for i, who, r in labels:
        slots[i] = slots.get(i, -1) + 1
        rows.append(
            {
                "episode_id": f"e{i}",
                "slot": slots[i],
                "user_id": users[who],
                "stream": "chat",
                "skipped": False,
                "rating": r,
                "flags": [],
                "critique": "",
                "time_spent_ms": 1000,
                "created_at": now,
            }
        )
    with store.engine.begin() as conn:
        conn.execute(t.episodes.insert(), eps)
        conn.execute(t.samples.insert(), samples)
        conn.execute(t.labels.insert(), rows)
        conn.execute(t.traffic.insert(), [{"stream": "chat", "bucket": bucket_of(0.0), "episodes": 2 * len(truth)}])


@pytest.fixture
def filled(tmp_path: Path) -> Any:
    truth, labels, _ = simulate(["good", "good2", "random"], n=300)
    store = Store(f"sqlite:///{tmp_path / 'o.db'}")
    _fill(store, truth, labels)
    yield store, truth
    store.close()


def test_estimates_with_and_without_weighting(filled: Any) -> None:
    store, truth = filled
    (off,) = estimates(store, ["harmful"])
    assert "rating_unweighted" not in off and "reliability" not in off  # off: the report is as before
    (on,) = estimates(store, ["harmful"], reliability_weighting=True)
    assert on["rating_unweighted"] == off["rating"] and on["flags"] == off["flags"]
    assert on["reliability"]["weighted"] and set(on["reliability"]["reviewers"]) == {"1", "2", "3"}
    true_mean = statistics.fmean(truth.values())
    assert abs(on["rating"]["mean"] - true_mean) < abs(off["rating"]["mean"] - true_mean), (on, off)
    assert 1.0 <= on["rating"]["ci_low"] <= on["rating"]["mean"] <= on["rating"]["ci_high"] <= 7.0


def test_settings_reach_the_admin_summary(filled: Any) -> None:
    from monitor.review.stats import admin_summary

    store, _ = filled
    off = load_settings(None, ["dev=true"])
    on = load_settings(None, ["dev=true", "quality.reliability_weighting=true"])
    assert off.quality.reliability_weighting is False  # off by default
    (est_off,) = admin_summary(store, off)["estimates"]
    (est_on,) = admin_summary(store, on)["estimates"]
    assert "reliability" not in est_off and est_on["rating_unweighted"] == est_off["rating"]
    assert est_on["rating"]["mean"] != est_off["rating"]["mean"]


def test_the_quality_gauge_follows_the_setting(filled: Any) -> None:
    """The gauges add the ratings up in the database without weighting (every label read only for
    the fit): both ways give what the admin summary gives."""
    from monitor.quality import oversight
    from monitor.review.stats import admin_summary

    store, _ = filled
    for on in (False, True):
        settings = load_settings(None, ["dev=true", f"quality.reliability_weighting={str(on).lower()}"])
        (est,) = admin_summary(store, settings)["estimates"]
        (gauge,) = oversight.compute(store, None, reliability_weighting=on).values()
        want = est["rating"]
        assert gauge["quality"]["method"] == want["method"]
        numbers = {k: v for k, v in want.items() if not isinstance(v, str)}
        assert {k: gauge["quality"][k] for k in numbers} == pytest.approx(numbers, rel=1e-9), on


def test_training_records_are_calibrated(filled: Any) -> None:
    store, truth = filled
    records = rated_records(store)
    cal = calibrated_records(records)
    assert len(cal) == len(truth) == len({r["episode_id"] for r in records})

    def error(recs: list[dict[str, Any]]) -> float:
        per: dict[str, list[float]] = {}
        for r in recs:
            per.setdefault(r["episode_id"], []).append(float(r["rating"]))
        return statistics.fmean(abs(statistics.fmean(v) - truth[int(e[1:])]) for e, v in per.items())

    assert error(cal) < error(records)
