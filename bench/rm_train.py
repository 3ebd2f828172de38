"""Reward-model training benchmark: train with the defaults on each corpus, report time and held-out accuracy.

For each corpus (AlpacaEval judge pairs, HH-RLHF harmless pairs) the pairs are split by prompt group
(20% of instructions / first dialogue turns held out, seed 0; no prompt on both sides). The model
trains on the train side with the default ``TrainConfig`` (its own validation split for early
stopping comes out of the train side), then the held-out side is scored by:

* the trained model,
* the untrained model (same encoder, freshly initialised head),
* "the longer response wins" (characters).

Also reported: accuracy on the held-out pairs where the longer response lost (what length alone
gets wrong). Prints a table and one JSON line per corpus (``{"bench": "rm_train", ...}``).

    python bench/rm_train.py [--corpus alpaca_eval|hh_rlhf|both] [--train-pairs N] [--set KEY=VALUE ...]

``--heldout-models`` measures the built-in default on policies it never saw: the AlpacaEval models
are dealt into ``--folds`` folds (``data.model_folds``; ``--split dev`` uses the four development
models ``data.DEV_MODELS`` instead, the only models defaults were tuned on). Per fold, the model
trains on pairs of two *other* models on train-side instructions and is tested on every judge pair
of a held-out instruction with a fold model in it (``data.heldout_model_split``). Reported per
held-out model and overall against "longer wins" on the same pairs, plus HH-RLHF harmless (its
own prompt split), training seconds and scoring throughput (texts/s through ``RewardModel.score``),
for the current defaults and for ``--baseline-set`` (default: the previous release's settings).
One JSON line per fold and configuration (``{"bench": "rm_train_heldout_models", ...}``).

    python bench/rm_train.py --heldout-models [--split folds|dev] [--folds 3] [--threads N] [--no-baseline]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.shared_data import shared_data  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default="both", choices=["alpaca_eval", "hh_rlhf", "both"])
    ap.add_argument("--train-pairs", type=int, default=2500, help="at most this many training pairs per corpus")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", metavar="DIR", help="also save each trained version under DIR/<corpus>")
    kinds_arguments(ap)
    ap.add_argument("--heldout-models", action="store_true", help="evaluate on whole AlpacaEval models held out")
    ap.add_argument("--split", default="folds", choices=["folds", "dev"], help="with --heldout-models")
    ap.add_argument("--folds", type=int, default=3, help="with --heldout-models: model folds")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument(
        "--baseline-set",
        dest="baseline",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="with --heldout-models: the configuration compared against (default: the previous defaults)",
    )
    ap.add_argument("--no-baseline", action="store_true", help="with --heldout-models: skip the comparison")
    args = ap.parse_args()
    if args.kinds_only:
        kinds_section(args)
        return 0

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.heldout_models:
        return heldout_models(args)

    from monitor.reward import data
    from monitor.reward.model import RewardModel
    from monitor.reward.train import evaluate, load_train_config, model_config_of, train

    cfg = load_train_config(None, args.overrides)
    corpora = ["alpaca_eval", "hh_rlhf"] if args.corpus == "both" else [args.corpus]
    print(f"torch threads {torch.get_num_threads()}, cuda {torch.cuda.is_available()}, config {cfg.model_dump()}")
    for corpus in corpora:
        pairs = (
            data.alpaca_eval_pairs(shared_data("alpaca_eval"))
            if corpus == "alpaca_eval"
            else data.hh_rlhf_pairs(shared_data("hh_rlhf", "harmless-base-test.jsonl.gz"))
        )
        train_pairs, test_pairs = data.split_pairs(pairs, 0.2, seed=0)
        train_pairs = train_pairs[: args.train_pairs]
        t0 = time.perf_counter()
        model, metrics = train(train_pairs, cfg, progress=not args.no_progress, description=f"{corpus} bench")
        train_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        trained = evaluate(model, test_pairs)
        eval_s = time.perf_counter() - t1
        untrained = evaluate(RewardModel.create(model_config_of(cfg), seed=cfg.seed), test_pairs)
        contrary = [p for p in test_pairs if len(p["chosen"]) < len(p["rejected"])]
        contrary_acc = evaluate(model, contrary)["pairwise_accuracy"] if contrary else None
        if args.out:
            model.save(os.path.join(args.out, corpus))
        row = {
            "bench": "rm_train",
            "corpus": corpus,
            "version": model.version,
            "n_train": len(train_pairs),
            "n_test": len(test_pairs),
            "train_seconds": round(train_s, 1),
            "cache_seconds": metrics["seconds_cache"],
            "eval_seconds": round(eval_s, 1),
            "steps": metrics["steps"],
            "best_step": metrics["best_step"],
            "val_accuracy": metrics["val_accuracy"],
            "test_accuracy": trained["pairwise_accuracy"],
            "test_accuracy_untrained": untrained["pairwise_accuracy"],
            "test_length_baseline": trained["length_baseline"],
            "test_gain_over_length": round(trained["pairwise_accuracy"] - trained["length_baseline"], 4),
            "n_length_contrary": len(contrary),
            "test_accuracy_length_contrary": contrary_acc,
        }
        print(
            f"{corpus}: {len(train_pairs)} train pairs in {train_s:.0f} s (cache {metrics['seconds_cache']:.0f} s, "
            f"{metrics['steps']} steps, best {metrics['best_step']}); held-out n={len(test_pairs)}: "
            f"trained {trained['pairwise_accuracy']:.4f}, untrained {untrained['pairwise_accuracy']:.4f}, "
            f"longer-wins {trained['length_baseline']:.4f}; where the longer lost (n={len(contrary)}): {contrary_acc}"
        )
        print(json.dumps(row, sort_keys=True), flush=True)
    if not args.skip_kinds:
        kinds_section(args)
    return 0


# --- per reward-model kind: the updates of brought-in models (monitor/reward/kinds/updates.py) -----


def kinds_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--skip-kinds", action="store_true", help="skip the per-kind section (LoRA, calibration)")
    ap.add_argument("--kinds-only", action="store_true", help="only the per-kind section")
    ap.add_argument("--lora-pairs", type=int, default=256, help="hf kind: LoRA training pairs (AlpacaEval)")
    ap.add_argument("--lora-max-length", type=int, default=256, help="hf kind: tokens per item")
    ap.add_argument("--calibration-labels", type=int, default=2000, help="judge kind: labels to calibrate on")


def kinds_section(args: argparse.Namespace) -> dict[str, Any]:
    """hf: LoRA fine-tune time on N AlpacaEval pairs of the MiniLM sequence-classification model
    (its head untrained, so the held-out accuracy before/after shows what one epoch does); judge:
    isotonic calibration time on N labels, scored by the tests' STAND-IN judge server."""
    import tempfile

    import torch
    from prometheus_client import CollectorRegistry
    from transformers import AutoTokenizer, BertForSequenceClassification

    from monitor.reward import data
    from monitor.reward.kinds import Item, PairScorer
    from monitor.reward.kinds.config import HfConfig, LoraConfig
    from monitor.reward.kinds.hf import HfBackend
    from monitor.reward.kinds.lora import finetune
    from monitor.reward.kinds.resilience import BackendMetrics
    from monitor.reward.model import packaged_encoder_dir
    from monitor.reward.train import evaluate, pair_texts

    pairs = data.alpaca_eval_pairs(shared_data("alpaca_eval"))
    train_pairs, test_pairs = data.split_pairs(pairs, 0.2, seed=0)
    train_pairs, test_pairs = train_pairs[: args.lora_pairs], test_pairs[:400]
    out: dict[str, Any] = {"bench": "rm_train_kinds", "cuda": torch.cuda.is_available()}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "base"
        src = packaged_encoder_dir()
        torch.manual_seed(0)
        BertForSequenceClassification.from_pretrained(src, num_labels=1, local_files_only=True).save_pretrained(ckpt)
        AutoTokenizer.from_pretrained(src, local_files_only=True).save_pretrained(ckpt)  # type: ignore[no-untyped-call, unused-ignore]
        lora = LoraConfig(epochs=1, lr=5e-4, batch_size=8, max_pairs=args.lora_pairs)
        cfg = HfConfig(path=str(ckpt), max_length=args.lora_max_length, lora=lora)
        metrics = BackendMetrics.on(CollectorRegistry())
        before = evaluate(PairScorer(HfBackend(cfg, "base", metrics)), test_pairs)  # type: ignore[arg-type]
        t0 = time.perf_counter()
        path, m = finetune(cfg, [pair_texts(p) for p in train_pairs], Path(tmp) / "models")
        lora_s = time.perf_counter() - t0
        tuned = HfConfig(path=str(path), max_length=args.lora_max_length)
        after = evaluate(PairScorer(HfBackend(tuned, "lora", metrics)), test_pairs)  # type: ignore[arg-type]
    out["hf_lora"] = {
        "pairs": m["pairs"],
        "max_length": args.lora_max_length,
        "device": m["device"],
        "seconds": round(lora_s, 1),
        "train_seconds": m["train_seconds"],
        "pairs_per_s": round(m["pairs"] / m["train_seconds"], 2),
        "trainable_params": m["trainable_params"],
        "n_test": len(test_pairs),
        "accuracy_before": before["pairwise_accuracy"],
        "accuracy_after": after["pairwise_accuracy"],
        "length_baseline": before["length_baseline"],
    }
    print(
        f"hf LoRA: {m['pairs']} pairs x 1 epoch at {args.lora_max_length} tokens on {m['device']}: {lora_s:.1f} s "
        f"({m['train_seconds']:.1f} s training, {out['hf_lora']['pairs_per_s']} pairs/s, {m['trainable_params']} "
        f"trainable params); held-out n={len(test_pairs)}: {before['pairwise_accuracy']:.4f} -> "
        f"{after['pairwise_accuracy']:.4f} (longer wins {before['length_baseline']:.4f})"
    )
    out["judge_calibration"] = _calibration_time(args.calibration_labels, Item)
    c = out["judge_calibration"]
    print(
        f"judge calibration: {c['labels']} labels scored by the stand-in judge in {c['score_seconds']} s, "
        f"isotonic fit (PAVA) in {c['fit_ms']} ms, {c['knots']} knots"
    )
    print(json.dumps(out, sort_keys=True), flush=True)
    return out


def _calibration_time(n: int, item: Any) -> dict[str, Any]:
    import bisect

    sys.path.insert(0, str(REPO / "tests" / "reward" / "kinds"))
    from prometheus_client import CollectorRegistry
    from standin import chat_answer, serve

    from monitor.reward.data import load_alpaca_eval
    from monitor.reward.kinds.calibration import fit_isotonic
    from monitor.reward.kinds.config import JudgeConfig
    from monitor.reward.kinds.judge import JudgeBackend
    from monitor.reward.kinds.resilience import BackendMetrics

    rows = [r for rs in load_alpaca_eval(shared_data("alpaca_eval")).values() for r in rs][:n]
    prefs = sorted(float(r["judge_pref"]) for r in rows)
    ratings = [1 + min(6, int(7 * bisect.bisect_left(prefs, float(r["judge_pref"])) / len(prefs))) for r in rows]
    for server in serve(chat_answer):
        judge = JudgeBackend(
            JudgeConfig(base_url=f"{server.url}/v1", model="standin"), "j", BackendMetrics.on(CollectorRegistry())
        )
        t0 = time.perf_counter()
        scores = judge.score([item(r["instruction"], r["output"]) for r in rows])
        score_s = time.perf_counter() - t0
        judge.close()
    t1 = time.perf_counter()
    cal = fit_isotonic([float(s.value or 0.0) for s in scores], [float(x) for x in ratings])
    fit_s = time.perf_counter() - t1
    return {
        "labels": len(rows),
        "score_seconds": round(score_s, 2),
        "fit_ms": round(1000 * fit_s, 2),
        "knots": len(cal.x),
    }


# The defaults before the length anchor, as overrides of today's TrainConfig: "today's model" in the
# held-out comparison (a randomly initialised head, 64 hidden units).
PREVIOUS_DEFAULTS = ["length_anchor=0.0", "head_hidden=64"]
THROUGHPUT_TEXTS = 512


def heldout_models(args: argparse.Namespace) -> int:
    """The held-out-models evaluation (see the module docstring)."""
    import torch

    from monitor.reward import data
    from monitor.reward.train import length_baseline, load_train_config, train

    alpaca = shared_data("alpaca_eval")
    models = data.alpaca_eval_models(alpaca)
    folds = [list(data.DEV_MODELS)] if args.split == "dev" else data.model_folds(models, args.folds)
    configs = {"default": list(args.overrides)}
    if not args.no_baseline:
        configs["baseline"] = list(PREVIOUS_DEFAULTS if args.baseline is None else args.baseline)
    hh_train, hh_test = data.split_pairs(data.hh_rlhf_pairs(shared_data("hh_rlhf", "harmless-base-test.jsonl.gz")))
    hh_train = hh_train[: args.train_pairs]
    print(f"torch threads {torch.get_num_threads()}, split {args.split}, folds {folds}")
    summary: dict[str, dict[str, list[float]]] = {}
    for name, overrides in configs.items():
        cfg = load_train_config(None, overrides)
        tot = summary.setdefault(name, {"hits": [], "length": [], "train_s": [], "texts_per_s": []})
        for k, test_models in enumerate(folds):
            # Dev uses its own instruction split, so tuning never saw the folds' test instructions either.
            seed = 1000 if args.split == "dev" else k
            train_pairs, test_pairs = data.heldout_model_split(test_models, alpaca, seed=seed)
            train_pairs = train_pairs[: args.train_pairs]
            t0 = time.perf_counter()
            model, metrics = train(train_pairs, cfg, progress=not args.no_progress, description=f"fold {k}")
            train_s = time.perf_counter() - t0
            scores, texts_per_s = score_pairs(model, test_pairs)
            hits = [pair_hit(scores, p) for p in test_pairs]
            per_model = {}
            for m in test_models:
                idx = [i for i, p in enumerate(test_pairs) if m in (p["chosen_model"], p["rejected_model"])]
                sub = [test_pairs[i] for i in idx]
                per_model[m] = {
                    "n": len(idx),
                    "accuracy": round(sum(hits[i] for i in idx) / max(1, len(idx)), 4),
                    "longer_wins": round(length_baseline(sub), 4) if sub else None,
                }
            acc = sum(hits) / len(hits)
            lw = length_baseline(test_pairs)
            tot["hits"] += hits
            tot["length"] += [length_baseline([p]) for p in test_pairs]
            tot["train_s"].append(train_s)
            tot["texts_per_s"].append(texts_per_s)
            row = {
                "bench": "rm_train_heldout_models",
                "config": name,
                "overrides": overrides,
                "split": args.split,
                "fold": k,
                "test_models": test_models,
                "n_train": len(train_pairs),
                "n_test": len(test_pairs),
                "accuracy": round(acc, 4),
                "longer_wins": round(lw, 4),
                "gain_over_length": round(acc - lw, 4),
                "per_model": per_model,
                "train_seconds": round(train_s, 1),
                "best_step": metrics["best_step"],
                "texts_per_second": round(texts_per_s, 1),
                "threads": torch.get_num_threads(),
            }
            print(f"{name} fold {k}: accuracy {acc:.4f}, longer wins {lw:.4f} (n={len(test_pairs)}), {train_s:.0f} s")
            for m, r in per_model.items():
                print(f"    {m:<34} n={r['n']:<6} accuracy {r['accuracy']:.4f}  longer wins {r['longer_wins']}")
            print(json.dumps(row, sort_keys=True), flush=True)
        t0 = time.perf_counter()
        hh_model, _ = train(hh_train, cfg, progress=not args.no_progress, description="hh_rlhf")
        hh_s = time.perf_counter() - t0
        hh_scores, _ = score_pairs(hh_model, hh_test)
        hh_acc = sum(pair_hit(hh_scores, p) for p in hh_test) / len(hh_test)
        overall = sum(tot["hits"]) / len(tot["hits"])
        lw_all = sum(tot["length"]) / len(tot["length"])
        print(
            f"{name}: held-out models overall {overall:.4f} vs longer wins {lw_all:.4f} "
            f"({overall - lw_all:+.4f}, n={len(tot['hits'])}); HH-RLHF harmless {hh_acc:.4f} "
            f"(longer wins {length_baseline(hh_test):.4f}, n={len(hh_test)}, train {hh_s:.0f} s); "
            f"train s per fold {[round(x) for x in tot['train_s']]}; texts/s {[round(x) for x in tot['texts_per_s']]}"
        )
        print(
            json.dumps(
                {
                    "bench": "rm_train_heldout_models_summary",
                    "config": name,
                    "overrides": overrides,
                    "split": args.split,
                    "accuracy": round(overall, 4),
                    "longer_wins": round(lw_all, 4),
                    "gain_over_length": round(overall - lw_all, 4),
                    "n_test": len(tot["hits"]),
                    "hh_accuracy": round(hh_acc, 4),
                    "hh_longer_wins": round(length_baseline(hh_test), 4),
                    "hh_train_seconds": round(hh_s, 1),
                    "max_train_seconds": round(max(tot["train_s"]), 1),
                    "texts_per_second": round(min(tot["texts_per_s"]), 1),
                    "threads": torch.get_num_threads(),
                },
                sort_keys=True,
            ),
            flush=True,
        )
    return 0


def score_pairs(model: object, pairs: list[dict[str, object]]) -> tuple[dict[tuple[str, str], float], float]:
    """Scores of every distinct (prompt, response) in ``pairs`` and the throughput (texts/s) of
    the first ``THROUGHPUT_TEXTS`` of them (timed alone: a fixed amount of work, comparable
    across configurations)."""
    from monitor.reward.model import RewardModel
    from monitor.reward.train import pair_texts

    assert isinstance(model, RewardModel)
    texts = list(dict.fromkeys(t for p in pairs for t in pair_texts(p)))
    probe = texts[:THROUGHPUT_TEXTS]
    t0 = time.perf_counter()
    model.score([t[0] for t in probe], [t[1] for t in probe])
    texts_per_s = len(probe) / (time.perf_counter() - t0)
    scores = model.score([t[0] for t in texts], [t[1] for t in texts])
    return dict(zip(texts, scores, strict=True)), texts_per_s


def pair_hit(scores: dict[tuple[str, str], float], p: dict[str, object]) -> float:
    from monitor.reward.train import pair_texts

    chosen, rejected = pair_texts(p)
    d = scores[chosen] - scores[rejected]
    return 1.0 if d > 0 else 0.5 if d == 0 else 0.0


if __name__ == "__main__":
    sys.exit(main())
