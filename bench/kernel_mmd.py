"""The built-in kernel MMD detector (``kmmd``, numpy) against alibi-detect's (``mmd``) on the same inputs.

    python bench/kernel_mmd.py [--quick]

Both through the project's detector wrappers (as the monitor uses them), window 20, Gaussian RBF
with the median-heuristic bandwidth, one thread each (numpy's BLAS, torch): a per-core comparison,
and torch's thread pool otherwise spins badly on a busy machine. Printed:

1. construction time (reference of 500 rows x 384 dimensions), wall and CPU seconds: ``kmmd``
   for ERTs up to 10^5, ``mmd`` at ERT 2000 (4,001 bootstraps; the first includes importing
   alibi-detect and torch);
2. update time (mean over 1,000 updates of 384 dimensions);
3. realised false-alarm run length on null streams against the target ERT: synthetic Gaussian
   data (384 dimensions), a fresh reference and stream per detector, reset after each alarm;
4. detection delay on real traffic: MiniLM embeddings (``monitor/signals/embeddings.py``) of
   prompt + response, reference = 500 random ``gpt-3.5-turbo-1106`` episodes of the bundled
   demo traffic, then 100 held-out ones (false alarms), then a shifted stream: ``policy_swap``
   (``alpaca-7b`` answering the same AlpacaEval prompts: a change of style within the same
   requests, which the embeddings of one answer barely show, so this one is hard),
   ``red_team_25`` (a quarter of the episodes replaced by HH-RLHF red-team conversations from
   ``../shared/data``, as in ``bench/drift.py``)
   and ``red_team_100``. Two random splits; one detector per split, cloned for each stream.

Ends with a JSON line of all numbers. ``--quick`` shrinks every part (a smoke test). alibi's five
constructions dominate the run time (~15 s of CPU each on the 2-core development machine; the
whole bench took 6.5 minutes there with other work running).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy and torch are imported

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DIM = 384
N_REF = 500
WINDOW = 20
NAMES = ("kmmd", "mmd")


def timed(fn: Any) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def construction(name: str, erts: Sequence[float]) -> list[dict[str, Any]]:
    import numpy as np

    import detectors

    out = []
    for ert in erts:
        ref = np.random.default_rng(1).standard_normal((N_REF, DIM))
        det, wall, cpu = timed(lambda ert=ert, ref=ref: detectors.make(name, ert=ert, x_ref=ref, window_size=WINDOW))
        out.append({"detector": name, "ert": ert, "init_wall_s": round(wall, 3), "init_cpu_s": round(cpu, 3)})
        print(json.dumps(out[-1]), flush=True)
        del det
    return out


def update_time(name: str, updates: int) -> dict[str, float]:
    """Microseconds per update, wall and CPU."""
    import numpy as np

    import detectors

    rng = np.random.default_rng(2)
    det = detectors.make(name, ert=2000, x_ref=rng.standard_normal((N_REF, DIM)), window_size=WINDOW)
    xs = rng.standard_normal((updates, DIM)).astype(np.float32)

    def run() -> None:
        for x in xs:
            det.update(x)

    _, wall, cpu = timed(run)
    return {"wall_us": round(wall / updates * 1e6, 1), "cpu_us": round(cpu / updates * 1e6, 1)}


def null_run_length(name: str, ert: float, refs: int, updates: int) -> dict[str, Any]:
    """Pooled run length (updates / alarms) over ``refs`` detectors, each on its own reference."""
    import numpy as np

    import detectors

    alarms = 0
    for r in range(refs):
        rng = np.random.default_rng(100 + r)
        det = detectors.make(name, ert=ert, x_ref=rng.standard_normal((N_REF, DIM)), window_size=WINDOW)
        for x in rng.standard_normal((updates, DIM)).astype(np.float32):
            det.update(x)
            if det.drift_detected:
                alarms += 1
                det.reset()
    total = refs * updates
    res = {
        "detector": name,
        "target_ert": ert,
        "updates": total,
        "false_alarms": alarms,
        "realised_ert": round(total / alarms) if alarms else None,
    }
    print(json.dumps(res), flush=True)
    return res


def shifted_episodes(n: int) -> dict[str, list[dict[str, Any]]]:
    """The reference model's episodes and the shifted ones: another model on the same prompts
    (bundled demo traffic) and red-team conversations (HH-RLHF, ``../shared/data``, as in
    ``bench/drift.py``)."""
    from bench import drift
    from monitor.simulate.demo import bundled_traffic

    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with gzip.open(bundled_traffic(), "rb") as fh:
        for line in fh:
            try:
                r = json.loads(line)
            except ValueError:
                continue  # the demo traffic holds deliberately broken lines
            if isinstance(r, dict) and isinstance(r.get("prompt"), str) and isinstance(r.get("response"), str):
                rows.setdefault((str(r.get("stream")), str(r.get("model"))), []).append(r)
    red = drift.red_team()
    pick = random.Random(0).sample(range(len(red)), n)
    return {
        "gpt": rows[("chat", "gpt-3.5-turbo-1106")],
        "alpaca": rows[("chat", "alpaca-7b")][:n],
        "red_team": [red[i] for i in pick],
    }


def embed(episodes: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    import numpy as np

    from monitor.signals.embeddings import Embedder

    embedder = Embedder()  # the monitor's own embedding (the default pair encoding)
    return {
        key: np.asarray(
            embedder.embed_episodes([r["prompt"] for r in rs], [r["response"] for r in rs]), dtype=np.float64
        )
        for key, rs in episodes.items()
    }


def shifted_streams(emb: dict[str, Any], split: int) -> tuple[Any, Any, dict[str, Any]]:
    """Reference, 100 held-out episodes and the shifted streams of one random split (no episode
    twice: a repeated row would itself look like drift to a kernel test)."""
    import numpy as np

    rng = np.random.default_rng(split)
    gpt = emb["gpt"][rng.permutation(len(emb["gpt"]))]
    ref, held, rest = gpt[:N_REF], gpt[N_REF : N_REF + 100], gpt[N_REF + 100 :]
    red = emb["red_team"][rng.permutation(len(emb["red_team"]))]
    quarter = min(len(rest) // 3, len(red))
    mixed = np.concatenate([rest[: 3 * quarter], red[:quarter]])
    streams = {
        "policy_swap": emb["alpaca"][rng.permutation(len(emb["alpaca"]))],
        "red_team_25": mixed[rng.permutation(len(mixed))],
        "red_team_100": red,
    }
    return ref, held, streams


def delays(emb: dict[str, Any], name: str, ert: float, splits: int) -> dict[str, Any]:
    import detectors

    res: dict[str, Any] = {"detector": name, "ert": ert, "false_alarms_in_held_out": 0, "held_out_updates": 0}
    for s in range(splits):
        ref, held, streams = shifted_streams(emb, s)
        proto = detectors.make(name, ert=ert, x_ref=ref, window_size=WINDOW, seed=s)
        for target, stream in streams.items():
            det = proto.clone()
            for x in held:
                det.update(x)
                if det.drift_detected:
                    res["false_alarms_in_held_out"] += 1
                    det.reset()
            res["held_out_updates"] += len(held)
            delay = None
            for i, x in enumerate(stream, 1):
                det.update(x)
                if det.drift_detected:
                    delay = i
                    break
            res.setdefault(target, {"delays": [], "length": len(stream)})["delays"].append(delay)
    print(json.dumps(res), flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small null runs (a smoke test)")
    ap.add_argument("--no-embeddings", action="store_true", help="skip part 4 (no MiniLM)")
    args = ap.parse_args()
    report: dict[str, Any] = {}

    print("# 1. construction time (500 x 384 reference, window 20)", flush=True)
    kmmd_erts = [500, 2000, 10_000] if args.quick else [500, 2000, 10_000, 100_000]
    report["init"] = construction("kmmd", kmmd_erts) + construction("mmd", [2000])

    print("# 2. update time", flush=True)
    report["update_us"] = {name: update_time(name, 200 if args.quick else 1000) for name in NAMES}
    print(json.dumps(report["update_us"]), flush=True)

    print("# 3. realised false-alarm run length, synthetic Gaussian null streams (384 dims)", flush=True)
    refs, updates = (1, 1500) if args.quick else (2, 6000)
    report["null"] = [null_run_length(name, 500, refs, updates) for name in NAMES]

    if not args.no_embeddings:
        print("# 4. detection delay on MiniLM embeddings (ERT 2000)", flush=True)
        emb, wall, _ = timed(lambda: embed(shifted_episodes(60 if args.quick else 300)))
        print(f"(embedded {sum(len(v) for v in emb.values())} texts in {wall:.0f} s)", flush=True)
        report["delay"] = [delays(emb, name, 2000, 1 if args.quick else 2) for name in NAMES]

    print("\nsummary")
    for row in report["init"]:
        print(
            f"  init {row['detector']:<5} ERT {row['ert']:>7}:"
            f" {row['init_wall_s']:>6} s wall, {row['init_cpu_s']:>6} s CPU"
        )
    for name, us in report["update_us"].items():
        print(f"  update {name:<5}: {us['wall_us']} us wall, {us['cpu_us']} us CPU")
    for row in report["null"]:
        print(
            f"  null {row['detector']:<5}: target ERT {row['target_ert']}, realised {row['realised_ert']}"
            f" ({row['false_alarms']} alarms in {row['updates']} updates)"
        )
    for row in report.get("delay", []):
        parts = []
        for target in ("policy_swap", "red_team_25", "red_team_100"):
            found = row[target]["delays"]
            parts.append(f"{target} {found} of {row[target]['length']}")
        print(
            f"  delay {row['detector']:<5}: {'; '.join(parts)}; false alarms {row['false_alarms_in_held_out']}"
            f" in {row['held_out_updates']} held-out updates"
        )
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
