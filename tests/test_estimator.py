"""Horvitz-Thompson: unbiased, and its 95% interval covers the true mean at the nominal rate."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
from scipy.stats import binom

from sampling import ChannelPolicy, Sampler, SamplingPolicy, horvitz_thompson


def judge_prefs(shared: Path, model: str) -> list[tuple[str, float]]:
    with gzip.open(shared / "alpaca_eval" / f"{model}.jsonl.gz", "rt") as fh:
        rows = [json.loads(line) for line in fh]
    return [(f"{model}-{i}", float(r["judge_pref"])) for i, r in enumerate(rows) if r.get("judge_pref") is not None]


def test_known_values() -> None:
    est = horvitz_thompson([1.0, 3.0], [0.5, 0.25], population=10)
    assert est.total == pytest.approx(1 / 0.5 + 3 / 0.25)
    assert est.mean == pytest.approx(1.4)
    var = (1 - 0.5) * 1 / 0.25 + (1 - 0.25) * 9 / 0.0625
    assert est.se == pytest.approx(math.sqrt(var) / 10)
    assert est.ci_low < est.mean < est.ci_high
    census = horvitz_thompson([2.0, 4.0], [1.0, 1.0], population=2)
    assert (census.mean, census.se) == (3.0, 0.0)
    hajek = horvitz_thompson([1.0, 3.0], [0.5, 0.5])
    assert hajek.method == "hajek" and hajek.mean == pytest.approx(2.0)


def test_empty_sample_is_unknown_not_zero() -> None:
    est = horvitz_thompson([], [], population=100)
    assert math.isnan(est.mean) and est.n_sampled == 0


def test_rejects_bad_probabilities() -> None:
    with pytest.raises(ValueError):
        horvitz_thompson([1.0], [0.0])
    with pytest.raises(ValueError):
        horvitz_thompson([1.0], [1.5])


@pytest.mark.parametrize("population_known", [True, False])
def test_interval_covers_true_mean_at_nominal_rate_over_replays(shared_data: Path, population_known: bool) -> None:
    """Repeated 'replays' of real traffic (judge_pref of three models, mixed rates per stream
    segment via a boost) under different sampling keys: the 95% CI covers the true mean in
    about 95% of them."""
    population = judge_prefs(shared_data, "gpt-3.5-turbo-1106") + judge_prefs(shared_data, "alpaca-7b")
    population += judge_prefs(shared_data, "claude-2")
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


def test_ht_from_the_store_covers_truth_over_pipeline_replays(tmp_path: Path) -> None:
    """The full path: replays of the bundled real traffic through the pipeline under different
    sampling keys; the store-based estimate of mean judge_pref covers the true mean."""
    from prometheus_client import CollectorRegistry

    from monitor.config import load_settings
    from monitor.deadletter import JsonlDeadLetterSink
    from monitor.demo import _true_means, bundled_traffic
    from monitor.estimates import estimate_stream
    from monitor.metrics import Metrics
    from monitor.pipeline import Pipeline
    from monitor.sources.file import FileSource
    from monitor.store import Store

    truth = _true_means(bundled_traffic(), "judge_pref")
    reps, covered = 40, 0
    for rep in range(reps):
        s = load_settings(
            None,
            [
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
