"""Horvitz-Thompson: unbiased, its 95% interval covers the true mean at the nominal rate, and a
bounded quantity (a rate, a rating) gets an interval that stays honest at the bounds."""

from __future__ import annotations

import functools
import gzip
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray
from prometheus_client import CollectorRegistry
from realdata import alpaca_rows
from scipy.stats import binom

from monitor.store import Store
from sampling import ChannelPolicy, Sampler, SamplingPolicy, bounded_interval, horvitz_thompson

Z95 = 1.959963984540054


def judge_prefs(model: str) -> list[tuple[str, float]]:
    rows = alpaca_rows(model)
    return [(f"{model}-{i}", float(r["judge_pref"])) for i, r in enumerate(rows) if r.get("judge_pref") is not None]


def test_known_values() -> None:
    est = horvitz_thompson([1.0, 3.0], [0.5, 0.25], population=10)
    assert est.total == pytest.approx(1 / 0.5 + 3 / 0.25)
    assert est.mean == pytest.approx(1.4)
    var = (1 - 0.5) * 1 / 0.25 + (1 - 0.25) * 9 / 0.0625
    assert est.se == pytest.approx(math.sqrt(var) / 10)
    assert est.ci_low < est.mean < est.ci_high
    assert est.interval == "normal" and est.n_effective == pytest.approx(36 / 20)
    census = horvitz_thompson([2.0, 4.0], [1.0, 1.0], population=2)
    assert (census.mean, census.se) == (3.0, 0.0)
    hajek = horvitz_thompson([1.0, 3.0], [0.5, 0.5])
    assert hajek.method == "hajek" and hajek.mean == pytest.approx(2.0)


def test_empty_sample_is_unknown_not_zero() -> None:
    est = horvitz_thompson([], [], population=100)
    assert math.isnan(est.mean) and est.n_sampled == 0
    est = horvitz_thompson([], [], population=100, bounds=(0.0, 1.0))
    assert math.isnan(est.ci_low) and math.isnan(est.ci_high)


@pytest.mark.parametrize("population", [10, None])
def test_values_near_the_double_range_give_the_estimate_of_the_scaled_values(population: int | None) -> None:
    """A producer's 1e308 in metadata overflowed y / pi and y**2, and "-inf + inf in fsum"
    stopped the whole estimate (``oversight estimate``, the admin page's series)."""
    big = horvitz_thompson([1e308, -1e308, 3e307, 1.0], [0.5, 0.5, 0.25, 0.5], population)
    small = horvitz_thompson([1.0, -1.0, 0.3, 1e-308], [0.5, 0.5, 0.25, 0.5], population)
    for field in ("mean", "total", "se", "ci_low", "ci_high"):
        assert getattr(big, field) == pytest.approx(getattr(small, field) * 1e308, rel=1e-12), field
    assert (big.method, big.n_sampled, big.population) == (small.method, small.n_sampled, small.population)
    # A total beyond the double range is inf (None in the JSON); the mean still is what it is.
    over = horvitz_thompson([1.5e308, 1.5e308], [0.5, 0.5], population)
    assert over.mean == pytest.approx(1.5e308 * (1 if population is None else 4 / population))
    assert math.isinf(over.total) and math.isfinite(over.se)
    rate = horvitz_thompson([1e300, 2e300], [0.001, 0.001], bounds=(0.0, 4e300))
    assert rate.interval == "score" and rate.mean == pytest.approx(1.5e300)
    assert rate.ci_low <= rate.mean <= rate.ci_high


def test_rejects_bad_probabilities_and_bounds() -> None:
    with pytest.raises(ValueError):
        horvitz_thompson([1.0], [0.0])
    with pytest.raises(ValueError):
        horvitz_thompson([1.0], [1.5])
    with pytest.raises(ValueError, match="outside the declared bounds"):
        horvitz_thompson([0.0, 8.0], [0.5, 0.5], bounds=(1.0, 7.0))
    with pytest.raises(ValueError, match="lo < hi"):
        horvitz_thompson([1.0], [0.5], bounds=(1.0, 1.0))


def test_no_event_in_30_labels_is_a_rate_below_about_11_percent_not_zero() -> None:
    """The normal interval says [0%, 0%]; with 30 labels the true rate could well be 10%."""
    normal = horvitz_thompson([0.0] * 30, [0.1] * 30)
    assert (normal.ci_low, normal.ci_high) == (0.0, 0.0)  # what the bounds fix
    est = horvitz_thompson([0.0] * 30, [0.1] * 30, bounds=(0.0, 1.0))
    assert est.mean == 0.0 and est.ci_low == 0.0
    assert est.ci_high == pytest.approx(Z95**2 / (30 + Z95**2))  # Wilson's bound: 11.4%
    assert est.interval == "score" and est.method == "hajek"
    # 30 events in 30: the mirror image. Known population: still the ratio, inside [0, 1].
    ones = horvitz_thompson([1.0] * 30, [0.1] * 30, population=250, bounds=(0.0, 1.0))
    assert ones.mean == 1.0 and ones.ci_high == 1.0 and ones.ci_low == pytest.approx(1 - est.ci_high)
    assert ones.total == pytest.approx(250.0)
    # Unequal probabilities: fewer effective labels, a wider interval.
    probs = [0.02] * 10 + [0.2] * 20
    skewed = horvitz_thompson([0.0] * 30, probs, bounds=(0.0, 1.0))
    assert skewed.n_effective < 30 and skewed.ci_high > est.ci_high
    # Plenty of labels: the score interval and the normal one agree away from the bounds.
    values = [1.0] * 200 + [0.0] * 200
    wide = horvitz_thompson(values, [0.05] * 400, bounds=(0.0, 1.0))
    plain = horvitz_thompson(values, [0.05] * 400)
    assert wide.ci_low == pytest.approx(plain.ci_low, abs=0.005)
    assert wide.ci_high == pytest.approx(plain.ci_high, abs=0.005)


def test_ratings_that_all_agree_do_not_make_a_point_interval() -> None:
    top = horvitz_thompson([7.0] * 30, [0.1] * 30, bounds=(1.0, 7.0))
    assert top.mean == 7.0 and top.ci_high == 7.0 and 6.0 < top.ci_low < 6.6
    middle = horvitz_thompson([4.0] * 30, [0.1] * 30, bounds=(1.0, 7.0))
    assert 3.0 < middle.ci_low < 4.0 < middle.ci_high < 5.0
    # One 6 among the 7s moves the interval a little, not to a sliver.
    almost = horvitz_thompson([7.0] * 29 + [6.0], [0.1] * 30, bounds=(1.0, 7.0))
    assert almost.ci_low < top.ci_low + 0.1 and almost.ci_high <= 7.0
    # Always inside the scale and around the estimate.
    for values in ([1.0] * 5, [1.0, 7.0], [1.0] * 40 + [2.0], [7.0, 7.0, 1.0]):
        e = horvitz_thompson(values, [0.3] * len(values), bounds=(1.0, 7.0))
        assert 1.0 <= e.ci_low <= e.mean <= e.ci_high <= 7.0


@pytest.mark.parametrize("population_known", [True, False])
def test_interval_covers_true_mean_at_nominal_rate_over_replays(population_known: bool) -> None:
    """Repeated 'replays' of real traffic (judge_pref of three models, mixed rates per stream
    segment via a boost) under different sampling keys: the 95% CI covers the true mean in
    about 95% of them."""
    population = judge_prefs("gpt-3.5-turbo-1106") + judge_prefs("alpaca-7b") + judge_prefs("claude-2")
    truth = sum(v for _, v in population) / len(population)
    pol = SamplingPolicy(
        channels={"human": ChannelPolicy(0.02), "rm": ChannelPolicy(0.08), "drift": ChannelPolicy(0.05)}
    )
    reps, covered = 300, 0
    for rep in range(reps):
        s = Sampler(pol, f"replay-{rep}".encode())
        values, probs = [], []
        for i, (eid, v) in enumerate(population):
            if i == 800:  # unequal probabilities: boost part of the traffic
                s.boost("s", 3.0, duration=1000.0, channels=("rm",))
            d = s.decide(eid, "s", float(i))
            if "rm" in d.sampled:
                values.append(v)
                probs.append(d.sampled["rm"])
        est = horvitz_thompson(values, probs, len(population) if population_known else None)
        covered += est.ci_low <= truth <= est.ci_high
    # Binomial bounds around 0.95 (normal-approximation intervals run slightly low at ~200 items).
    lo = binom.ppf(0.001, reps, 0.95) - 0.02 * reps
    assert lo <= covered <= reps, (covered, lo)


# --- coverage of the bounded (score) interval, Monte Carlo -------------------------------------

REPLICATES = 2000
UNITS = 5000
# Coverage of a 95% interval estimated from 2,000 replicates: 3 standard errors of Monte-Carlo slack.
MIN_COVERAGE = 0.95 - 3 * math.sqrt(0.95 * 0.05 / REPLICATES)


@functools.cache
def _design(n: int) -> tuple[NDArray[np.float64], NDArray[np.intp], NDArray[np.intp]]:
    """2,000 Poisson samples of expected size n from UNITS units whose inclusion probabilities
    vary 10x: the probabilities and, for every inclusion, its replicate and unit. The design does
    not depend on the values, so every population below is sampled by the same replicates."""
    rng = np.random.default_rng(n)
    u = np.exp(rng.uniform(0.0, math.log(10.0), UNITS))
    pi = n * u / u.sum()
    rep, unit = np.nonzero(rng.random((REPLICATES, UNITS)) < pi)
    return pi, rep, unit


def _coverage(y: NDArray[np.float64], bounds: tuple[float, float], n: int) -> tuple[float, float, float]:
    """(score coverage, normal coverage, mean score width) over the replicates of ``_design(n)``.
    The sums per replicate are vectorised; the first replicates are checked against
    horvitz_thompson itself, so they are the estimator's."""
    truth = float(y.mean())
    pi, rep, unit = _design(n)
    w = 1.0 / pi
    cols = (w, w * w, w * y, w * y * y, (1 - pi) * w * w, (1 - pi) * w * w * y, (1 - pi) * w * w * y * y)
    sums = np.stack([np.bincount(rep, weights=c[unit], minlength=REPLICATES) for c in cols], 1)
    covered = covered_normal = 0
    width = 0.0
    for r, (sw, sw2, swy, swyy, a0, a1, a2) in enumerate(sums.tolist()):
        mean = swy / sw
        variance = max(swyy / sw - mean * mean, 0.0)
        design = max(a2 - 2 * mean * a1 + mean * mean * a0, 0.0) / (sw * sw)
        lo, hi = bounded_interval(mean, variance, design, sw * sw / sw2, bounds)
        if r < 5:
            units = unit[rep == r]
            est = horvitz_thompson(y[units].tolist(), pi[units].tolist(), bounds=bounds)
            assert (est.ci_low, est.ci_high) == pytest.approx((lo, hi), abs=1e-9)
        covered += lo <= truth <= hi
        half = Z95 * math.sqrt(design)
        covered_normal += mean - half <= truth <= mean + half
        width += hi - lo
    return covered / REPLICATES, covered_normal / REPLICATES, width / REPLICATES


@pytest.mark.parametrize("rate", [0.001, 0.01, 0.03, 0.5, 0.97, 0.99])
def test_rate_interval_covers_at_the_nominal_rate_near_0_and_1(rate: float) -> None:
    rng = np.random.default_rng(int(rate * 1000))
    y = np.zeros(UNITS)
    y[rng.choice(UNITS, size=max(1, round(rate * UNITS)), replace=False)] = 1.0
    for n in (30, 100, 300):
        score, normal, width = _coverage(y, (0.0, 1.0), n)
        print(f"rate {rate} n {n}: score interval covers {score:.3f} (width {width:.3f}), normal {normal:.3f}")
        assert score >= MIN_COVERAGE, (rate, n, score)


@pytest.mark.parametrize(
    "ratings",
    [{7: 0.7, 6: 0.25, 5: 0.05}, {7: 0.99, 3: 0.01}, {2: 0.05, 3: 0.2, 4: 0.4, 5: 0.25, 6: 0.1}, {1: 0.9, 2: 0.1}],
    ids=["mostly-top", "rare-low", "middle", "mostly-bottom"],
)
def test_rating_interval_covers_at_the_nominal_rate(ratings: dict[int, float]) -> None:
    rng = np.random.default_rng(len(ratings))
    y = rng.choice(list(ratings), size=UNITS, p=list(ratings.values())).astype(np.float64)
    for n in (30, 100, 300):
        score, normal, width = _coverage(y, (1.0, 7.0), n)
        print(f"{ratings} n {n}: score interval covers {score:.3f} (width {width:.3f}), normal {normal:.3f}")
        assert score >= MIN_COVERAGE, (ratings, n, score)


# --- every place that shows a rate or a rating ------------------------------------------------


def _fill(store: Store, n: int = 30) -> None:
    """n episodes, none empty, none flagged, every one sampled for rm and human review (unequal
    probabilities) and rated 7 by a reviewer."""
    from monitor.review.auth import create_user
    from monitor.store import tables as t
    from monitor.store.store import bucket_of

    user = create_user(store, "rev", "reviewer", "correct horse battery")
    now = time.time()
    eps, samples, labels = [], [], []
    for i in range(n):
        eid = f"e{i}"
        p = 0.05 if i % 3 else 0.5
        eps.append(
            {
                "episode_id": eid,
                "stream": "chat",
                "model": "m",
                "ts": float(i),
                "prompt": "p",
                "response": "a real answer",
                "metadata": {"flagged": False, "score": 0.5},
                "source": "t",
                "position": eid,
                "ingested_at": now,
            }
        )
        for channel in ("rm", "human"):
            samples.append(
                {
                    "episode_id": eid,
                    "channel": channel,
                    "stream": "chat",
                    "ts": float(i),
                    "inclusion_probability": p,
                    "created_at": now,
                }
            )
        labels.append(
            {
                "episode_id": eid,
                "slot": 0,
                "user_id": user.id,
                "stream": "chat",
                "skipped": False,
                "rating": 7,
                "flags": [],
                "critique": "",
                "time_spent_ms": 1000,
                "created_at": now,
            }
        )
    with store.engine.begin() as conn:
        conn.execute(t.episodes.insert(), eps)
        conn.execute(t.samples.insert(), samples)
        conn.execute(t.labels.insert(), labels)
        conn.execute(t.traffic.insert(), [{"stream": "chat", "bucket": bucket_of(0.0), "episodes": 400}])


def test_no_zero_width_interval_at_any_call_site(sqlite_url: str) -> None:
    """`oversight estimate`, the admin page's estimates and chart, and the quality gauges: no
    empty response, no flag and only 7s among 30 labelled items must not read as certainty."""
    from monitor.metrics import Metrics
    from monitor.quality import estimates as stats
    from monitor.quality import oversight
    from monitor.quality.estimates import estimate_stream

    store = Store(sqlite_url)
    _fill(store)
    for quantity in ("empty_response", "metadata.flagged"):
        out = estimate_stream(store, "chat", "rm", quantity)["estimate"]
        assert out["mean"] == 0.0 and out["ci_low"] == 0.0, out
        assert 0.05 < out["ci_high"] < 0.5 and out["interval"] == "score", out
    numeric = estimate_stream(store, "chat", "rm", "metadata.score")["estimate"]
    # A metadata key's mean is over the episodes that carry it: the ratio, whatever the sample holds.
    assert numeric["interval"] == "normal" and numeric["method"] == "hajek"
    assert estimate_stream(store, "chat", "rm", "response_chars")["estimate"]["method"] == "horvitz-thompson"

    (est,) = stats.estimates(store, ["harmful"])
    flag = est["flags"]["harmful"]
    assert flag["mean"] == 0.0 and flag["ci_low"] == 0.0 and 0.05 < flag["ci_high"] < 0.5, flag
    rating = est["rating"]
    assert rating["mean"] == 7.0 and rating["ci_high"] == 7.0 and 5.0 < rating["ci_low"] < 6.9, rating
    (bucket,) = stats.estimate_series(store, "chat")
    assert bucket["ci_low"] == pytest.approx(rating["ci_low"]) and bucket["ci_high"] == 7.0

    quality = oversight.compute(store, None)["chat"]["quality"]
    m = Metrics(CollectorRegistry())
    oversight.publish(m, {"chat": {"quality": quality}})

    def gauge(bound: str) -> float | None:
        return m.registry.get_sample_value("oversight_quality_estimate", {"stream": "chat", "bound": bound})

    assert gauge("estimate") == 7.0 and gauge("ci_high") == 7.0
    low = gauge("ci_low")
    assert low is not None and low == pytest.approx(rating["ci_low"]) and low < 6.9
    store.close()


def true_means(path: Path, key: str) -> dict[str, float]:
    """The mean of ``metadata[key]`` per stream over every episode of a (gzipped) traffic file."""
    sums: dict[str, list[float]] = {}
    with gzip.open(path, "rb") as fh:
        for line in fh:
            try:
                obj = json.loads(line)
                v = obj["metadata"][key]
            except (ValueError, KeyError, TypeError):
                continue
            if isinstance(v, int | float):
                sums.setdefault(obj.get("stream", "default"), []).append(float(v))
    return {s: sum(v) / len(v) for s, v in sums.items()}


def test_ht_from_the_store_covers_truth_over_pipeline_replays(tmp_path: Path) -> None:
    """The full path: replays of the bundled real traffic through the pipeline under different
    sampling keys; the store-based estimate of mean judge_pref covers the true mean."""
    from monitor.config import load_settings
    from monitor.episodes.deadletter import JsonlDeadLetterSink
    from monitor.metrics import Metrics
    from monitor.pipeline import Pipeline
    from monitor.quality.estimates import estimate_stream
    from monitor.simulate.demo import bundled_traffic
    from monitor.sources.file import FileSource

    truth = true_means(bundled_traffic(), "judge_pref")
    reps, covered = 40, 0
    for rep in range(reps):
        s = load_settings(
            None,
            [
                "dev=true",  # short per-repetition keys: dev mode skips the secret-entropy check
                f"sampling.key=key-{rep}",
                "sampling.rm.rate=0.1",
                "drift.enabled=false",
                "database.url=sqlite://",
                f"dead_letter.path={tmp_path / 'd.jsonl'}",
            ],
        )
        store = Store(s.database.url)
        sink = JsonlDeadLetterSink(s.dead_letter.path, 1000)
        Pipeline(s, store, FileSource(str(bundled_traffic()), 1 << 20), sink, Metrics(CollectorRegistry())).run()
        for stream in ("chat", "assistant"):
            est = estimate_stream(store, stream, "rm", "metadata.judge_pref")["estimate"]
            covered += est["ci_low"] <= truth[stream] <= est["ci_high"]
        store.close()
    n = 2 * reps
    print(f"covered {covered}/{n}")
    assert covered >= binom.ppf(0.001, n, 0.95) - 0.02 * n, covered


def test_one_sampled_item_has_no_interval_unless_it_was_certain() -> None:
    """One item estimates no variance: the normal interval read [42, 42], certainty where a second
    item could have been anything. A census of one (probability 1) is exact."""
    import math

    for population in (None, 100):
        one = horvitz_thompson([42.0], [0.01], population=population)
        assert math.isnan(one.ci_low) and math.isnan(one.ci_high) and math.isnan(one.se), one
    census = horvitz_thompson([42.0], [1.0], population=1)
    assert census.ci_low == census.ci_high == 42.0
    rate = horvitz_thompson([1.0], [0.01], bounds=(0.0, 1.0))
    assert 0.0 < rate.ci_low < 1.0 and rate.ci_high == 1.0  # bounded: the score interval says what one item can


def _exact(values: list[float], probs: list[float]) -> dict[str, float]:
    """The HT and Hajek statistics of the items in exact rational arithmetic."""
    from fractions import Fraction

    ys, ps = [Fraction(y) for y in values], [Fraction(p) for p in probs]
    ws = [1 / p for p in ps]
    sw, total = sum(ws), sum(w * y for w, y in zip(ws, ys, strict=True))
    mean = total / sw
    design = Fraction(sum((1 - p) * w * w * (y - mean) ** 2 for y, p, w in zip(ys, ps, ws, strict=True)) / sw**2)
    ht_var = Fraction(sum((1 - p) * w * w * y * y for y, p, w in zip(ys, ps, ws, strict=True)))

    def root(x: Fraction) -> float:
        """sqrt of a square beyond the double range: taken at a power of two and scaled back."""
        half = (x.numerator.bit_length() - x.denominator.bit_length()) // 2
        return math.ldexp(math.sqrt(x / Fraction(4) ** half), half)

    return {"total": float(total), "hajek_mean": float(mean), "hajek_se": root(design), "ht_sd": root(ht_var)}


@pytest.mark.parametrize(
    ("offset", "spread", "seed"),
    [(0.0, 100.0, 0), (1e9, 1.0, 1), (-3e7, 0.01, 2), (1e300, 1e299, 3), (0.0, 1e-300, 4)],
)
def test_running_sums_agree_with_exact_arithmetic(offset: float, spread: float, seed: int) -> None:
    """Items added one at a time: the same estimate as exact arithmetic over the whole list, for values
    far from 0 with a small spread (where sum(y**2) - n * mean**2 loses every digit) and near the double
    range (where (y / pi)**2 overflows unless the sums are scaled)."""
    from sampling import RunningSums

    rng = np.random.default_rng(seed)
    values = [float(v) for v in offset + spread * rng.standard_normal(500)]
    probs = [float(p) for p in rng.choice([0.001, 0.02, 0.3, 1.0], size=500)]
    exact = _exact(values, probs)
    sums = RunningSums()
    for y, p in zip(values, probs, strict=True):
        sums.add(y, p)
    ht = sums.estimate(population=20_000.0)
    assert ht.total == pytest.approx(exact["total"], rel=1e-9)
    assert ht.se == pytest.approx(exact["ht_sd"] / 20_000.0, rel=1e-9)
    hajek = sums.estimate()
    assert hajek.mean == pytest.approx(exact["hajek_mean"], rel=1e-12)
    assert hajek.se == pytest.approx(exact["hajek_se"], rel=1e-6)


def test_running_sums_of_a_rate_give_the_score_interval() -> None:
    from sampling import RunningSums

    sums = RunningSums()
    for y, p in [(0.0, 0.5), (1.0, 0.1), (0.0, 0.1), (0.0, 0.2)]:
        sums.add(y, p)
    est = sums.estimate(bounds=(0.0, 1.0))
    assert (est.interval, round(est.mean, 3), round(est.ci_low, 3), round(est.ci_high, 3)) == (
        "score",
        0.37,
        0.077,
        0.805,
    )
    with pytest.raises(ValueError, match="inclusion probability"):
        sums.add(1.0, 0.0)
    with pytest.raises(ValueError, match="not a finite number"):
        sums.add(math.nan, 0.5)
    sums.add(2.0, 0.5)
    with pytest.raises(ValueError, match=r"2\.0 is outside the declared bounds"):
        sums.estimate(bounds=(0.0, 1.0))


def _hostile_fill(store: Store) -> None:
    """Sampled episodes whose quantities the database must compute as Python does: responses of
    Unicode whitespace only, non-ASCII text, metadata with the key absent, boolean, nested or text."""
    from monitor.store import tables as t
    from monitor.store.store import bucket_of

    responses = ["a real answer", "\u3000\u2028 \t\n", "", "  x  ", "\xa0", "héllo wörld 🙂" * 3, "\u200b", " " * 300]
    metas: list[object] = [{"flag": True, "n": 3}, {"flag": False}, {}, {"flag": "yes", "n": 2.5}, None]
    now = time.time()
    eps, samples = [], []
    for i in range(120):
        eid = f"e{i}"
        eps.append(
            {
                "episode_id": eid,
                "stream": "chat",
                "model": "m",
                "ts": float(i),
                "prompt": "ünïcode prompt " * (i % 5),
                "response": responses[i % len(responses)],
                "metadata": metas[i % len(metas)],
                "source": "t",
                "position": eid,
                "ingested_at": now,
            }
        )
        samples.append(
            {
                "episode_id": eid,
                "channel": "rm",
                "stream": "chat",
                "ts": float(i),
                "inclusion_probability": (0.05, 0.3, 1.0)[i % 3],
                "created_at": now,
            }
        )
    with store.engine.begin() as conn:
        conn.execute(t.episodes.insert(), eps)
        conn.execute(t.samples.insert(), samples)
        conn.execute(t.traffic.insert(), [{"stream": "chat", "bucket": bucket_of(0.0), "episodes": 900}])


@pytest.mark.parametrize(
    "quantity", ["response_chars", "prompt_chars", "empty_response", "metadata.flag", "metadata.n"]
)
def test_the_database_computes_each_quantity_as_python_does(db_url: str, quantity: str) -> None:
    """`oversight estimate` reads only the quantity and the probability, computed by the database: the
    same estimate as the quantity computed in Python from the whole rows."""
    from monitor.quality.estimates import estimate_stream, raw_quantity

    store = Store(db_url)
    _hostile_fill(store)
    rows = store.sampled("chat", "rm")
    raws = [raw_quantity(r, quantity) for r in rows]
    present = [(r, raw) for r, raw in zip(rows, raws, strict=True) if isinstance(raw, bool | int | float)]
    binary = all(isinstance(raw, bool) for _, raw in present)
    values = [float(raw) for _, raw in present]
    probs = [float(r["inclusion_probability"]) for r, _ in present]
    out = estimate_stream(store, "chat", "rm", quantity)
    assert out["n_missing"] == len(rows) - len(present)
    known = None if quantity.startswith("metadata.") else 900
    want = horvitz_thompson(values, probs, known, bounds=(0.0, 1.0) if binary else None)
    got = out["estimate"]
    assert got["n_sampled"] == want.n_sampled and got["interval"] == want.interval
    assert got["mean"] == pytest.approx(want.mean, rel=1e-12)
    assert got["ci_high"] == pytest.approx(want.ci_high, rel=1e-9)
    store.close()


def test_running_sums_keep_the_variance_whatever_item_comes_first() -> None:
    """A census item far from the rest, first (the database's rows come in no order): summed around
    the first value, its design weight of 0 let the expansion cancel the others' variance (a
    standard error 11 times too large). Around the running weighted means, nothing cancels."""
    from sampling import RunningSums

    rng = np.random.default_rng(3)
    values = [1e8, *(float(v) for v in rng.standard_normal(20_000))]
    probs = [1.0, *([0.001] * 20_000)]
    exact = _exact(values, probs)
    for order in (values, values[::-1]):
        sums = RunningSums()
        for y, p in zip(order, probs if order is values else probs[::-1], strict=True):
            sums.add(y, p)
        est = sums.estimate()
        assert est.mean == pytest.approx(exact["hajek_mean"], rel=1e-9)
        assert est.se == pytest.approx(exact["hajek_se"], rel=1e-6)
