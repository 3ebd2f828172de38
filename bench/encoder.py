"""Encoder throughput and accuracy: ONNX Runtime int8 and fp32, and PyTorch bf16, against PyTorch eager
fp32, same texts, same run.

    python bench/encoder.py [--texts N] [--repeat R] [--threads T]

Two workloads, at the product's token limits and batch sizes:

* drift: ``Embedder.embed_episodes`` (drift.embedding: the pair encoding, max_length 128, batch 32);
* reward: ``RewardModel.score`` (max_length 128, reward.batch_size 32; head included, the head is
  PyTorch on every backend).

``torch-bf16`` is the encoder in bf16 weights (``monitor/inference/bf16.py``): fast only on a CPU
with native bf16 (the JSON's ``native_bf16``), where ``precision: auto`` chooses it.

And an episode sampled for both, at the default backends on CPU (the reward model PyTorch, in bf16
where the CPU has native bf16; the drift encoder ONNX int8): episodes/s with two passes (score, then
embed) and with one (the score's pass hands out the drift embedding, ``monitor/inference/shared.py``),
and how close the shared vectors are to the drift encoder's own.

The backends run interleaved (torch, torch-bf16, onnx-fp32, onnx-int8, then again) ``--repeat``
times and the median texts/s is printed, so a neighbour loading the CPU hurts all of them alike. Accuracy on the same
texts: the minimum and mean cosine of the embeddings to PyTorch's; for the reward model the score
correlation and held-out pairwise accuracy of a head trained here on the bundled AlpacaEval pairs.
The ONNX models are exported into a fresh cache folder; the first load's time (export, quantise,
session) is printed too. Texts are the real ones bundled with the tests (tests/data).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATA = REPO / "tests" / "data" / "alpaca_eval"
BACKENDS = ("torch", "torch-bf16", "onnx-fp32", "onnx-int8")


def rows(n: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for f in sorted(DATA.glob("*.jsonl.gz")):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            out += [json.loads(line) for line in fh]
    return out[:n]


def interleaved(runs: dict[str, Callable[[], Any]], n: int, repeat: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeat):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(n / (time.perf_counter() - t0))
    return {k: round(statistics.median(v), 1) for k, v in times.items()}


def drift_bench(prompts: list[str], responses: list[str], repeat: int) -> dict[str, Any]:
    import numpy as np

    from monitor.signals.embeddings import Embedder

    emb: dict[str, Embedder] = {
        "torch": Embedder(backend="torch", precision="fp32"),
        "torch-bf16": Embedder(backend="torch", precision="bf16"),
        "onnx-fp32": Embedder(backend="onnx", quantisation="fp32"),
        "onnx-int8": Embedder(backend="onnx", quantisation="int8"),
    }
    out: dict[str, Any] = {"load_s": {}}
    vecs = {}
    for name, e in emb.items():
        t0 = time.perf_counter()
        vecs[name] = e.embed_episodes(prompts, responses)  # first call: load (export on a miss), a warm pass
        out["load_s"][name] = round(time.perf_counter() - t0, 1)
    runs: dict[str, Callable[[], Any]] = {k: partial(e.embed_episodes, prompts, responses) for k, e in emb.items()}
    out["texts_per_s"] = interleaved(runs, len(prompts), repeat)
    for name in BACKENDS[1:]:
        cos = (vecs[name] * vecs["torch"]).sum(1)
        out[f"{name}_cosine_min"] = round(float(np.min(cos)), 4)
        out[f"{name}_cosine_mean"] = round(float(np.mean(cos)), 5)
    return out


def reward_bench(prompts: list[str], responses: list[str], repeat: int) -> dict[str, Any]:
    import numpy as np

    from monitor.reward.data import alpaca_eval_pairs, split_of
    from monitor.reward.train import TrainConfig, evaluate, train

    pairs = alpaca_eval_pairs(DATA, pairs_per_instruction=2)
    model, _ = train(
        [p for p in pairs if split_of(p["group"]) == "train"][:400],
        TrainConfig(finetune_layers=0, epochs=3, seed=0, val_fraction=0.0),
        progress=False,
    )
    held_out = [p for p in pairs if split_of(p["group"]) == "test"][:300]
    out: dict[str, Any] = {"held_out_pairs": len(held_out)}
    scores = {}
    for name in BACKENDS:
        use(model, name)
        scores[name] = np.array(model.score(prompts, responses, batch_size=32))  # also the warm-up
        out[f"{name}_accuracy"] = evaluate(model, held_out)["pairwise_accuracy"]
    # Interleaved: switch backends between timed runs (a switch reloads the cached session).
    times: dict[str, list[float]] = {k: [] for k in BACKENDS}
    for _ in range(repeat):
        for name in BACKENDS:
            use(model, name)
            times[name].append(len(prompts) / _timed(lambda: model.score(prompts, responses, batch_size=32)))
    out["texts_per_s"] = {k: round(statistics.median(v), 1) for k, v in times.items()}
    for name in BACKENDS[1:]:
        out[f"{name}_score_corr"] = round(float(np.corrcoef(scores["torch"], scores[name])[0, 1]), 5)
    out["both_channels"] = shared_bench(model, prompts, responses, repeat)
    return out


def shared_bench(model: Any, prompts: list[str], responses: list[str], repeat: int) -> dict[str, Any]:
    """An episode sampled for drift and rm, at the default backends: two passes against one."""
    import numpy as np

    from monitor.signals.embeddings import Embedder

    drift = Embedder(backend="onnx", quantisation="int8")
    spec = drift.drift_pass()
    slot = None if spec is None else model.drift_slot(spec)
    assert slot is not None, "the default reward model and drift embedding share a pass"
    model.use_backend("torch", precision="auto")  # reward.backend's and reward.precision's defaults
    own = drift.embed_episodes(prompts, responses)
    _, shared = model.score_and_embed(prompts, responses, 32, slot)
    runs: dict[str, Callable[[], Any]] = {
        "two_passes": lambda: (model.score(prompts, responses, 32), drift.embed_episodes(prompts, responses)),
        "one_pass": lambda: model.score_and_embed(prompts, responses, 32, slot),
    }
    cos = (own * shared).sum(1)
    return {
        "rm_precision": "bf16" if model.runner is not None else "fp32",
        "episodes_per_s": interleaved(runs, len(prompts), repeat),
        "cosine_to_own_min": round(float(np.min(cos)), 4),
        "cosine_to_own_mean": round(float(np.mean(cos)), 5),
    }


def use(model: Any, name: str) -> None:
    backend, _, kind = name.partition("-")
    if backend == "torch":
        model.use_backend("torch", precision="bf16" if kind == "bf16" else "fp32")
    else:
        model.use_backend("onnx", "int8" if kind == "int8" else "fp32")


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()

    import torch

    from monitor.inference.bf16 import native_bf16

    if args.threads:
        torch.set_num_threads(args.threads)
    data = rows(args.texts)
    prompts = [r["instruction"] for r in data]
    responses = [r["output"] for r in data]
    with tempfile.TemporaryDirectory() as cache:
        os.environ["ENCODER_CACHE_DIR"] = cache
        drift = drift_bench(prompts, responses, args.repeat)
        reward = reward_bench(prompts, responses, args.repeat)
    result = {
        "bench": "encoder",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "native_bf16": native_bf16(),
        "texts": len(data),
        "drift": drift,
        "reward": reward,
    }
    for name, part in (("drift (max_length 128, batch 32)", drift), ("reward (max_length 128, batch 32)", reward)):
        tps = part["texts_per_s"]
        rest = ", ".join(f"{b.replace('-', ' ')} {tps[b]} ({tps[b] / tps['torch']:.2f}x)" for b in BACKENDS[1:])
        print(f"{name}: texts/s torch {tps['torch']}, {rest}")
    both = reward["both_channels"]
    eps = both["episodes_per_s"]
    print(
        f"sampled for drift and rm (rm torch {both['rm_precision']}, drift onnx int8): episodes/s two passes "
        f"{eps['two_passes']}, "
        f"one pass {eps['one_pass']} ({eps['one_pass'] / eps['two_passes']:.2f}x); shared vectors' cosine to the "
        f"drift encoder's own: min {both['cosine_to_own_min']}, mean {both['cosine_to_own_mean']}"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
