"""The false-alarm rate of the default drift detectors on long stationary real traffic.

    python bench/drift_ert.py [--episodes N] [--seeds 0,1,2] [--mix control|all]

``drift.ert`` (default 20,000) promises at most one false alarm per that many episodes of a
stream, all its text signals and detectors together: each detector is calibrated on a null (the
Gaussian, or the bootstrap of its reference) to ``k x drift.ert``. The reference it is built on
is only ``drift.reference_size`` (500) episodes, so its normal-score transform is an estimate,
and an estimated reference is the classic way a control chart's in-control run length falls well
short of its nominal one. ``bench/drift.py``'s 3,000-episode control cannot show that; this runs
the product's DriftMonitor (default settings, embeddings off: their budget is separate) over one
stream of ``--episodes`` episodes drawn at random, with replacement, from the real AlpacaEval
answers of ``--mix`` (``control``: the four models of ``bench/drift.py``'s control; ``all``: every
model in the shared data), so nothing changes, and counts its events. Each event re-references
the signal (it warms up again on ``drift.reference_size`` episodes and is rebuilt), as in the
service, so every seed tests many estimated references, not one.

Prints per seed: events, events per ``drift.ert`` episodes with a 95% Poisson upper bound, the
signals that fired and episodes/s; then the pooled rate against the budget of 1.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.shared_data import shared_data  # noqa: E402

CONTROL = ("gpt-3.5-turbo-1106", "claude-2", "vicuna-13b-v1.5", "alpaca-7b")
T0 = 1_767_225_600.0


def poisson_upper(k: int, conf: float = 0.95) -> float:
    """The exact upper ``conf`` bound of a Poisson mean from ``k`` events (chi-square quantile by
    bisection on the Poisson CDF, so that nothing beyond the standard library is needed)."""
    lo, hi = float(k), float(k) + 10.0 * math.sqrt(k + 1.0) + 10.0

    def cdf(mu: float) -> float:
        term = total = math.exp(-mu)
        for i in range(1, k + 1):
            term *= mu / i
            total += term
        return total

    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) > 1 - conf else (lo, mid)
    return hi


def texts(mix: str) -> list[tuple[str, str]]:
    """(instruction, answer) of every answer of the mix's models."""
    folder = shared_data("alpaca_eval")
    models = (
        CONTROL if mix == "control" else tuple(sorted(p.name[: -len(".jsonl.gz")] for p in folder.glob("*.jsonl.gz")))
    )
    rows: list[tuple[str, str]] = []
    for m in models:
        with gzip.open(folder / f"{m}.jsonl.gz", "rt", encoding="utf-8") as fh:
            rows += [(r["instruction"], r["output"]) for r in map(json.loads, fh)]
    return rows


def run(rows: list[tuple[str, str]], episodes: int, seed: int) -> dict[str, Any]:
    """One stream of ``episodes`` drawn from ``rows`` through a DriftMonitor at default settings."""
    from monitor.config import load_settings
    from monitor.drift import DriftMonitor
    from monitor.episodes.validate import parse_episode
    from monitor.metrics import Metrics
    from monitor.store import Store
    from sampling.policy import Decision

    base = [
        parse_episode(
            json.dumps(
                {"episode_id": f"b{i}", "stream": "s", "model": "m", "timestamp": T0, "prompt": p, "response": r}
            ).encode(),
            1 << 20,
            T0,
        )
        for i, (p, r) in enumerate(rows)
    ]
    settings = load_settings(None, ["dev=true", "drift.embedding.enabled=false"])
    store = Store("sqlite://")
    mon = DriftMonitor(settings.drift, store, b"k" * 32, Metrics(), boost=lambda *a: None)
    nothing = Decision({}, {}, 0.5, 0.5)
    rng = random.Random(seed)
    events: list[str] = []
    t0 = time.perf_counter()
    for i in range(episodes):
        ep = dataclasses.replace(rng.choice(base), episode_id=f"e{i}", timestamp=T0 + i * 0.02)
        mon.observe(ep, nothing, i)
        if i % 100 == 99:  # as the pipeline does at every batch
            events += [e["signal"] for e in mon.take_events()]
    events += [e["signal"] for e in mon.take_events()]
    took = time.perf_counter() - t0
    mon.close()
    store.close()
    ert = settings.drift.ert
    return {
        "seed": seed,
        "episodes": episodes,
        "events": len(events),
        "per_ert": round(len(events) / episodes * ert, 3),
        "per_ert_upper95": round(poisson_upper(len(events)) / episodes * ert, 3),
        "by_signal": dict(sorted(collections.Counter(events).items())),
        "episodes_per_s": round(episodes / took),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--episodes", type=int, default=1_000_000, help="episodes per seed (one stream)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--mix", choices=("control", "all"), default="all")
    args = ap.parse_args()

    from monitor.config import DriftConfig

    ert = DriftConfig().ert
    rows = texts(args.mix)
    print(f"{len(rows)} real answers ({args.mix}), drawn at random: one stationary stream; budget 1 per {ert:,.0f}")
    results = []
    for seed in (int(s) for s in args.seeds.split(",")):
        r = run(rows, args.episodes, seed)
        results.append(r)
        print(
            f"seed {seed}: {r['events']} events in {r['episodes']:,} episodes = {r['per_ert']} per {ert:,.0f}"
            f" (95% upper {r['per_ert_upper95']}); {r['by_signal']}; {r['episodes_per_s']:,} episodes/s",
            flush=True,
        )
    n, k = sum(r["episodes"] for r in results), sum(r["events"] for r in results)
    pooled = {
        "events": k,
        "episodes": n,
        "per_ert": round(k / n * ert, 3),
        "per_ert_upper95": round(poisson_upper(k) / n * ert, 3),
    }
    print(
        f"pooled: {k} events in {n:,} episodes = {pooled['per_ert']} per {ert:,.0f} (95% upper"
        f" {pooled['per_ert_upper95']}; the budget is 1)"
    )
    print(json.dumps({"bench": "drift_ert", "mix": args.mix, "ert": ert, "pooled": pooled, "seeds": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
