"""Reward-model scoring throughput: the pipeline's scorer against the model's raw batched pass.

    python bench/rm_score.py [--texts N] [--batch-size B] [--repeat R]

Both score the same real AlpacaEval (prompt, response) pairs with the same model (the default
architecture, untrained head: weights do not change the cost) in the same run:

* raw: ``RewardModel.score`` on the whole list (tokenisation, batched encoder forward, head);
* scorer: the pipeline path: episodes observed by ``RewardScorer`` as the pipeline sees them,
  then one ``checkpoint()`` per pipeline batch (score, score rows, histogram, drift feed).

Prints texts/s for each and the ratio scorer/raw (goal: 0.9 or more), and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.shared_data import shared_data  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32, help="model batch size (reward.batch_size)")
    ap.add_argument("--pipeline-batch", type=int, default=128, help="episodes per pipeline batch")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--skip-kinds", action="store_true", help="skip the per-kind section (bench/rm_score_kinds.py)")
    args = ap.parse_args()

    import torch

    from monitor.config import load_settings
    from monitor.episodes import Episode
    from monitor.metrics import Metrics
    from monitor.reward.data import load_alpaca_eval
    from monitor.reward.model import RewardModel
    from monitor.reward.registry import Registry
    from monitor.reward.scorer import RewardScorer
    from monitor.store import Store
    from sampling import Decision

    rows = [r for rs in load_alpaca_eval(shared_data("alpaca_eval")).values() for r in rs][: args.texts]
    prompts = [r["instruction"] for r in rows]
    responses = [r["output"] for r in rows]
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(
            None,
            ["dev=true", "database.url=sqlite://", f"reward.models_dir={tmp}", f"reward.batch_size={args.batch_size}"],
        )
        store = Store(settings.database.url)
        registry = Registry.for_settings(store, settings)
        model = RewardModel.create()
        registry.promote(registry.register(model, data_window={}, metrics={}))
        scorer = RewardScorer(settings.reward, registry, Metrics(), feed=lambda *a: None)
        scorer._maybe_swap(force=True)
        eps = [
            Episode(
                episode_id=f"e{i}",
                stream="chat",
                model="m",
                timestamp=float(i),
                prompt=p,
                response=r,
                metadata={},
                size=len(p) + len(r),
            )
            for i, (p, r) in enumerate(zip(prompts, responses, strict=True))
        ]
        decision = Decision({"rm": 1.0}, {"rm": 1.0}, 0.0, 0.0)
        model.score(prompts[:32], responses[:32], batch_size=args.batch_size)  # warm-up
        raw_t, sc_t = [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            model.score(prompts, responses, batch_size=args.batch_size)
            raw_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for start in range(0, len(eps), args.pipeline_batch):
                for i, ep in enumerate(eps[start : start + args.pipeline_batch]):
                    scorer.observe(ep, decision, start + i)
                scorer.checkpoint()
                scorer.take_rows()
            sc_t.append(time.perf_counter() - t0)
    raw, sc = len(eps) / min(raw_t), len(eps) / min(sc_t)
    out: dict[str, Any] = {
        "bench": "rm_score",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "texts": len(eps),
        "raw_texts_per_s": round(raw, 1),
        "scorer_texts_per_s": round(sc, 1),
        "ratio": round(sc / raw, 3),
    }
    print(f"raw batched forward: {raw:.1f} texts/s; pipeline scorer: {sc:.1f} texts/s; ratio {sc / raw:.3f}")
    if not args.skip_kinds:
        # A section per reward-model kind (hf, and judge/http against the tests' stand-in servers).
        from bench.rm_score_kinds import kinds_section

        print("per kind:")
        out["kinds"] = kinds_section(prompts, responses)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
