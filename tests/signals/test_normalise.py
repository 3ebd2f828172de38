"""The transforms that put signals on one null: point masses and the reference's missing tail."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray

import detectors
from monitor.signals.normalise import NormalScores, has_point_mass, tail_augmented_reference


def test_point_mass_is_a_value_holding_a_tenth_of_the_reference() -> None:
    assert has_point_mass([0.0] * 480 + [0.01 * i for i in range(1, 21)])
    # The same answers served a few times each are duplicates, not a point mass.
    assert not has_point_mass([float(i % 170) for i in range(500)])
    assert not has_point_mass([])


def test_tail_draws_at_the_conservative_exceedance_chance() -> None:
    raw = [0.0] * 450 + [0.001 * i for i in range(1, 51)]
    t = NormalScores.fit(raw, clip=5.0)
    z = [t(x) for x in raw]
    out = tail_augmented_reference(z, raw, clip=5.0)
    share = out.count(5.0) / len(out)
    # Beta(1, 500)'s 97.5% quantile: 1 - 0.025 ** (1/500), about 3.7 / 500.
    assert share == pytest.approx(1 - 0.025 ** (1 / 500), rel=0.3)
    assert -5.0 not in out  # the minimum is the zeros' point mass: nothing lies below it
    cont = [float(i) for i in range(500)]
    tc = NormalScores.fit(cont, clip=5.0)
    both = tail_augmented_reference([tc(x) for x in cont], cont, clip=5.0)
    assert both.count(5.0) == both.count(-5.0) > 0


def _false_alarms(augment: bool, seed: int, ert: float = 2000.0, n: int = 20000) -> int:
    """A stationary mostly-zero signal with a heavy tail (like non_text_ratio): the reference's
    500 values rarely show how far the tail goes, so new values beyond its range reach the clip."""
    rng = np.random.default_rng(seed)

    def draw(m: int) -> NDArray[np.float64]:
        return np.where(rng.random(m) < 0.05, rng.lognormal(-4.0, 1.0, m), 0.0)

    raw = [float(x) for x in draw(500)]
    t = NormalScores.fit(raw, clip=5.0)
    z = [t(x) for x in raw]
    ref = np.asarray(tail_augmented_reference(z, raw, 5.0) if augment else z)
    det = detectors.make("cusum", ert=ert, x_ref=ref, k=0.3)
    alarms = 0
    for x in draw(n):
        det.update(t(float(x)))
        alarms += det.drift_detected
    return alarms


def test_tail_augmented_calibration_keeps_the_false_alarm_budget() -> None:
    seeds = range(6)
    expected = 6 * 20000 / 2000
    plain = sum(_false_alarms(False, s) for s in seeds)
    augmented = sum(_false_alarms(True, s) for s in seeds)
    # The plain bootstrap never draws beyond the reference's range and alarms far more often
    # than its ERT promises; with the tail added back the detector stays within its budget.
    assert plain > 1.5 * expected
    assert augmented <= expected


def test_normal_scores_are_phi_inverse_of_the_mid_rank_and_the_cache_is_not_state() -> None:
    import pickle
    from statistics import NormalDist

    ref = [1.0, 2.0, 2.0, 2.0, 3.5, 7.0, 7.0, 10.0]
    ns = NormalScores.fit(ref)
    n = len(ref)
    # Every in-range value, ties and the two ends included: Phi^-1((mid-rank + 1/2) / (n + 1)).
    for x in [*ref, 1.5, 2.5, 6.9999, 9.0]:
        rank = (sum(r < x for r in ref) + sum(r <= x for r in ref)) / 2
        assert ns(x) == NormalDist().inv_cdf((rank + 0.5) / (n + 1))
    assert ns(0.0) < ns(1.0) and ns(11.0) > ns(10.0)  # beyond the range: continues linearly
    # The table of scores is rebuilt after a restore, not carried in the detector's state; a
    # pickle from before the table existed restores and scores the same.
    data = pickle.dumps(ns)
    assert b"_scores" not in data
    assert pickle.loads(data)(2.0) == ns(2.0)
    old = NormalScores.fit(ref)
    old(3.5)
    old.__dict__.pop("_scores")  # the state as pickled before the table: the three fields only
    assert set(old.__dict__) == {"sorted_ref", "scale", "clip"}
    assert pickle.loads(pickle.dumps(old))(3.5) == ns(3.5)


def test_a_batch_of_normal_scores_is_each_score_to_the_bit() -> None:
    """``many`` (the drift observer's batch path) gives exactly what one value at a time gives:
    ties, both ends, values between and far beyond the range (clipped), on a skewed real-like
    reference and on one with a point mass; its arrays are not pickled with the detector state."""
    import pickle

    rng = np.random.default_rng(5)
    for ref in (rng.lognormal(size=500).tolist(), [0.0] * 300 + rng.random(200).tolist()):
        ns = NormalScores.fit(ref, clip=4.0)
        xs = [*ref[:50], *rng.lognormal(size=2000).tolist(), -1e9, -3.0, 1e9, min(ref), max(ref), 0.0]
        assert ns.many(xs).tolist() == [ns(x) for x in xs]
        assert ns.many([]).tolist() == []
        assert b"_table" not in pickle.dumps(ns)
        assert pickle.loads(pickle.dumps(ns)).many(xs).tolist() == ns.many(xs).tolist()
