"""How the CUSUM allowance ``k`` trades detection delay on the drift scenarios (several seeds).

    python bench/cusum_allowance.py [--seeds 0,1,2,3] [--k 0.3,0.5]

A fast stand-in for ``bench/drift.py`` that isolates one choice: the text signals that real
shifts move (response and prompt length, line count, distinct-token ratio) are computed for the
same scenarios, put on normal scores against the first 500 episodes, and run through one
two-sided CUSUM each with the monitor's calibration (the default per-stream ERT split over the
default detectors). Reported per seed and k: the first alarm after each change (the earliest
signal), the mean over the six shifts these signals can see (reward hacking is found by
``mixed_script``, a binary signal, in the monitor), and alarms before the changes.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SIGNALS = ("response_log_chars", "prompt_log_chars", "response_log_lines", "distinct_token_ratio")
REFERENCE = 500


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--k", default="0.3,0.5")
    args = ap.parse_args()

    from bench import drift as scenarios_of
    from detectors.cusum import CUSUM, CUSUMDetector
    from monitor.config import DriftConfig
    from monitor.drift import detector_ert
    from monitor.signals import text_stats
    from monitor.signals.normalise import NormalScores

    cfg = DriftConfig()
    ert = detector_ert(cfg)
    ks = [float(k) for k in args.k.split(",")]
    thresholds = {k: CUSUMDetector(ert=ert, x_ref=None, k=k).param_value for k in ks}
    table: list[dict[str, Any]] = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for name, (rows, change) in scenarios_of.scenarios(random.Random(seed)).items():
            if name == "reward_hacking_10":
                continue
            stats = [text_stats(r["prompt"], r["response"]) for r in rows]
            cut = change if change is not None else len(rows)
            for k in ks:
                first, false_alarms = None, 0
                for signal in SIGNALS:
                    values = [s[signal] for s in stats]
                    t = NormalScores.fit(values[:REFERENCE], cfg.tail_clip)
                    det = CUSUM(thresholds[k], k=k)
                    for i in range(REFERENCE, len(values)):
                        det.update(t(values[i]))
                        if det.drift_detected:
                            if i < cut:
                                false_alarms += 1  # the CUSUM restarts on its next update
                                continue
                            first = i - cut if first is None else min(first, i - cut)
                            break
                table.append({"seed": seed, "scenario": name, "k": k, "delay": first, "false_alarms": false_alarms})
    for k in ks:
        for seed in sorted({r["seed"] for r in table}):
            rows_k = [r for r in table if r["k"] == k and r["seed"] == seed]
            shifts = [r for r in rows_k if r["scenario"] != "control"]
            delays = [r["delay"] if r["delay"] is not None else 1500 for r in shifts]
            line = {
                "bench": "cusum_allowance",
                "k": k,
                "threshold": round(thresholds[k], 2),
                "seed": seed,
                "delays": {r["scenario"]: r["delay"] for r in shifts},
                "mean_delay": round(statistics.fmean(delays), 1),
                "missed": sum(r["delay"] is None for r in shifts),
                "false_alarms": sum(r["false_alarms"] for r in rows_k),
            }
            print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
