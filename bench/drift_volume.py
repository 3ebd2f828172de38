"""Drift at production volume: 14-day event-time streams with a daily and weekly rhythm.

    python bench/drift_volume.py [--seed N] [--scenarios a,b,...] [--days 14]

Built from the real texts in ../shared/data (bench/shared_data.py). Traffic runs 5 to 60
episodes/s through the day (60% on weekends); the prompt mix follows the clock: AlpacaEval's
``dataset`` sources and HH-RLHF red-team-style prompts (with their HH answers) in proportions
that change with the hour and the weekend. The policy is stable for 10 days, then one real shift
of bench/drift.py happens on a Thursday at 14:00 (policy swap, verbose style, RLHF update,
NullModel at 10%, red team at 25%, gamed answers at 5% from ``gpt4_gamed``); one control has none.

Each distinct text's signals are computed once (``monitor.signals.text_stats``) and put through
the same normal-score transform the DriftMonitor fits on its first ``drift.reference_size``
episodes; then the product's ``windowed`` detectors (one per default text signal, at the default
drift settings: 1 false alarm per stream per 30 days, 0.2 SD minimum shift, 25% relative rate
change) get every episode, summed per minute of event time (``add_sums``: the same state changes
as one update per episode, see detectors/windowed.py). About 36 million episodes per scenario.

Prints per scenario: false alarms in the stable days (after the 1-day warm-up), extrapolated per
stream per 30 days with a 95% upper bound, the detection time in minutes after the change, the
signal that fired with its estimated shift (reference SDs, 95% interval) against the true one,
and episodes/s of the detector path; then the per-episode path's speed (``update(x, t)``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.drift import alpaca, red_team  # noqa: E402
from detectors.windowed import WindowedShiftDetector  # noqa: E402
from monitor.config import DriftConfig  # noqa: E402
from monitor.drift.monitor import windowed_ert_s  # noqa: E402
from monitor.signals import TEXT_SIGNALS, text_stats  # noqa: E402
from monitor.signals.normalise import NormalScores  # noqa: E402

DAY = 86400.0
T0 = 1_767_571_200.0  # Monday 2026-01-05 00:00 UTC
CHANGE_DAY, CHANGE_HOUR = 10, 14  # Thursday 14:00
SIGNALS = [s for s in DriftConfig().signals if s in TEXT_SIGNALS]
SOURCES = ["helpful_base", "oasst", "koala", "vicuna", "selfinstruct", "hh"]
FloatArray = NDArray[np.float64]
Rows = list[dict[str, Any]]
Pools = list[dict[str, FloatArray]]


def rate(t: float) -> float:
    hour = (t % DAY) / 3600
    weekend = (math.floor(t / DAY) + 3) % 7 >= 5
    r = 5 + 55 * (1 + math.sin(2 * math.pi * (hour - 9) / 24)) / 2
    return r * (0.6 if weekend else 1.0)


def mix_weights(t: float) -> FloatArray:
    """Share of each prompt source by hour of day (and weekend): the clock moves the mix."""
    hour = math.floor((t % DAY) / 3600)
    weekend = (math.floor(t / DAY) + 3) % 7 >= 5
    w = np.array([1 + 0.8 * math.sin(2 * math.pi * (hour - 3 * i) / 24) for i in range(len(SOURCES))])
    w[-1] = 0.15 + 0.1 * math.sin(2 * math.pi * hour / 24)  # HH prompts: a minority, more at night
    if weekend:
        w[2:4] *= 1.5
    out: FloatArray = w / w.sum()
    return out


def by_source(rows: Rows) -> list[Rows]:
    return [[r for r in rows if r["dataset"] == s] for s in SOURCES[:-1]]


def scenario_pools(name: str) -> tuple[list[Rows], list[Rows] | None, float]:
    """(pools before, pools after or None, share of the 'after' pools mixed in after the change)."""
    gpt, hh = by_source(alpaca("gpt-3.5-turbo-1106")), red_team()
    base = [*gpt, hh]
    if name == "control":
        return base, None, 0.0
    if name == "rlhf_update":
        alp = [*by_source(alpaca("alpaca-7b")), hh]
        return alp, [*by_source(alpaca("alpaca-farm-ppo-human")), hh], 1.0
    full = {"policy_swap": "alpaca-7b", "verbose": "gpt-3.5-turbo-1106_verbose"}
    if name in full:
        return base, [*by_source(alpaca(full[name])), hh], 1.0
    # Mixtures: a share of the traffic comes from another pool, whatever the hour.
    part = {"nullmodel_10": ("NullModel", 0.10), "gamed_5": ("gpt4_gamed", 0.05)}
    if name in part:
        other = [r for src in by_source(alpaca(part[name][0])) for r in src]
        return base, [other] * len(base), part[name][1]
    if name == "red_team_25":
        return base, [hh] * len(base), 0.25
    raise ValueError(name)


class Cache:
    """Each distinct text's signals, computed once. Keyed by the texts themselves: an ``id()`` of a
    row is reused once the row is freed (the pools of the scenario before), and a key by id then
    handed one text the signals of another."""

    def __init__(self) -> None:
        self._by_text: dict[tuple[str, str], dict[str, float]] = {}

    def values(self, pool: Rows) -> dict[str, FloatArray]:
        out: dict[str, list[float]] = {s: [] for s in SIGNALS}
        for r in pool:
            key = (r["prompt"], r["response"])
            if key not in self._by_text:
                self._by_text[key] = text_stats(r["prompt"], r["response"])
            for s in SIGNALS:
                out[s].append(self._by_text[key][s])
        return {s: np.asarray(v, dtype=float) for s, v in out.items()}


def transformed(pools: list[Rows], cache: Cache, transforms: dict[str, NormalScores]) -> list[dict[str, FloatArray]]:
    out = []
    for pool in pools:
        raw = cache.values(pool)
        out.append({s: np.asarray([transforms[s](v) for v in raw[s]]) if s in transforms else raw[s] for s in SIGNALS})
    return out


def fit_transforms(pools: list[Rows], cache: Cache, rng: np.random.Generator) -> dict[str, NormalScores]:
    """What the DriftMonitor fits: normal scores on the first 500 episodes (continuous signals)."""
    w = mix_weights(T0)
    sample = [pools[i][int(rng.integers(len(pools[i])))] for i in rng.choice(len(pools), 500, p=w)]
    raw = cache.values(sample)
    return {s: NormalScores.fit(raw[s].tolist()) for s in SIGNALS if TEXT_SIGNALS[s].kind == "continuous"}


def detectors_for(cfg: DriftConfig) -> dict[str, WindowedShiftDetector]:
    ert = windowed_ert_s(cfg.model_copy(update={"signals": {s: ["windowed"] for s in SIGNALS}}))
    return {
        s: WindowedShiftDetector(
            ert=ert,
            windows_s=tuple(cfg.windows_s),
            min_shift_sd=cfg.min_shift_sd,
            min_rate_change=cfg.min_rate_change,
            binary=TEXT_SIGNALS[s].kind == "binary",
            warmup_s=cfg.seasonal_warmup_s,
            half_life_folds=cfg.reference_half_life_days,
        )
        for s in SIGNALS
    }


def minute_sums(
    rng: np.random.Generator, t: float, before: Pools, mixed: Pools | None, share: float
) -> tuple[int, dict[str, list[float]]]:
    """One minute of traffic: Poisson(rate x 60) episodes, sources by the hour's mix; after the
    change a Binomial(share) part of them from the other pools."""
    n = int(rng.poisson(rate(t) * 60))
    k = 0 if mixed is None else n if share >= 1.0 else int(rng.binomial(n, share))
    sums = {s: [0.0, 0.0] for s in SIGNALS}
    _draw(rng, t, before, n - k, sums)
    if mixed is not None and k:
        _draw(rng, t, mixed, k, sums)
    return n, sums


def _draw(rng: np.random.Generator, t: float, values: Pools, n: int, sums: dict[str, list[float]]) -> None:
    for i, c in enumerate(rng.multinomial(n, mix_weights(t)).tolist()):
        if c:
            idx = rng.integers(0, len(values[i][SIGNALS[0]]), c)
            for s in SIGNALS:
                v = values[i][s][idx]
                sums[s][0] += float(v.sum())
                sums[s][1] += float((v * v).sum())


def true_shift(before: Pools, mixed: Pools, share: float, signal: str, t: float) -> float:
    """The shift of a signal's mean at the hour of the change, in the before-traffic's SDs."""
    w = mix_weights(t)
    mb = sum(wi * p[signal].mean() for wi, p in zip(w, before, strict=True))
    vb = sum(wi * (p[signal] ** 2).mean() for wi, p in zip(w, before, strict=True)) - mb * mb
    pairs = zip(w, before, mixed, strict=True)
    ma = sum(wi * ((1 - share) * b[signal].mean() + share * a[signal].mean()) for wi, b, a in pairs)
    return float((ma - mb) / math.sqrt(max(vb, 1e-12)))


def run_scenario(name: str, seed: int, days: int, cache: Cache, cfg: DriftConfig) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    pools, after_pools, share = scenario_pools(name)
    transforms = fit_transforms(pools, cache, rng)
    before = transformed(pools, cache, transforms)
    mixed = None if after_pools is None else transformed(after_pools, cache, transforms)
    dets = detectors_for(cfg)
    change = T0 + CHANGE_DAY * DAY + CHANGE_HOUR * 3600 if mixed is not None else math.inf
    false_alarms: list[tuple[float, str, dict[str, float]]] = []
    first: list[tuple[float, str, dict[str, float]]] = []
    episodes, det_time = 0, 0.0
    for m in range(days * 1440):
        t = T0 + m * 60.0
        n, sums = minute_sums(rng, t, before, mixed if t >= change else None, share)
        if n == 0:
            continue
        episodes += n
        start = time.perf_counter()
        for s, (a, b) in sums.items():
            if dets[s].add_sums(t, n, a, b):
                res = dict(dets[s].last_test or {})
                (first if t >= change else false_alarms).append((t, s, res))
        det_time += time.perf_counter() - start
    stable_days = min(days, CHANGE_DAY) - 1  # after the 1-day warm-up
    fa = sum(1 for t, _, _ in false_alarms if t < T0 + CHANGE_DAY * DAY)
    out: dict[str, Any] = {
        "scenario": name,
        "episodes": episodes,
        "false_alarms_stable": fa,
        "false_alarms_after_warmup_total": len(false_alarms),
        "per_30d": fa * 30 / stable_days,
        "per_30d_upper95": poisson_upper95(fa) * 30 / stable_days,
        "detector_eps": episodes / det_time if det_time else None,
    }
    if mixed is not None and first:
        t, s, res = first[0]
        out.update(
            detect_min=(t - change) / 60,
            signal=s,
            est_sd=res.get("shift_sd"),
            ci=(res.get("ci_low"), res.get("ci_high")),
            true_sd=true_shift(before, mixed, share, s, change),
        )
    elif mixed is not None:
        out["detect_min"] = None
    if mixed is not None:
        out["true_sd_by_signal"] = {s: round(true_shift(before, mixed, share, s, change), 3) for s in SIGNALS}
    return out


def poisson_upper95(k: int) -> float:
    """One-sided 95% upper bound of a Poisson mean after k events (chi-square bound, by bisection)."""
    lo, hi = 0.0, 10.0 + 3 * k
    for _ in range(60):
        mid = (lo + hi) / 2
        cdf = sum(math.exp(-mid) * mid**i / math.factorial(i) for i in range(k + 1))
        lo, hi = (mid, hi) if cdf > 0.05 else (lo, mid)
    return hi


def per_episode_speed() -> float:
    det = WindowedShiftDetector()
    rng = random.Random(1)
    n = 300_000
    xs = [rng.gauss(0, 1) for _ in range(n)]
    start = time.perf_counter()
    for i, x in enumerate(xs):
        det.update(x, T0 + i * 0.01)
    return n / (time.perf_counter() - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--days", type=int, default=14)
    names = ["control", "policy_swap", "verbose", "rlhf_update", "nullmodel_10", "red_team_25", "gamed_5"]
    p.add_argument("--scenarios", default=",".join(names))
    p.add_argument("--min-shift-sd", type=float, default=DriftConfig().min_shift_sd)
    args = p.parse_args()
    cfg = DriftConfig(min_shift_sd=args.min_shift_sd)
    cache = Cache()
    rows = []
    print(
        f"{'scenario':<14} {'episodes':>11} {'FA 10d':>6} {'/30d (95% up)':>14} {'detect min':>10} {'signal':<20}"
        f" {'est SD [95%]':>22} {'true SD':>8} {'det eps/s':>10}"
    )
    for i, name in enumerate(args.scenarios.split(",")):
        r = run_scenario(name, args.seed * 100 + i, args.days, cache, cfg)
        rows.append(r)
        det = "-" if "detect_min" not in r else ("missed" if r["detect_min"] is None else f"{r['detect_min']:.0f}")
        est = "" if r.get("est_sd") is None else f"{r['est_sd']:+.3f} [{r['ci'][0]:+.3f},{r['ci'][1]:+.3f}]"
        true = "" if r.get("true_sd") is None else f"{r['true_sd']:+.3f}"
        print(
            f"{name:<14} {r['episodes']:>11,} {r['false_alarms_stable']:>6} {r['per_30d']:>5.2f}"
            f" ({r['per_30d_upper95']:>5.2f}) "
            f"{det:>10} {r.get('signal', ''):<20} {est:>22} {true:>8} {r['detector_eps']:>10,.0f}",
            flush=True,
        )
    print(f"per-episode path (update(x, t), one signal): {per_episode_speed():,.0f} updates/s")
    print(json.dumps({"drift_volume": rows}, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
