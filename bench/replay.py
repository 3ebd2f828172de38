"""Replay throughput of the embedded path (file -> validate -> sample -> SQLite), episodes/s.

    python bench/replay.py [--episodes N] [--db URL]

Input: the bundled real traffic, repeated with fresh episode ids up to N episodes.
Prints one line per run and a JSON summary line.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from monitor.config import load_settings
from monitor.service.replay import replay_file
from monitor.simulate.demo import bundled_traffic


def make_input(path: Path, n: int, tag: str = "r", seed: int | None = None) -> int:
    """``n`` episodes of the bundled traffic, repeated with fresh ids (``<id>-<tag><i>``); their size.
    In the file's order (its shifts included), or with ``seed`` drawn at random from all of it: a
    stationary mixture."""
    base = []
    with gzip.open(bundled_traffic(), "rb") as fh:
        for line in fh:
            try:
                obj = json.loads(line)
            except ValueError:
                continue  # the bundled file holds a few malformed records on purpose
            if isinstance(obj, dict) and isinstance(obj.get("episode_id"), str) and "response" in obj:
                base.append(obj)
    size = 0
    rng = random.Random(seed)
    with open(path, "wb") as out:
        for i in range(n):
            ep = dict(base[i % len(base)] if seed is None else rng.choice(base))
            ep["episode_id"] = f"{ep['episode_id']}-{tag}{i // len(base) if seed is None else i}"
            line = json.dumps(ep).encode() + b"\n"
            size += len(line)
            out.write(line)
    return size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--episodes", type=int, default=50_000)
    ap.add_argument("--db", default=None, help="database URL (default: a fresh SQLite file)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument(
        "--drift",
        action="store_true",
        help="with drift detection (text statistics on every episode, embeddings on the drift channel); "
        "default: the streaming core only (validate, sample, store)",
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "in.jsonl"
        size = make_input(data, args.episodes)
        rates = []
        for r in range(args.repeat):
            db = args.db or f"sqlite:///{tmp}/db{r}.sqlite"
            settings = load_settings(
                None,
                [
                    "dev=true",
                    "source.kind=file",
                    f"source.path={data}",
                    f"database.url={db}",
                    f"dead_letter.path={tmp}/dlq.jsonl",
                    f"drift.enabled={'true' if args.drift else 'false'}",
                ],
            )
            t0 = time.perf_counter()
            report = replay_file(settings, str(data), name=f"bench-{r}-{os.getpid()}")
            dt = time.perf_counter() - t0
            rates.append(report["episodes"] / dt)
            print(
                f"replay run {r}: {report['episodes']} episodes ({size / 1e6:.1f} MB) in {dt:.2f}s"
                f" = {rates[-1]:,.0f} episodes/s ({report['sampled']})"
            )
        print(
            json.dumps(
                {
                    "bench": "replay",
                    "drift": args.drift,
                    "episodes": args.episodes,
                    "db": "sqlite" if args.db is None else args.db.split(":")[0],
                    "episodes_per_s_best": round(max(rates)),
                    "episodes_per_s_runs": [round(x) for x in rates],
                }
            )
        )


if __name__ == "__main__":
    main()
