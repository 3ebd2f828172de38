"""Encoder throughput and accuracy: ONNX Runtime int8 and fp32, and PyTorch bf16, against PyTorch eager
fp32, same texts, same run.

    python bench/encoder.py [--texts N] [--repeat R] [--threads T]

Two workloads, at the product's token limits and batch sizes:

* drift: ``Embedder.embed_episodes`` (drift.embedding: the pair encoding, max_length 128, batch 32);
* reward: ``RewardModel.score`` (max_length 128, reward.batch_size 32; head included, the head is
  PyTorch on every backend).

``torch-bf16`` is the encoder in bf16 weights (``monitor/inference/bf16.py``): fast only on a CPU
with native bf16 (the JSON's ``native_bf16``), and measured only there: elsewhere PyTorch emulates
bf16, 3x slower than fp32 on an AVX-512 CPU and about 90x (its matrix products) on an AVX2 one,
where that column alone ran past 15 minutes. Even there it may be slower than fp32, so ``precision:
auto`` chooses it only where a bf16 product is timed faster (the JSON's ``precision_auto``).

And an episode sampled for both, at the default backends on CPU (the reward model PyTorch, in bf16
where ``auto`` chooses it; the drift encoder PyTorch bf16 there too, else ONNX int8): episodes/s
with two passes (score, then embed) and with one (the score's pass hands out the drift embedding,
``monitor/inference/shared.py``), and how close the shared vectors are to the drift encoder's own.

And the drift encoder as the service runs it, beside ingest: on a worker thread (ONNX Runtime held to
every core but one, ``inference.threads``' default; PyTorch on its own pool, as the service leaves it)
while the main thread runs a pure-Python loop, the ingest loop's stand-in (it parses a record with
``json.loads`` again and again, holding the interpreter lock as ingest's per-record work does).
PyTorch eager takes the lock between operators, ONNX Runtime and the TorchScript traces
(``monitor/inference/traced.py``) release it for a whole run: the worker's texts/s per backend there,
and the share of its rate alone that the stand-in keeps. The reward model's scorer the same way, with
one more column, ``torch traced``: the fp32 trace that ``reward.backend: torch`` (the default) scores
with on a CPU where bf16 is not faster.

And a ceiling: one batch encoded by PyTorch eager against the same batch's weight matrix products
alone, timed on this CPU in PyTorch fp32 (bf16 where native) and ONNX Runtime int8, interleaved.
Everything else an encoder does is left out of the products' time, so their ratio bounds the speed-up
of any recipe on those kernels.

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
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from monitor.config import InferenceConfig  # noqa: E402

DATA = REPO / "tests" / "data" / "alpaca_eval"
BACKENDS = ("torch", "torch-bf16", "onnx-fp32", "onnx-int8")


def backends() -> tuple[str, ...]:
    """The backends measured on this CPU: ``torch-bf16`` only where it has native bf16."""
    from monitor.inference.bf16 import native_bf16

    return BACKENDS if native_bf16() else tuple(b for b in BACKENDS if b != "torch-bf16")


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

    every = {
        "torch": Embedder(backend="torch", precision="fp32"),
        "torch-bf16": Embedder(backend="torch", precision="bf16"),
        "onnx-fp32": Embedder(backend="onnx", quantisation="fp32"),
        "onnx-int8": Embedder(backend="onnx", quantisation="int8"),
    }
    emb = {name: every[name] for name in backends()}  # lazy: the ones left out never load
    out: dict[str, Any] = {"load_s": {}}
    vecs = {}
    for name, e in emb.items():
        t0 = time.perf_counter()
        vecs[name] = e.embed_episodes(prompts, responses)  # first call: load (export on a miss), a warm pass
        out["load_s"][name] = round(time.perf_counter() - t0, 1)
    runs: dict[str, Callable[[], Any]] = {k: partial(e.embed_episodes, prompts, responses) for k, e in emb.items()}
    out["texts_per_s"] = interleaved(runs, len(prompts), repeat)
    for name in backends()[1:]:
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
    for name in backends():
        use(model, name)
        scores[name] = np.array(model.score(prompts, responses, batch_size=32))  # also the warm-up
        out[f"{name}_accuracy"] = evaluate(model, held_out)["pairwise_accuracy"]
    # Interleaved: switch backends between timed runs (a switch reloads the cached session).
    times: dict[str, list[float]] = {k: [] for k in backends()}
    for _ in range(repeat):
        for name in backends():
            use(model, name)
            times[name].append(len(prompts) / _timed(lambda: model.score(prompts, responses, batch_size=32)))
    out["texts_per_s"] = {k: round(statistics.median(v), 1) for k, v in times.items()}
    for name in backends()[1:]:
        out[f"{name}_score_corr"] = round(float(np.corrcoef(scores["torch"], scores[name])[0, 1]), 5)
    out["beside_ingest"] = reward_beside_ingest_bench(model, prompts, responses, repeat)
    out["both_channels"] = shared_bench(model, prompts, responses, repeat)
    return out


def shared_bench(model: Any, prompts: list[str], responses: list[str], repeat: int) -> dict[str, Any]:
    """An episode sampled for drift and rm, at the default backends: two passes against one."""
    import numpy as np

    from monitor.config import EmbeddingDriftConfig
    from monitor.signals.embeddings import embedder_for

    drift = embedder_for(EmbeddingDriftConfig())  # drift.embedding's defaults: backend and precision auto
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
        "rm_precision": "fp32" if model.runner is None else model.runner.precision,  # None: CUDA, as loaded
        "drift_backend": "onnx int8" if drift.resolved == "onnx" else f"torch {drift.resolved_precision}",
        "episodes_per_s": interleaved(runs, len(prompts), repeat),
        "cosine_to_own_min": round(float(np.min(cos)), 4),
        "cosine_to_own_mean": round(float(np.mean(cos)), 5),
    }


def beside_ingest_bench(prompts: list[str], responses: list[str], repeat: int) -> dict[str, Any]:
    """The drift encoder on a worker thread while the main thread runs the ingest loop's stand-in
    (see the module's docstring): the worker's texts/s and the stand-in's kept share, medians."""
    from monitor.signals.embeddings import Embedder

    threads = InferenceConfig().worker_threads()  # the embedding worker's, as `oversight run` runs it
    every = {
        "torch": lambda: Embedder(backend="torch", precision="fp32"),
        "torch-bf16": lambda: Embedder(backend="torch", precision="bf16"),
        "onnx-fp32": lambda: Embedder(backend="onnx", quantisation="fp32", threads=threads),
        "onnx-int8": lambda: Embedder(backend="onnx", quantisation="int8", threads=threads),
    }
    emb = {name: every[name]() for name in backends()}
    for e in emb.values():
        e.embed_episodes(prompts[:32], responses[:32])  # load (the cache is warm) and warm
    runs = {name: partial(e.embed_episodes, prompts, responses) for name, e in emb.items()}
    return {"onnx_threads": threads, **beside_busy_thread(runs, prompts, responses, repeat)}


def reward_beside_ingest_bench(model: Any, prompts: list[str], responses: list[str], repeat: int) -> dict[str, Any]:
    """The reward model scoring on a worker thread beside the stand-in, as the service's scorer does:
    PyTorch eager (the model's own encoder), the traced fp32 copy that ``reward.backend: torch`` runs
    on a CPU without fast bf16, the traced bf16 one, and ONNX Runtime on the service's worker threads
    (``inference.worker_threads()``, no spinning), and, for int8, on every core as before."""
    threads = InferenceConfig().worker_threads()
    names = ("torch", "torch-traced", *backends()[1:], "onnx-int8-every-core")
    models = {name: model.clone() for name in names}
    for name, m in models.items():
        if name == "torch-traced":
            m.use_backend("torch", precision="fp32")
        elif name == "onnx-int8-every-core":
            m.use_backend("onnx", "int8")
        elif name.startswith("onnx"):
            m.use_backend("onnx", "int8" if name.endswith("int8") else "fp32", threads=threads)
        else:
            use(m, name)
        m.score(prompts[:32], responses[:32], batch_size=32)  # load and warm
    runs = {name: partial(m.score, prompts, responses, 32) for name, m in models.items()}
    return {"onnx_threads": threads, **beside_busy_thread(runs, prompts, responses, repeat)}


def beside_busy_thread(
    runs: Mapping[str, Callable[[], Any]], prompts: list[str], responses: list[str], repeat: int
) -> dict[str, Any]:
    """Each of ``runs`` (encoding ``prompts``) on a worker thread while this thread runs the ingest
    loop's stand-in, interleaved ``repeat`` times: the worker's texts/s and the share of its rate
    alone that the stand-in keeps, medians."""
    import threading

    record = json.dumps({"prompt": prompts[0], "response": responses[0], "metadata": {"k": 1}})

    def spin(stop: threading.Event) -> float:
        """The stand-in's records per second until ``stop``."""
        n, t0 = 0, time.perf_counter()
        while not stop.is_set():
            json.loads(record)
            n += 1
        return n / (time.perf_counter() - t0)

    alone_stop = threading.Event()
    timer = threading.Timer(2.0, alone_stop.set)
    timer.start()
    alone = spin(alone_stop)
    rates: dict[str, list[float]] = {k: [] for k in runs}
    kept: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeat):
        for name, fn in runs.items():
            stop, took = threading.Event(), list[float]()

            def work(fn: Callable[[], Any] = fn, stop: threading.Event = stop, took: list[float] = took) -> None:
                took.append(_timed(fn))
                stop.set()

            worker = threading.Thread(target=work)
            worker.start()
            kept[name].append(spin(stop) / alone)
            worker.join()
            rates[name].append(len(prompts) / took[0])
    return {
        "texts_per_s": {k: round(statistics.median(v), 1) for k, v in rates.items()},
        "ingest_stand_in_kept": {k: round(statistics.median(v), 3) for k, v in kept.items()},
    }


def print_beside(title: str, part: Mapping[str, Any]) -> None:
    """One line of a ``beside_ingest`` measurement: each backend's texts/s, its gain over PyTorch
    eager and the share of its rate the stand-in kept; ``title`` takes the ONNX Runtime threads."""
    beside = part["beside_ingest"]
    tps, kept = beside["texts_per_s"], beside["ingest_stand_in_kept"]
    rates = ", ".join(
        f"{b.replace('-', ' ')} {tps[b]} ({tps[b] / tps['torch']:.2f}x; ingest keeps {kept[b]:.0%})" for b in tps
    )
    print(f"{title.format(beside['onnx_threads'])}: texts/s {rates}")


def use(model: Any, name: str) -> None:
    backend, _, kind = name.partition("-")
    if backend == "torch":
        # The baseline is PyTorch eager, the model's own encoder; torch-bf16 is the service's traced copy.
        model.use_backend("torch", precision="bf16" if kind == "bf16" else "fp32", eager=kind != "bf16")
    else:
        model.use_backend("onnx", "int8" if kind == "int8" else "fp32")


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def ceiling_bench(prompts: list[str], responses: list[str], repeat: int) -> dict[str, Any]:
    """The most any recipe on this CPU's matrix kernels could gain over PyTorch eager.

    One batch, the drift encoder's first (its 32 longest episodes, the pair encoding, padded), is
    encoded by PyTorch eager fp32 (``Embedder``, tokenizing included), and each weight matrix
    product of its layers (the shapes from the bundled model's config) is timed alone with that
    batch's token rows: PyTorch fp32 and bf16 (``torch.mm``; bf16 only on a CPU with native bf16) and
    ONNX Runtime's uint8 x int8 ``MatMulInteger``, the kernel the int8 recipe runs. Interleaved
    ``repeat`` times, medians. Attention's own products, the norms, GELU, the activations'
    quantisation and the tokenizer are left out of the products' time, so ``x_torch_eager`` (PyTorch
    eager's batch time over the products') is an upper bound on the speed-up of any encoder that
    runs those kernels."""
    import numpy as np
    import torch
    from transformers import AutoConfig

    from monitor.inference.bf16 import native_bf16
    from monitor.signals.embeddings import Embedder, model_dir

    cfg = AutoConfig.from_pretrained(model_dir(), local_files_only=True)
    eager = Embedder(backend="torch", precision="fp32")
    first = sorted(range(len(prompts)), key=lambda i: -(len(prompts[i]) + len(responses[i])))[: eager.batch_size]
    batch = ([prompts[i] for i in first], [responses[i] for i in first])
    rows = batch_rows(eager, *batch)
    threads = torch.get_num_threads()
    # q, k, v, the attention output, the feed-forward input and output projections
    shapes = [(cfg.hidden_size, cfg.hidden_size)] * 4 + [
        (cfg.hidden_size, cfg.intermediate_size),
        (cfg.intermediate_size, cfg.hidden_size),
    ]
    rng = np.random.default_rng(0)
    # bf16 only where native: emulated elsewhere (about 90x slower on an AVX2 host), it bounds
    # nothing and takes minutes.
    kinds = ("torch-fp32", "torch-bf16", "ort-int8") if native_bf16() else ("torch-fp32", "ort-int8")
    products: dict[str, list[Callable[[], Any]]] = {k: [] for k in kinds}
    for inner, cols in shapes:
        a, b = torch.randn(rows, inner), torch.randn(inner, cols)
        products["torch-fp32"].append(partial(torch.mm, a, b))
        if "torch-bf16" in products:
            products["torch-bf16"].append(partial(torch.mm, a.bfloat16(), b.bfloat16()))
        session = int8_matmul(rng.integers(-127, 128, size=(inner, cols), dtype=np.int8), threads)
        x = rng.integers(0, 256, size=(rows, inner), dtype=np.uint8)
        products["ort-int8"].append(partial(session.run, None, {"x": x}))
    eager.embed_episodes(*batch)  # load and warm
    times: dict[str, list[float]] = {k: [] for k in ("torch-eager", *products)}
    for _ in range(repeat):
        # Each kind runs its products once untimed first: the two runtimes' thread pools share the
        # cores, and the one that ran last may still be spinning (interleaved cold, the int8
        # products measured as slow as PyTorch's fp32 ones here).
        for kind, calls in products.items():
            for fn in calls:
                fn()
            times[kind].append(cfg.num_hidden_layers * sum(_timed(fn) for fn in calls))
        for fn in products["torch-fp32"]:
            fn()
        times["torch-eager"].append(_timed(partial(eager.embed_episodes, *batch)))
    seconds = {k: statistics.median(v) for k, v in times.items()}
    return {
        "batch": len(first),
        "token_rows": rows,
        "threads": threads,
        "seconds_per_batch": {k: round(v, 4) for k, v in seconds.items()},
        "x_torch_eager": {k: round(seconds["torch-eager"] / v, 2) for k, v in seconds.items() if k != "torch-eager"},
    }


def batch_rows(e: Any, prompts: list[str], responses: list[str]) -> int:
    """Token rows one batch costs the Embedder ``e``, padding included (its pair encoding, its limits)."""
    from transformers import AutoTokenizer

    from monitor.inference.pairs import encode_pairs, pad_pairs

    tok = AutoTokenizer.from_pretrained(e.path, local_files_only=True)  # type: ignore[no-untyped-call, unused-ignore]
    encs = encode_pairs(tok, prompts, responses, max_length=e.max_length, max_prompt_tokens=e.max_prompt_tokens)
    ids, _, _ = pad_pairs(encs)
    return int(ids.shape[0] * ids.shape[1])


def int8_matmul(w: Any, threads: int) -> Any:
    """An ONNX Runtime session computing ``MatMulInteger(x, w)``: ``x`` uint8 ``[rows, inner]``
    (an input, so the product runs at each call), ``w`` the int8 weights."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    inner, cols = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["x", "w"], ["y"])],
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, ["rows", inner])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, ["rows", cols])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # PyTorch's turn comes next
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()

    import torch

    from monitor.inference.bf16 import native_bf16, resolve_precision

    if args.threads:
        torch.set_num_threads(args.threads)
    data = rows(args.texts)
    prompts = [r["instruction"] for r in data]
    responses = [r["output"] for r in data]
    with tempfile.TemporaryDirectory() as cache:
        os.environ["ENCODER_CACHE_DIR"] = cache
        drift = drift_bench(prompts, responses, args.repeat)
        drift["beside_ingest"] = beside_ingest_bench(prompts, responses, args.repeat)
        reward = reward_bench(prompts, responses, args.repeat)
    ceiling = ceiling_bench(prompts, responses, 3 * args.repeat)
    result = {
        "bench": "encoder",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "native_bf16": native_bf16(),
        "precision_auto": resolve_precision("auto", "cpu"),
        "texts": len(data),
        "drift": drift,
        "reward": reward,
        "ceiling": ceiling,
    }
    for name, part in (("drift (max_length 128, batch 32)", drift), ("reward (max_length 128, batch 32)", reward)):
        tps = part["texts_per_s"]
        rest = ", ".join(f"{b.replace('-', ' ')} {tps[b]} ({tps[b] / tps['torch']:.2f}x)" for b in backends()[1:])
        print(f"{name}: texts/s torch {tps['torch']}, {rest}")
    print_beside("drift beside a busy ingest thread (a worker thread; ONNX Runtime on {} thread(s))", drift)
    print_beside(
        "reward beside a busy ingest thread (the scorer on a worker thread; ONNX Runtime on {} thread(s)"
        " but where it says every core)",
        reward,
    )
    both = reward["both_channels"]
    eps = both["episodes_per_s"]
    print(
        f"sampled for drift and rm (rm torch {both['rm_precision']}, drift {both['drift_backend']}): episodes/s "
        f"two passes {eps['two_passes']}, "
        f"one pass {eps['one_pass']} ({eps['one_pass'] / eps['two_passes']:.2f}x); shared vectors' cosine to the "
        f"drift encoder's own: min {both['cosine_to_own_min']}, mean {both['cosine_to_own_mean']}"
    )
    sec, x = ceiling["seconds_per_batch"], ceiling["x_torch_eager"]
    print(
        f"ceiling (one batch: {ceiling['batch']} episodes, {ceiling['token_rows']} token rows): PyTorch eager "
        f"{sec['torch-eager']} s; its weight products alone "
        + ", ".join(f"{k.replace('-', ' ')} {sec[k]} s" for k in x)
        + "; so an encoder on these kernels runs at most "
        + ", ".join(f"{x[k]}x PyTorch eager ({k.replace('-', ' ')})" for k in x)
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
