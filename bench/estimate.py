"""`oversight estimate` on a long window: seconds and memory a sampled row.

    python bench/estimate.py [--rows 100000] [--db URL]

Fills a fresh database (SQLite in a temporary folder by default, or ``--db``, which must be empty)
with ``--rows`` episodes of one stream sampled for the rm channel (1.4 KB answers, a metadata score
and flag), then times :func:`monitor.quality.estimates.estimate_stream` per quantity, and measures
its peak of Python memory (tracemalloc, in a second, untimed call): it reads the quantity and the
probability only, a chunk at a time, so the peak does not grow with the rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from monitor.quality.estimates import estimate_stream
from monitor.store import Store
from monitor.store import tables as t
from monitor.store.store import bucket_of

CHUNK = 5000
QUANTITIES = ("response_chars", "empty_response", "metadata.score")


def fill(store: Store, n: int) -> None:
    text = ("lorem ipsum dolor sit amet " * 52)[:1400]
    now = time.time()
    with store.engine.begin() as conn:
        for start in range(0, n, CHUNK):
            ids = range(start, min(n, start + CHUNK))
            conn.execute(
                t.episodes.insert(),
                [
                    {
                        "episode_id": f"e{i}",
                        "stream": "s",
                        "model": "m",
                        "ts": float(i),
                        "prompt": "p" * 100,
                        "response": text,
                        "metadata": {"flag": i % 2 == 0, "score": i % 7},
                        "source": "bench",
                        "position": str(i),
                        "ingested_at": now,
                    }
                    for i in ids
                ],
            )
            conn.execute(
                t.samples.insert(),
                [
                    {
                        "episode_id": f"e{i}",
                        "channel": "rm",
                        "stream": "s",
                        "ts": float(i),
                        "inclusion_probability": 0.05,
                        "created_at": now,
                    }
                    for i in ids
                ],
            )
        conn.execute(t.traffic.insert(), [{"stream": "s", "bucket": bucket_of(0.0), "episodes": n * 20}])


def measure(store: Store, n: int) -> dict[str, dict[str, float]]:
    out = {}
    for quantity in QUANTITIES:
        start = time.perf_counter()
        estimate_stream(store, "s", "rm", quantity)
        seconds = time.perf_counter() - start
        tracemalloc.start()
        estimate_stream(store, "s", "rm", quantity)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        out[quantity] = {"us_per_row": round(seconds / n * 1e6, 1), "peak_mb": round(peak / 1e6, 2)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--db", default=None, help="an empty database (default: SQLite in a temporary folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(args.db or f"sqlite:///{Path(tmp) / 'estimate.db'}")
        fill(store, args.rows)
        result = {"benchmark": "estimate", "rows": args.rows, "quantities": measure(store, args.rows)}
        store.close()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
