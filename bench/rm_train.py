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
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

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
    args = ap.parse_args()

    import torch

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
    return 0


if __name__ == "__main__":
    sys.exit(main())
