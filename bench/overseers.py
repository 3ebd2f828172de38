"""Overseeing the overseers: do the canaries measure reviewers right, and what can the reward model see?

    python bench/overseers.py [--seeds 8] [--episodes 1200] [--share 0.5] [--rm-items 40] [--no-rm] [--json]

Reviewers. Per seed, the bundled real traffic (``monitor/data/demo-traffic.jsonl.gz``: AlpacaEval
answers of real models; its first ``--episodes`` records) goes through the service as in production
(validation, sampling: here every episode to the human channel, into the review queue), and four
simulated reviewers of *known* skill work the queue through the review API over HTTP. Canaries
are mixed in blind at ``--share`` of each reviewer's items under a two-condition assistance
experiment (``none``; ``hints``: the built-in assistants that need no model). The simulated
reviewers detect each kind with a configured probability (``SENSITIVITY``, varied per seed by
a seeded draw), gain ``GAIN`` when their condition shows assistance, and flag unperturbed
originals at ``FALSE_FLAG``. The product's report (``monitor.quality.canaries``) then gives, per
condition and kind, the detection rate with its 95% interval, and per kind the assistance
effect with its interval. Printed: estimated against configured values, and the *coverage* of
the 95% intervals over all (seed, cell) pairs: about 95% means the intervals are honest.

Reward model. The default model's sensitivity per kind, trained as the demo's starting version
(the bundled 400 HH-RLHF harmless pairs, default training) and measured on the gate's probe set
(``bench/perturb.py --train-rm hh_rlhf``). ``--no-rm`` skips it (about 1-2 minutes on CPU).

Prints tables and one JSON line ``{"bench": "overseers", ...}``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TRAFFIC = REPO / "monitor" / "data" / "demo-traffic.jsonl.gz"
KINDS = ("drop_item", "off_topic", "truncate", "rude_tone")
#: The configured detection probability of each kind, before the seed's jitter (+-0.1).
SENSITIVITY = {"drop_item": 0.3, "off_topic": 0.6, "truncate": 0.5, "rude_tone": 0.75}
GAIN = 0.2
FALSE_FLAG = 0.1
REVIEWERS = 4


def configured(seed: int) -> dict[str, float]:
    """The seed's sensitivities: the base values moved by a seeded draw, so the bench does not
    measure one fixed configuration only."""
    rng = random.Random(seed)
    return {k: round(min(0.95 - GAIN, max(0.05, v + rng.uniform(-0.1, 0.1))), 3) for k, v in SENSITIVITY.items()}


def traffic_lines() -> list[bytes]:
    with gzip.open(TRAFFIC, "rb") as fh:
        return [line.rstrip(b"\r\n") for line in fh if line.strip()]


def run_seed(seed: int, share: float, lines: list[bytes], tmp: str) -> dict[str, Any]:
    """One seed: ingest, review, and the product's experiment report against the configuration."""
    import httpx
    from prometheus_client import CollectorRegistry

    from monitor.config import load_settings
    from monitor.episodes.deadletter import JsonlDeadLetterSink
    from monitor.quality import canaries as qc
    from monitor.service import build_service
    from monitor.simulate.loop import Truth, make_reviewers
    from monitor.sources.memory import MemorySource

    sens = configured(seed)
    db = Path(tmp) / f"overseers-{seed}.db"
    s = load_settings(
        None,
        [
            "dev=true",
            f"database.url=sqlite:///{db}",
            f"dead_letter.path={tmp}/dead-{seed}.jsonl",
            "drift.enabled=false",
            "sampling.human.rate=1.0",
            "sampling.rm.rate=0.0",
            f"review.canaries.share={share}",
            f"review.canaries.seed={seed}",
            f"review.canaries.kinds={json.dumps(list(KINDS))}",
            "review.assist.enabled=true",
            f"review.assist.seed={seed}",
            'review.assist.conditions={"none": [], "hints": ["drift_signals"]}',
            f"simulate.sensitivity={json.dumps(sens)}",
            f"simulate.assist_gain={GAIN}",
            f"simulate.false_flag_rate={FALSE_FLAG}",
            f"simulate.reviewers={REVIEWERS}",
            f"simulate.seed={seed}",
            "simulate.noise=0",
        ],
    )
    t0 = time.perf_counter()
    with build_service(
        s,
        source=MemorySource(lines),
        serve=False,
        dead_letters=JsonlDeadLetterSink(s.dead_letter.path, 1000),
        registry=CollectorRegistry(),
    ) as svc:
        svc.run()
        # The truth of the ingested records only: a canary's id is free in the store, and a record
        # of the file that was never ingested may hold it (the reviewer would take it for that one).
        subset = Path(tmp) / f"traffic-{seed}.jsonl"
        subset.write_bytes(b"\n".join(lines) + b"\n")
        truth = Truth.load(str(subset), s.simulate.answer_key, s.source.max_episode_bytes, s.source.max_future_s)
        url = svc.serve_review(0, metrics_listener=False).url
        with httpx.Client(base_url=url.rstrip("/"), timeout=30.0) as client:
            reviewers = make_reviewers(s, svc.store, client)
            while any(r.step(math.inf, truth) for r in reviewers):
                pass
        report = qc.experiment_report(svc.store, "assist", ["none", "hints"])
        people = qc.reviewer_quality(svc.store, level=0.5)
    rows = {(r["condition"], r["kind"]): r for r in report["rows"]}
    cells = []
    for kind in KINDS:
        for cond, want in (("none", sens[kind]), ("hints", min(1.0, sens[kind] + GAIN))):
            d = rows[(cond, kind)]["detection"]
            cells.append(_cell("detection", cond, kind, want, d.get("rate"), d.get("ci"), d["n"]))
        diff = rows[("hints", kind)]["detection_diff"]
        cells.append(_cell("gain", "hints-none", kind, GAIN, diff.get("diff"), diff.get("ci"), None))
    for person in people:
        ff = person["false_flag"]
        cells.append(_cell("false_flag", person["reviewer"], "-", FALSE_FLAG, ff.get("rate"), ff.get("ci"), ff["n"]))
    return {"seed": seed, "configured": sens, "cells": cells, "seconds": round(time.perf_counter() - t0, 1)}


def _cell(what: str, group: str, kind: str, want: float, got: float | None, ci: Any, n: int | None) -> dict[str, Any]:
    covered = ci is not None and ci[0] <= want <= ci[1]
    return {
        "what": what,
        "group": group,
        "kind": kind,
        "configured": want,
        "estimate": got,
        "ci": ci,
        "n": n,
        "covered": covered,
    }


def summarise(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """Coverage of the 95% intervals and the mean absolute error, per measure."""
    out: dict[str, Any] = {}
    for what in ("detection", "gain", "false_flag"):
        cells = [c for r in seeds for c in r["cells"] if c["what"] == what and c["ci"] is not None]
        if not cells:
            continue
        errs = [abs(c["estimate"] - c["configured"]) for c in cells if c["estimate"] is not None]
        widths = [c["ci"][1] - c["ci"][0] for c in cells]
        out[what] = {
            "cells": len(cells),
            "coverage": round(sum(c["covered"] for c in cells) / len(cells), 3),
            "mean_abs_error": round(sum(errs) / len(errs), 3) if errs else None,
            "mean_ci_width": round(sum(widths) / len(widths), 3),
        }
    return out


def print_tables(seeds: list[dict[str, Any]], summary: dict[str, Any], rm: dict[str, Any] | None) -> None:
    first = seeds[0]
    print(f"\nSeed {first['seed']}: estimated (95% interval, n) against configured")
    print(f"{'measure':<11}{'group':<12}{'kind':<12}{'configured':>11}{'estimate':>10}  interval          n  covered")
    for c in first["cells"]:
        lo, hi = c["ci"] if c["ci"] is not None else (math.nan, math.nan)
        est = "-" if c["estimate"] is None else f"{c['estimate']:.3f}"
        n = "" if c["n"] is None else str(c["n"])
        print(
            f"{c['what']:<11}{str(c['group'])[:11]:<12}{c['kind']:<12}{c['configured']:>11.3f}{est:>10}"
            f"  [{lo:.3f}, {hi:.3f}]{n:>5}  {'yes' if c['covered'] else 'NO'}"
        )
    print(f"\nOver {len(seeds)} seeds: coverage of the 95% intervals (nominal 0.95)")
    for what, v in summary.items():
        print(
            f"  {what:<11} {v['cells']:>4} cells  coverage {v['coverage']:.3f}  mean |error| {v['mean_abs_error']}"
            f"  mean interval width {v['mean_ci_width']}"
        )
    if rm is not None:
        print(f"\nReward model ({rm['model']}): sensitivity per kind on the gate's probe set")
        for kind, r in rm["per_kind"].items():
            if r["n"]:
                print(
                    f"  {kind:<24} {r['detected']:>3}/{r['n']:<3} {r['rate']:.2f}"
                    f"  [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
                )
        print(f"  blind spots (upper bound below 0.5): {', '.join(rm['blind_spots']) or 'none'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=8, help="repetitions (seed 1..N)")
    ap.add_argument("--episodes", type=int, default=1200, help="records of the bundled traffic per seed")
    ap.add_argument("--share", type=float, default=0.5, help="canary share of each reviewer's items (at most 0.5)")
    ap.add_argument("--rm-items", type=int, default=40, help="probe pairs per kind for the reward model")
    ap.add_argument("--no-rm", action="store_true", help="skip the reward model's sensitivity")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    args = ap.parse_args()
    lines = traffic_lines()[: args.episodes]
    seeds = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(1, args.seeds + 1):
            res = run_seed(seed, args.share, lines, tmp)
            seeds.append(res)
            if not args.json:
                done = sum(c["covered"] for c in res["cells"])
                print(f"seed {seed}: {done}/{len(res['cells'])} intervals cover, {res['seconds']} s", flush=True)
    rm = None
    if not args.no_rm:
        from bench.perturb import rm_sensitivity

        rm = rm_sensitivity(argparse.Namespace(rm=None, train_rm="hh_rlhf", seed=0, rm_items=args.rm_items))
    summary = summarise(seeds)
    if not args.json:
        print_tables(seeds, summary, rm)
    print(json.dumps({"bench": "overseers", "summary": summary, "seeds": seeds, "rm": rm}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
