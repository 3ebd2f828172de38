"""Perturbations on the bundled real texts: how often each kind applies, how much it changes, examples,
and (optionally) a reward model's sensitivity per kind.

    python bench/perturb.py [--seed 0] [--examples 2] [--json]
    python bench/perturb.py --rm DIR [--rm-items 40]         # sensitivity of a saved reward model
    python bench/perturb.py --train-rm hh_rlhf [--rm-items 40] # train one first (bundled HH pairs, ~1-2 min CPU)

The reward model's sensitivity is measured on the gate's probe set (``monitor.reward.sensitivity``,
bundled texts, ``--seed``, ``--rm-items`` pairs per kind), per kind with its Wilson interval, and
the kinds it cannot see (upper bound below 0.5) are named.

Texts: every valid episode of ``monitor/data/demo-traffic.jsonl.gz`` (AlpacaEval answers) and both
answers of each pair of ``monitor/data/hh-harmless-400.jsonl.gz`` (HH-RLHF). Per kind: the share of
texts it applies to (per corpus), the mean characters changed (removed + inserted), the time per
text, and short examples of the change. Also: how many demo answers have a stronger known answer to
the same prompt (the "better" variants). Prints a table and one JSON line ``{"bench": "perturb"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_texts() -> list[tuple[str, str, str, str]]:
    """(corpus, id, prompt, response) of every bundled text."""
    from monitor.data import bundled_records
    from monitor.perturb.better import DEMO_TRAFFIC, HH_PAIRS

    out: list[tuple[str, str, str, str]] = []
    for r in bundled_records(DEMO_TRAFFIC):
        if isinstance(r.get("prompt"), str) and isinstance(r.get("response"), str):
            out.append(("alpaca_eval", str(r.get("episode_id")), r["prompt"], r["response"]))
    for i, r in enumerate(bundled_records(HH_PAIRS)):
        for side in ("chosen", "rejected"):
            if isinstance(r.get(side), str):
                out.append(("hh_rlhf", f"hh-{i}-{side}", r["prompt"], r[side]))
    return out


def snippet(item: Any, width: int = 60) -> str:
    """The change in context: ``...before [old -> new] after...`` on one line."""
    from monitor.perturb.base import common_affixes

    a, b = item.original, item.perturbed
    p, s = common_affixes(a, b)

    def short(t: str) -> str:
        t = t.replace("\n", "\\n")
        return t if len(t) <= width else t[: width // 2] + " ... " + t[-width // 2 :]

    return (
        f"...{short(a[max(0, p - 30) : p])}[{short(a[p : len(a) - s])} -> {short(b[p : len(b) - s])}]"
        f"{short(a[len(a) - s : len(a) - s + 30])}..."
    )


def run_kinds(texts: list[tuple[str, str, str, str]], seed: int, examples: int) -> tuple[dict[str, Any], list[Any]]:
    from monitor.perturb import NAMES, make, make_seed_key

    report: dict[str, Any] = {}
    items: list[Any] = []
    corpora = sorted({c for c, *_ in texts})
    for kind in NAMES:
        pert = make(kind)
        applied: dict[str, int] = dict.fromkeys(corpora, 0)
        totals: dict[str, int] = dict.fromkeys(corpora, 0)
        changed = 0
        shown: list[str] = []
        t0 = time.perf_counter()
        for corpus, eid, prompt, response in texts:
            totals[corpus] += 1
            item = pert.apply(prompt, response, make_seed_key(eid, seed))
            if item is None:
                continue
            applied[corpus] += 1
            changed += item.chars_changed
            items.append(item)
            # Examples from different texts across the corpus: every 97th applicable text.
            if len(shown) < examples and (sum(applied.values()) - 1) % 97 == 0:
                shown.append(snippet(item))
        elapsed = time.perf_counter() - t0
        n_applied = sum(applied.values())
        report[kind] = {
            "applicable": {c: round(applied[c] / totals[c], 4) for c in corpora},
            "applied": n_applied,
            "mean_chars_changed": round(changed / n_applied, 1) if n_applied else None,
            "us_per_text": round(1e6 * elapsed / len(texts), 1),
            "examples": shown,
        }
    return report, items


def better_counts(texts: list[tuple[str, str, str, str]]) -> dict[str, int]:
    from monitor.perturb import better_variant, bundled_known_answers

    known = bundled_known_answers()
    quality = {(k, a.response): a.quality for k, answers in known.items() for a in answers}
    counts = {"texts": 0, "stronger_known": 0}
    for _, _, prompt, response in texts:
        counts["texts"] += 1
        q = quality.get((prompt, response))
        if q is not None and better_variant(prompt, response, known.get(prompt, []), quality=q) is not None:
            counts["stronger_known"] += 1
    return counts


def rm_sensitivity(args: argparse.Namespace) -> dict[str, Any]:
    from monitor.reward import sensitivity as rs
    from monitor.reward.model import RewardModel

    t0 = time.perf_counter()
    if args.rm:
        model = RewardModel.load(args.rm)
        origin = args.rm
    else:
        from monitor.reward import data
        from monitor.reward.train import load_train_config, train

        pairs = data.read_pairs(str(REPO / "monitor" / "data" / "hh-harmless-400.jsonl.gz"))
        if args.train_rm == "alpaca_eval":
            pairs = data.split_pairs(data.alpaca_eval_pairs(), 0.2, seed=0)[0]
        model, _ = train(pairs, load_train_config(None, []), progress=False, description="bench perturb")
        origin = f"trained on {args.train_rm} ({len(pairs)} pairs)"
    load_s = time.perf_counter() - t0
    # The probe set the gate and `oversight rm sensitivity` use (monitor/reward/sensitivity.py), on
    # the bundled texts: the same pairs, so these numbers are the ones a gate would record.
    chosen = rs.probe_set(None, seed=args.seed, per_kind=args.rm_items)
    t1 = time.perf_counter()
    rows = rs.table(rs.measure(model, chosen).per_kind)
    return {
        "model": origin,
        "load_or_train_s": round(load_s, 1),
        "score_s": round(time.perf_counter() - t1, 1),
        "per_kind": rows,
        "blind_spots": rs.blind_spots(rows),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--examples", type=int, default=2)
    ap.add_argument("--rm", metavar="DIR", help="a saved reward-model version: measure its sensitivity per kind")
    ap.add_argument("--train-rm", choices=["hh_rlhf", "alpaca_eval"], help="train a reward model first, then measure")
    ap.add_argument("--rm-items", type=int, default=40, help="perturbed items per kind scored by the reward model")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    args = ap.parse_args()

    texts = load_texts()
    report, _ = run_kinds(texts, args.seed, args.examples)
    out: dict[str, Any] = {"bench": "perturb", "seed": args.seed, "texts": len(texts), "kinds": report}
    out["better"] = better_counts(texts)
    if args.rm or args.train_rm:
        out["rm_sensitivity"] = rm_sensitivity(args)
    if not args.json:
        print(f"{len(texts)} texts, seed {args.seed}")
        print(f"{'kind':24} {'alpaca_eval':>11} {'hh_rlhf':>8} {'chars':>7} {'us/text':>8}")
        for kind, r in report.items():
            a = r["applicable"]
            print(
                f"{kind:24} {a.get('alpaca_eval', 0):>11.1%} {a.get('hh_rlhf', 0):>8.1%}"
                f" {r['mean_chars_changed'] or 0:>7.1f} {r['us_per_text']:>8.1f}"
            )
        for kind, r in report.items():
            for ex in r["examples"]:
                print(f"  {kind}: {ex}")
        b = out["better"]
        print(f"stronger known answer to the same prompt: {b['stronger_known']} of {b['texts']} texts")
        if "rm_sensitivity" in out:
            rs = out["rm_sensitivity"]
            print(f"reward model ({rs['model']}; {rs['load_or_train_s']} s to get, {rs['score_s']} s to score):")
            for kind, s in rs["per_kind"].items():
                if not s["n"]:
                    print(f"  {kind:24}   0/0   (no probe pairs)")
                    continue
                ci = f"[{s['ci_low']:.2f}, {s['ci_high']:.2f}]"
                print(f"  {kind:24} {s['detected']:>3}/{s['n']:<3} {s['rate']:.2f} {ci}")
            print(f"  cannot see (95% upper bound below 0.5): {', '.join(rs['blind_spots']) or 'none'}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
