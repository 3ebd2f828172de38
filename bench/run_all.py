"""``make bench``: every benchmark, one after the other (they print numbers; nothing asserts)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = [
    ["replay.py"],
    ["replay.py", "--drift", "--episodes", "10000", "--repeat", "1"],
    # ~2 minutes: microseconds per record by area (cProfile), and the built drift monitor per episode
    ["hot_path.py", "--configs", "core,signals", "--drift-steady"],
    # ~30 s past the core run: the stream state the service path's checkpoints write from an empty database
    ["hot_path.py", "--configs", "core", "--state-writes"],
    # ~2 minutes: the same on a warm database (detectors built: what a running service pays per record)
    ["hot_path.py", "--configs", "core,signals", "--steady"],
    ["drift.py"],
    # ~2 minutes each: the same shifts drawn with other seeds (the monitor alone): the spread of the delays and alarms
    *(["drift.py", "--no-baselines", "--seed", str(seed)] for seed in (1, 2, 3)),
    ["cusum_allowance.py"],  # ~1 minute: delay against the CUSUM allowance, four seeds
    ["drift_ert.py"],  # ~2 minutes: false alarms of the default detectors on 3 x 1,000,000 stationary episodes
    ["drift_volume.py"],  # 14-day event-time streams at 5-60 episodes/s: the time-budgeted detector
    ["kafka_ingest.py"],
    # ~5 minutes: a service that has been running (detectors built, stationary traffic)
    ["kafka_ingest.py", "--steady", "--configs", "default,no-inference,core", "--rounds", "2"],
    ["kafka_ingest.py", "--pure-python-crc", "--episodes", "20000"],
    ["run_rss.py"],  # ~5 minutes: `oversight run` on a 100,000-episode topic, its memory while ingesting
    ["review_api.py"],
    ["ingest_http.py"],  # SDK, raw HTTP, OTLP and a raw producer against `oversight ingest serve`
    ["rm_score.py"],
    # ~4 minutes: the built-in reward model trained on each corpus, and the per-kind section (LoRA, calibration)
    ["rm_train.py", "--corpus", "both"],
    # ~12 minutes: the built-in default on AlpacaEval models held out (3 folds), HH-RLHF, training time
    ["rm_train.py", "--heldout-models", "--no-baseline", "--no-progress"],
    # ~13 minutes: the same models dealt into 4 folds (the margin over "longer wins" depends on the dealing)
    ["rm_train.py", "--heldout-models", "--folds", "4", "--no-baseline", "--no-progress"],
    # ~7 minutes: ONNX Runtime int8/fp32 against PyTorch eager, drift and reward encoders, the drift encoder
    # beside a busy ingest thread, the ceiling
    ["encoder.py"],
    ["perturb.py", "--train-rm", "hh_rlhf"],  # ~2 minutes: perturbation kinds, the default model's sensitivity
    ["overseers.py"],  # ~10 minutes: canary measurement of simulated reviewers over 8 seeds, RM sensitivity
    ["retention.py"],  # ~15 s: the retention purge of 200,000 stored episodes on SQLite
    ["estimate.py"],  # ~25 s: `oversight estimate` over 100,000 sampled rows on SQLite
    # ~2 minutes each: claims, the item page, the queue depth and the gauges at 2,000,000 waiting, 200,000 labels
    ["review_scale.py", "--db", "sqlite"],
    ["review_scale.py", "--db", "postgres"],
    ["adjudication.py"],  # ~40 s: items sent to adjudication, their errors before and after, the cost
    ["closed_loop.py"],  # ~7 minutes: the closed loop on three real shifts
    ["install_size.py"],  # ~2 minutes: a fresh virtualenv with `pip install .` (no extras): size, time, BSL check
]


def main() -> int:
    failed = []
    for name, *args in BENCHES:
        print(f"== {name} {' '.join(args)}", flush=True)
        if subprocess.run([sys.executable, str(HERE / name), *args], check=False).returncode != 0:
            failed.append(name)
    if failed:
        print("failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
