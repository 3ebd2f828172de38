"""Drift detection on real traffic: detection delay and false alarms per scenario.

    python bench/drift.py [--seed N] [--scenarios a,b,...] [--set drift.ert=172800 ...]

Scenarios are built from ../shared/data (needed: AlpacaEval outputs of real models, HH-RLHF red-team
prompts; see bench/shared_data.py): 1,500 episodes before and 1,500 after each change, ``model`` constant and nothing in
``metadata``: detection must come from the traffic itself. For each scenario the monitor (the
full pipeline with its default configuration: text-statistic CUSUMs on every episode,
embeddings of the 5% drift channel) is compared with two standalone baselines fed the same
stream: river ADWIN (default delta) on response length, and alibi-detect MMDDriftOnline on
prompt+response embeddings (ERT 2000, window 50, 500-episode reference; only where the `alibi` extra
is installed). Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.shared_data import shared_data  # noqa: E402
from detectors.extras import installed  # noqa: E402

N = 1500
T0 = 1_767_225_600


def alpaca(model: str) -> list[dict[str, Any]]:
    with gzip.open(shared_data("alpaca_eval", f"{model}.jsonl.gz"), "rt") as fh:
        return [
            {"prompt": r["instruction"], "response": r["output"], "dataset": r["dataset"]} for r in map(json.loads, fh)
        ]


def red_team() -> list[dict[str, Any]]:
    out = []
    with gzip.open(shared_data("hh_rlhf", "harmless-base-test.jsonl.gz"), "rt") as fh:
        for line in fh:
            chosen = json.loads(line)["chosen"]
            parts = chosen.split("\n\nAssistant:")
            prompt = parts[0].replace("\n\nHuman:", "", 1).strip()
            response = parts[1].split("\n\nHuman:")[0].strip() if len(parts) > 1 else ""
            out.append({"prompt": prompt, "response": response, "dataset": "hh"})
    return out


def mix(rng: random.Random, parts: list[tuple[list[dict[str, Any]], float]], n: int) -> list[dict[str, Any]]:
    pools, weights = zip(*parts, strict=True)
    return [rng.choice(rng.choices(pools, weights)[0]) for _ in range(n)]


def scenarios(rng: random.Random) -> dict[str, tuple[list[dict[str, Any]], int | None]]:
    gpt, alp = alpaca("gpt-3.5-turbo-1106"), alpaca("alpaca-7b")
    out: dict[str, tuple[list[dict[str, Any]], int | None]] = {}
    control = [(alpaca(m), 1.0) for m in ("gpt-3.5-turbo-1106", "claude-2", "vicuna-13b-v1.5", "alpaca-7b")]
    out["control"] = (mix(rng, control, 2 * N), None)
    out["policy_swap"] = (mix(rng, [(gpt, 1)], N) + mix(rng, [(alp, 1)], N), N)
    out["style_verbose"] = (mix(rng, [(gpt, 1)], N) + mix(rng, [(alpaca("gpt-3.5-turbo-1106_verbose"), 1)], N), N)
    out["style_concise"] = (mix(rng, [(gpt, 1)], N) + mix(rng, [(alpaca("gpt-3.5-turbo-1106_concise"), 1)], N), N)
    out["rlhf_update"] = (mix(rng, [(alp, 1)], N) + mix(rng, [(alpaca("alpaca-farm-ppo-human"), 1)], N), N)
    a = [r for r in gpt if r["dataset"] in ("helpful_base", "oasst")]
    b = [r for r in gpt if r["dataset"] in ("koala", "vicuna", "selfinstruct")]
    out["prompt_source"] = (mix(rng, [(a, 1)], N) + mix(rng, [(b, 1)], N), N)
    out["red_team_25"] = (mix(rng, [(gpt, 1)], N) + mix(rng, [(gpt, 0.75), (red_team(), 0.25)], N), N)
    out["reward_hacking_10"] = (mix(rng, [(gpt, 1)], N) + mix(rng, [(gpt, 0.9), (alpaca("NullModel"), 0.1)], N), N)
    return out


def encode(rows: list[dict[str, Any]], name: str) -> list[bytes]:
    return [
        json.dumps(
            {
                "episode_id": f"{name}-{i}",
                "stream": name,
                "model": "policy",
                "timestamp": T0 + i,
                "prompt": r["prompt"],
                "response": r["response"],
            }
        ).encode()
        for i, r in enumerate(rows)
    ]


def run_monitor(values: list[bytes], tmp: str, overrides: list[str]) -> tuple[list[dict[str, Any]], float]:
    from prometheus_client import CollectorRegistry

    from monitor.config import load_settings
    from monitor.episodes.deadletter import JsonlDeadLetterSink
    from monitor.service import build_service
    from monitor.sources.memory import MemorySource

    s = load_settings(
        None,
        [
            "dev=true",
            "database.url=sqlite://",
            f"dead_letter.path={tmp}/d.jsonl",
            "pipeline.batch_size=100",
            *overrides,
        ],
    )
    p = build_service(
        s,
        source=MemorySource(values),
        serve=False,
        dead_letters=JsonlDeadLetterSink(s.dead_letter.path, 1000),
        registry=CollectorRegistry(),
    )
    t0 = time.perf_counter()
    stats = p.run()
    return stats.drift_events, len(values) / (time.perf_counter() - t0)


def first_after(indices: list[int], change: int | None) -> tuple[int | None, int]:
    """(delay after the change or None if missed, false alarms before it)."""
    if change is None:
        return None, len(indices)
    before = [i for i in indices if i < change]
    after = [i for i in indices if i >= change]
    return (after[0] - change if after else None), len(before)


def baseline_adwin(rows: list[dict[str, Any]]) -> list[int]:
    from river.drift import ADWIN

    d, out = ADWIN(), []  # type: ignore[no-untyped-call]
    for i, r in enumerate(rows):
        d.update(float(len(r["response"])))  # type: ignore[no-untyped-call]
        if d.drift_detected:
            out.append(i)
    return out


def baseline_mmd(rows: list[dict[str, Any]], emb_cache: dict[tuple[str, str], Any]) -> list[int]:
    import numpy as np
    from alibi_detect.cd import MMDDriftOnline

    from monitor.signals.embeddings import Embedder

    # The monitor's own embedding (the default pair encoding), cached by episode.
    keys = [(r["prompt"], r["response"]) for r in rows]
    missing = sorted({k for k in keys if k not in emb_cache})
    if missing:
        vecs = Embedder().embed_episodes([p for p, _ in missing], [r for _, r in missing])
        emb_cache.update(zip(missing, vecs, strict=True))
    x = np.stack([emb_cache[k] for k in keys])
    ref = x[:500]
    # alibi-detect's defaults but for the ERT, window and reference of the orientation
    # numbers; its default 1,000 bootstraps cannot estimate the 1 - 1/2000 quantile (it refuses).
    det = MMDDriftOnline(ref, ert=2000, window_size=50, n_bootstraps=5000, backend="pytorch", verbose=False)
    out = []
    for i in range(500, len(x)):
        if det.predict(x[i])["data"]["is_drift"]:
            out.append(i)
            det.reset_state()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scenarios", help="comma-separated subset")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--set", action="append", default=[], help="configuration override KEY=VALUE (repeatable)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    scen = scenarios(rng)
    if args.scenarios:
        scen = {k: v for k, v in scen.items() if k in args.scenarios.split(",")}
    results = []
    emb_cache: dict[tuple[str, str], Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (rows, change) in scen.items():
            events, rate = run_monitor(encode(rows, name), tmp, args.set)
            delay, false_alarms = first_after(sorted({e["index"] for e in events}), change)
            res: dict[str, Any] = {
                "scenario": name,
                "change_at": change,
                "monitor_delay": delay,
                "monitor_false_alarms": false_alarms,
                "monitor_signals": sorted({e["signal"] for e in events if change is None or e["index"] >= change}),
                "replay_episodes_per_s": round(rate, 1),
            }
            if not args.no_baselines:
                res["adwin_delay"], res["adwin_false_alarms"] = first_after(baseline_adwin(rows), change)
                # alibi-detect is the optional `alibi` extra (BSL 1.1): without it, no mmd column.
                if installed("alibi_detect"):
                    res["mmd_delay"], res["mmd_false_alarms"] = first_after(baseline_mmd(rows, emb_cache), change)
            results.append(res)
            print(json.dumps(res), flush=True)
    print(f"\n{'scenario':<20}{'monitor':>9}{'FA':>4}{'adwin':>8}{'FA':>4}{'mmd':>6}{'FA':>4}{'ep/s':>8}  signals")
    for r in results:

        def f(v: Any) -> str:
            return "-" if v is None else str(v)

        print(
            f"{r['scenario']:<20}{f(r['monitor_delay']):>9}{r['monitor_false_alarms']:>4}"
            f"{f(r.get('adwin_delay')):>8}{f(r.get('adwin_false_alarms')):>4}"
            f"{f(r.get('mmd_delay')):>6}{f(r.get('mmd_false_alarms')):>4}{r['replay_episodes_per_s']:>8}  "
            f"{','.join(r['monitor_signals'])}"
        )
    shifts = [r for r in results if r["change_at"] is not None]
    detected = [r["monitor_delay"] for r in shifts if r["monitor_delay"] is not None]
    summary = {
        "bench": "drift",
        "detected": f"{len(detected)}/{len(shifts)}",
        "mean_delay": round(statistics.fmean(detected), 1) if detected else None,
        "control_false_alarms": sum(r["monitor_false_alarms"] for r in results if r["change_at"] is None),
        "false_alarms_before_changes": sum(r["monitor_false_alarms"] for r in shifts),
        "replay_episodes_per_s": round(statistics.fmean(r["replay_episodes_per_s"] for r in results), 1),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
