"""Detection quality on seeded synthetic streams with known change points.

Every detector is configured for ERT 1000 from a reference of 500 values. On stationary data,
alarms are counted the way the monitor uses a detector (reset after each alarm); after a
change, the delay to the first alarm is measured. Seeds are fixed: the tests are
deterministic; the bands are wide enough to hold for other seeds too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np
import pytest
from extra_marks import by_extra
from numpy.typing import NDArray

import detectors
from detectors.base import Detector

ERT = 1000
SEEDS = (11, 12, 13)
UNIVARIATE = ("adwin", "kswin", "page_hinkley", "cusum", "cvm")
DIM = 8


@cache
def _proto(name: str) -> Detector:
    rng = np.random.default_rng(99)
    if name == "fet":
        x_ref: Any = np.zeros(500, dtype=int)
        x_ref[:50] = 1  # a reference rate of exactly 0.1 (a sampled one is off by ~0.013)
        rng.shuffle(x_ref)
    elif name in ("mmd", "lsdd", "kmmd"):
        x_ref = rng.standard_normal((500, DIM))
    else:
        x_ref = rng.normal(3.0, 2.0, 500)  # not standard: the detectors standardise by the reference
    return detectors.make(name, ert=ERT, x_ref=x_ref)


def stationary_run_lengths(det: Detector, draw: Callable[[], Any], total: int) -> tuple[list[int], int]:
    """Alarm run lengths over ``total`` updates (reset after each alarm) and the censored remainder."""
    runs = []
    for _ in range(total):
        det.update(draw())
        if det.drift_detected:
            runs.append(det.n)
            det.reset()
    return runs, det.n


def delay(det: Detector, pre: list[Any], post: list[Any]) -> int:
    """Updates after the change until the first alarm (alarms before it reset the detector)."""
    for x in pre:
        det.update(x)
        if det.drift_detected:
            det.reset()
    for i, x in enumerate(post):
        det.update(x)
        if det.drift_detected:
            return i + 1
    return math.inf  # type: ignore[return-value]


def _ert_estimate(runs: list[int], remainder: int) -> float:
    return (sum(runs) + remainder) / len(runs) if runs else math.inf


@pytest.mark.parametrize("name", by_extra(UNIVARIATE))
def test_univariate_false_alarms_match_the_ert(name: str) -> None:
    runs: list[int] = []
    remainder = 0
    # The cheap CUSUMs get more updates: with ~9 expected alarms the estimate is too noisy
    # for a 4x band now and then (P(at most 1 alarm) ~ 0.1%); with ~27 it is not.
    seeds = SEEDS if name not in ("cusum", "page_hinkley") else tuple(range(11, 20))
    for seed in seeds:
        rng = np.random.default_rng(seed)

        def draw(rng: np.random.Generator = rng) -> float:
            return float(rng.normal(3.0, 2.0))

        r, rest = stationary_run_lengths(_proto(name).clone(), draw, 3000)
        runs += r
        remainder += rest
    est = _ert_estimate(runs, remainder)
    print(f"{name}: {len(runs)} false alarms in {len(seeds) * 3000} updates, ERT estimate {est:.0f}")
    # 9,000 updates at ERT 1000: ~9 alarms expected; the band allows the estimate's noise
    # (and alibi's noisy thresholds for n_bootstraps < 10 x ERT).
    assert ERT / 4 <= est <= ERT * 4
    assert len(runs) <= 10 * len(seeds)


@pytest.mark.parametrize("name", by_extra(UNIVARIATE))
@pytest.mark.parametrize("shift", [1.0, 2.0])
def test_univariate_mean_shift_is_detected_quickly(name: str, shift: float) -> None:
    delays = []
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        pre = list(rng.normal(3.0, 2.0, 300))
        post = list(rng.normal(3.0 + 2.0 * shift, 2.0, 400))
        delays.append(delay(_proto(name).clone(), pre, post))
    print(f"{name}: shift {shift} sd, delays {delays}")
    assert max(delays) < 200


@pytest.mark.alibi
def test_fet_rate_change() -> None:
    det = _proto("fet")
    runs: list[int] = []
    remainder = 0
    delays = []
    for seed in SEEDS:
        rng = np.random.default_rng(seed)

        def draw(rng: np.random.Generator = rng) -> int:
            return int(rng.random() < 0.1)

        r, rest = stationary_run_lengths(det.clone(), draw, 3000)
        runs += r
        remainder += rest
        pre = [int(v) for v in rng.random(300) < 0.1]
        post = [int(v) for v in rng.random(400) < 0.3]
        delays.append(delay(det.clone(), pre, post))
    est = _ert_estimate(runs, remainder)
    print(f"fet: {len(runs)} false alarms, ERT estimate {est:.0f}; delays {delays}")
    assert ERT / 4 <= est <= ERT * 4
    assert max(delays) < 200


@pytest.mark.parametrize("name", by_extra(["mmd", "lsdd", "kmmd"]))
def test_multivariate_mean_shift(name: str) -> None:
    det = _proto(name)
    alarms = 0
    delays = []
    for seed in SEEDS[:2]:
        rng = np.random.default_rng(seed)

        def draw(rng: np.random.Generator = rng) -> NDArray[np.float64]:
            return rng.standard_normal(DIM)

        r, _ = stationary_run_lengths(det.clone(), draw, 1000)
        alarms += len(r)
        pre = list(rng.standard_normal((200, DIM)))
        post = list(rng.normal(0.5, 1.0, (300, DIM)))  # a shift of 0.5 sd in every dimension
        delays.append(delay(det.clone(), pre, post))
    print(f"{name}: {alarms} false alarms in 2000 updates; delays {delays}")
    assert alarms <= 8  # ~2 expected at ERT 1000
    assert max(delays) < 100
