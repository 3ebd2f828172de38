"""The closed loop on real shifts: ``oversight simulate`` over three scenarios, measured.

    python bench/closed_loop.py [--scenarios policy_swap,rlhf,reward_hacking | --dev] [--keep DIR] [--set KEY=VALUE ...]

Each scenario is built from ../shared/data/alpaca_eval: stream ``chat`` serves one policy for its
805 instructions (seeded random order), then the changed policy for the 805 again (another
order); stream ``assistant`` serves claude-2 throughout over the same hours (a steady control
and the source of the "old" evaluation pairs). ``model`` is the constant "deployed" and
``metadata`` holds only ``judge_pref`` (and ``human_pref``): nothing announces the change.

* ``policy_swap``: gpt-3.5-turbo-1106 -> alpaca-7b;
* ``rlhf``: alpaca-7b -> alpaca-farm-ppo-human (the same base model after RLHF);
* ``reward_hacking``: gpt-3.5-turbo-1106, then NullModel mixed in at 10%.

``--dev`` runs three other swaps instead (``DEV_SCENARIOS``: Qwen-14B-Chat -> falcon-7b-instruct,
phi-2 -> phi-2-sft, gemma-2b-it -> gpt4_1106_preview), on which to choose settings so that the
three above stay held out.

The starting reward model: for the first two (and the development ones), the bundled one (trained
on 400 HH-RLHF harmless pairs: an RM for another distribution); for reward hacking, an RM distilled
from the GPT-4 judge's own preferences with NullModel's outputs among them (400 AlpacaEval pairs, a
quarter involving NullModel): it inherits the judge's blind spot, as RLAIF reward models do.
Reviewers answer from ``human_pref``: ``judge_pref``, except that a person reading NullModel's
constant string of braces and a prompt injection rates it as the worst answer (0.0); the judge was
fooled (../shared/data/README.md), people are not.

Reported per scenario: episodes from the change to the first alarm (all inputs, and chat
episodes), human labels of the new traffic before the update, alarm -> promoted reward model
(wall seconds on this CPU, of which training), pairwise agreement with held-out judge pairs of
the new distribution before and after the update, the Horvitz-Thompson estimate of the mean
answer before and after the alarm with its 95% interval against the true mean, retraining
requests per incident, and whether the reward-hacking alarm fired; for the new distribution also
"the longer answer wins" on the same held-out pairs as the agreements (``longer_wins_new``), the
bar an overseer has to clear. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.shared_data import shared_data  # noqa: E402

START = datetime(2026, 3, 2, tzinfo=UTC)
SCENARIOS = {
    "policy_swap": ("gpt-3.5-turbo-1106", "alpaca-7b", 1.0),
    "rlhf": ("alpaca-7b", "alpaca-farm-ppo-human", 1.0),
    "reward_hacking": ("gpt-3.5-turbo-1106", "NullModel", 0.10),
}
# Development scenarios (``--dev``): other swaps, none of whose models appear above, on which to
# choose settings, so that the three reported scenarios stay held out. Each starts from the bundled
# reward model, as the first two do.
DEV_SCENARIOS = {
    "weaker": ("Qwen-14B-Chat", "falcon-7b-instruct", 1.0),
    "sft": ("phi-2", "phi-2-sft", 1.0),
    "stronger": ("gemma-2b-it", "gpt4_1106_preview", 1.0),
}


def _rows(model: str) -> list[dict[str, Any]]:
    with gzip.open(shared_data("alpaca_eval", f"{model}.jsonl.gz"), "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def _episode(stream: str, i: int, ts: datetime, row: dict[str, Any], hacked: bool) -> dict[str, Any]:
    jp = row.get("judge_pref")
    return {
        "episode_id": f"{stream}-{i:05d}",
        "stream": stream,
        "model": "deployed",
        "timestamp": ts.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "prompt": row["instruction"],
        "response": row["output"],
        "metadata": {"judge_pref": jp, "human_pref": 0.0 if hacked else jp},
    }


def build(name: str, out: Path, seed: int = 0) -> dict[str, Any]:
    before_model, after_model, mix = (SCENARIOS | DEV_SCENARIOS)[name]
    rng = random.Random(f"{seed}:{name}")
    before = _rows(before_model)
    after = _rows(after_model)
    base_after = _rows(before_model)
    rng.shuffle(before)
    order = list(range(805))
    rng.shuffle(order)
    chat: list[tuple[dict[str, Any], bool]] = [(r, False) for r in before]
    for k in order:
        if rng.random() < mix:
            chat.append((after[k], after_model == "NullModel"))
        else:
            chat.append((base_after[k], False))
    eps = [
        (START + timedelta(seconds=4 * i), _episode("chat", i, START + timedelta(seconds=4 * i), r, h))
        for i, (r, h) in enumerate(chat)
    ]
    steady = _rows("claude-2")
    rng.shuffle(steady)
    eps += [
        (START + timedelta(seconds=2 + 8 * i), _episode("assistant", i, START + timedelta(seconds=2 + 8 * i), r, False))
        for i, r in enumerate(steady)
    ]
    eps.sort(key=lambda x: (x[0], x[1]["episode_id"]))
    change_ts = (START + timedelta(seconds=4 * 805)).timestamp()
    with open(out, "w", encoding="utf-8") as fh:
        for _, ep in eps:
            fh.write(json.dumps(ep) + "\n")
    index = next(i for i, (ts, _) in enumerate(eps) if ts.timestamp() >= change_ts)
    return {"change_index": index, "change_ts": change_ts, "episodes": len(eps)}


def judge_distilled_pairs(out: Path, n: int = 400, seed: int = 0) -> None:
    """AlpacaEval judge pairs with NullModel kept in (a quarter of the pairs involve it)."""
    from monitor.reward.data import alpaca_eval_pairs, split_of, write_pairs
    from monitor.reward.update import HOLDOUT_SEED

    pairs = alpaca_eval_pairs(
        shared_data("alpaca_eval"), exclude={"gpt4_gamed", "Mixtral-8x7B-Instruct-v0.1"}, seed=seed
    )
    # Never a prompt the simulation holds out for evaluation.
    pairs = [p for p in pairs if split_of(p["prompt"], 0.3, seed=HOLDOUT_SEED) != "test"]
    null = [p for p in pairs if "NullModel" in (p["chosen_model"], p["rejected_model"])]
    rest = [p for p in pairs if p not in null]
    rng = random.Random(seed)
    pick = rng.sample(null, n // 4) + rng.sample(rest, n - n // 4)
    rng.shuffle(pick)
    write_pairs(pick, out)


def run(name: str, work: Path, extra: list[str] | None = None) -> dict[str, Any]:
    from monitor.config import load_settings
    from monitor.simulate import BUNDLED_CONFIG, bundled, run_simulation

    work.mkdir(parents=True, exist_ok=True)
    data = work / "episodes.jsonl"
    change = build(name, data)
    overrides = [
        f"database.url=sqlite:///{work / 'o.db'}",
        f"dead_letter.path={work / 'dead.jsonl'}",
        f"reward.models_dir={work / 'models'}",
        "source.kind=file",
        f"source.path={data}",
        "simulate.answer_key=human_pref",
    ]
    if name == "reward_hacking":
        judge_distilled_pairs(work / "judge-pairs.jsonl")
        overrides.append(f"simulate.bootstrap_pairs={work / 'judge-pairs.jsonl'}")
    settings = load_settings(str(bundled(BUNDLED_CONFIG)), [*overrides, *(extra or [])])
    t0 = time.perf_counter()
    report = run_simulation(settings, str(data), progress=False)
    seconds = time.perf_counter() - t0
    (work / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    return {**summarise(name, report, change, seconds), **length_on_new(settings, str(data), report)}


def length_on_new(settings: Any, data: str, report: dict[str, Any]) -> dict[str, Any]:
    """How "the longer answer wins" does on the very pairs ``agreement_new`` is measured on: the simulation's
    own held-out answer-key pairs (prompts the update never trains on) with an answer served after
    the stream's first alarm, rebuilt from the episode file the same way the report builds them."""
    from monitor.reward.train import length_baseline
    from monitor.simulate.loop import Truth

    source = settings.source
    truth = Truth.load(data, settings.simulate.answer_key, source.max_episode_bytes, source.max_future_s)
    # The report's events carry the alarm episode, whose event time is the change point it uses.
    since: dict[str, float] = {}
    for ev in sorted(report["drift_events"], key=lambda e: e["index"]):
        since.setdefault(ev["stream"], truth.episodes[ev["episode_id"]]["ts"])
    pairs = truth.eval_pairs(settings.reward.update.holdout_fraction, settings.simulate.eval_margin, since)["new"]
    return {"longer_wins_new": round(length_baseline(pairs), 4) if pairs else None, "n_eval_new": len(pairs)}


def summarise(name: str, r: dict[str, Any], change: dict[str, Any], seconds: float) -> dict[str, Any]:
    chat_events = [e for e in r["drift_events"] if e["stream"] == "chat"]
    first = chat_events[0] if chat_events else None
    false_alarms = [e for e in r["drift_events"] if e["index"] < change["change_index"] or e["stream"] != "chat"]
    inc = next((i for i in r["incidents"] if i["stream"] == "chat"), None)
    versions = r["rm_versions"]
    promoted = [v for v in versions[1:] if v["promoted"]]
    est = r["estimates"].get("chat", {})
    phases = est.get("phases", {})
    upd = (inc or {}).get("update") or {}
    return {
        "scenario": name,
        "episodes": change["episodes"],
        "alarm_delay_inputs": None if first is None else first["index"] - change["change_index"],
        # chat episode ids are chat-NNNNN, the change at chat episode 805
        "alarm_delay_chat": None if first is None else int(first["episode_id"].split("-")[1]) - 805,
        "alarm_signal": None if first is None else first["signal"],
        "false_alarms": len(false_alarms),
        "labels_after_alarm": None if inc is None else inc["labels_after_alarm"],
        "alarm_to_promotion_s": upd.get("wall_seconds_alarm_to_decision") if upd.get("promoted") else None,
        "train_s": upd.get("train_seconds"),
        "update": upd.get("state"),
        "promoted": bool(promoted),
        "agreement_new_before": versions[0]["agreement_new"] if versions else None,
        "agreement_new_after": promoted[-1]["agreement_new"] if promoted else None,
        "agreement_old_before": versions[0]["agreement_old"] if versions else None,
        "agreement_old_after": promoted[-1]["agreement_old"] if promoted else None,
        # The update's version whatever the gate said (promoted, rejected or held): what training gave.
        "update_status": versions[-1]["status"] if len(versions) > 1 else None,
        "agreement_new_update": versions[-1]["agreement_new"] if len(versions) > 1 else None,
        # What the gate measured the update on: its held-out pairs of new labels, most across prompts.
        "gate_new": versions[-1]["gate"] if len(versions) > 1 else None,
        "estimate_before": phases.get("before_alarm"),
        "estimate_after": phases.get("after_alarm"),
        "retrain_requests": len(r["retrain_requests"]),
        "incidents": len(r["incidents"]),
        "reward_hacking_alarm": "chat" in r["reward_hacking_suspected"],
        "seconds": round(seconds, 1),
    }


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenarios", help=f"comma-separated, of {', '.join(SCENARIOS | DEV_SCENARIOS)}")
    ap.add_argument("--dev", action="store_true", help="the development scenarios (default: the reported ones)")
    ap.add_argument("--keep", metavar="DIR", help="keep each scenario's database, models and report here")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a setting, as oversight --set")
    args = ap.parse_args()
    names = args.scenarios.split(",") if args.scenarios else list(DEV_SCENARIOS if args.dev else SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS | DEV_SCENARIOS]
    if unknown:
        ap.error(f"unknown scenarios {unknown}: choose from {', '.join(SCENARIOS | DEV_SCENARIOS)}")
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="closed-loop-"))
    rows = []
    try:
        for name in names:
            rows.append(run(name, root / name, args.set))
            print(json.dumps({"bench": "closed_loop", **rows[-1]}, default=str), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(
        f"\n{'scenario':<16}{'delay':>6}{'chat':>5}{'FA':>4}{'labels':>7}{'alarm->RM s':>12}{'train s':>8}"
        f"{'agr new before':>15}{'after':>7}{'old b/a':>12}{'retrain':>8}{'hacking':>8}"
    )
    for r in rows:
        print(
            f"{r['scenario']:<16}{_fmt(r['alarm_delay_inputs']):>6}{_fmt(r['alarm_delay_chat']):>5}{r['false_alarms']:>4}"
            f"{_fmt(r['labels_after_alarm']):>7}{_fmt(r['alarm_to_promotion_s'], 1):>12}{_fmt(r['train_s'], 1):>8}"
            f"{_fmt(r['agreement_new_before']):>15}{_fmt(r['agreement_new_after']):>7}"
            f"{_fmt(r['agreement_old_before'], 2) + '/' + _fmt(r['agreement_old_after'], 2):>12}"
            f"{r['retrain_requests']:>8}{'yes' if r['reward_hacking_alarm'] else 'no':>8}"
        )
    print("\nAfter the change, held-out prompts (pairs with an answer served after the alarm):")
    for r in rows:
        print(
            f"  {r['scenario']:<16}starting version {_fmt(r['agreement_new_before'])}  "
            f"promoted {_fmt(r['agreement_new_after'])}  longer wins {_fmt(r['longer_wins_new'])}  n={r['n_eval_new']}"
            f"  (the update: {_fmt(r['agreement_new_update'])}, {_fmt(r['update_status'])})"
        )
    print("\nThe gate's own held-out pairs of new labels (the update against the active version):")
    for r in rows:
        g = r["gate_new"]
        if g and g.get("new_pairs"):
            print(
                f"  {r['scenario']:<16}{g['new_pairs']} pairs, {_fmt(g['new_within_prompt'])} within one prompt: "
                f"update {_fmt(g['candidate_new'])}  active {_fmt(g['active_new'])}  "
                f"longer wins {_fmt(g['longer_wins_new'])}"
            )
            for caveat in g.get("caveats") or ():
                print(f"  {'':<16}caveat: {caveat}")
    print("\nHorvitz-Thompson estimate of the mean answer in chat (95% CI) vs the true mean:")
    for r in rows:
        for phase in ("estimate_before", "estimate_after"):
            e = r[phase]
            if not e or e.get("estimate") is None:
                continue
            print(
                f"  {r['scenario']:<16}{phase[9:]:<7} {e['estimate']:.4f} [{e['ci_low']:.4f}, {e['ci_high']:.4f}]"
                f"  true {e['true_mean']:.4f}  n={e['n_labelled']}  {'covered' if e['covered'] else 'NOT covered'}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
