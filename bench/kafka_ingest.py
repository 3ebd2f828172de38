"""Kafka ingest throughput: the service's consume -> validate -> sample -> store path against a
raw kafka-python consume loop over the same topic, records/s (goal: ratio >= 0.8).

    python bench/kafka_ingest.py [--episodes N] [--partitions P] [--batch-size B] [--profile]

Starts its own Tansu broker (memory storage), produces N realistic episodes (prompts and
responses from ../shared/data/alpaca_eval when present, synthetic otherwise) keyed by stream,
then measures (a) a raw consumer in a new group and (b) the Pipeline with the KafkaSource and a
SQLite database in a temporary directory (dev mode). Both clocks run from the first record a
poll returns to the last record consumed (a) or committed to the database (b), so the group
join is not counted. Prints one line per measurement and a JSON summary line.
"""

from __future__ import annotations

import argparse
import cProfile
import gzip
import io
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import tansu  # noqa: E402
from monitor.config import KafkaConfig  # noqa: E402

ALPACA = REPO.parent / "shared" / "data" / "alpaca_eval"
BASE_TS = 1_767_225_600.0
FAST_GROUP = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000, "max_poll_interval_ms": 10000}


def load_base() -> tuple[list[dict[str, Any]], str]:
    rows: list[dict[str, Any]] = []
    if ALPACA.is_dir():
        for path in sorted(ALPACA.glob("*.jsonl.gz")):
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                for line in fh:
                    try:
                        obj = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(obj.get("instruction"), str) and isinstance(obj.get("output"), str):
                        rows.append(
                            {
                                "prompt": obj["instruction"],
                                "response": obj["output"],
                                "model": str(obj.get("generator", "unknown"))[:256],
                                "stream": str(obj.get("dataset", "default"))[:128],
                            }
                        )
    if rows:
        return rows, f"alpaca_eval ({len(rows)} distinct)"
    synthetic = [
        {
            "prompt": f"Question {i}: explain topic {i % 97} in a few sentences.",
            "response": ("Here is an explanation. " * (5 + i % 40)).strip(),
            "model": f"policy-v{i % 3}",
            "stream": f"stream-{i % 6}",
        }
        for i in range(1000)
    ]
    return synthetic, "synthetic"


def make_episodes(n: int) -> tuple[list[tuple[bytes, bytes]], str]:
    base, origin = load_base()
    out = []
    for i in range(n):
        b = base[i % len(base)]
        ep = {
            "episode_id": f"bench-{i}",
            "stream": b["stream"],
            "model": b["model"],
            "timestamp": BASE_TS + i * 0.02,
            "prompt": b["prompt"],
            "response": b["response"],
            "metadata": {"turn": i % 5, "lang": "en"},
        }
        out.append((b["stream"].encode(), json.dumps(ep).encode()))
    return out, origin


def raw_consume(bootstrap: str, topic: str, n: int, max_records: int) -> tuple[float, int]:
    from kafka import KafkaConsumer

    c = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"bench-raw-{uuid.uuid4().hex[:6]}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **FAST_GROUP,
    )
    got = 0
    nbytes = 0
    t0 = None
    deadline = time.monotonic() + 300
    try:
        while got < n and time.monotonic() < deadline:
            batches = c.poll(timeout_ms=200, max_records=max_records)
            if batches and t0 is None:
                t0 = time.perf_counter()
            for msgs in batches.values():
                for m in msgs:
                    got += 1
                    nbytes += len(m.value)
        elapsed = time.perf_counter() - (t0 or time.perf_counter())
    finally:
        c.close(autocommit=False)
    if got < n:
        raise RuntimeError(f"raw consumer got {got} of {n} records")
    return elapsed, nbytes


def pipeline_consume(
    bootstrap: str, topic: str, n: int, batch_size: int, workdir: str, profile: bool
) -> tuple[float, Any, pstats.Stats | None]:
    from prometheus_client import CollectorRegistry

    from monitor.config import load_settings
    from monitor.service import build_service

    settings = load_settings(
        None,
        [
            "dev=true",
            f"database.url=sqlite:///{workdir}/bench.db",
            "source.kind=kafka",
            f'kafka.bootstrap_servers=["{bootstrap}"]',
            f"kafka.topic={topic}",
            f"kafka.group_id=bench-svc-{uuid.uuid4().hex[:6]}",
            *(f"kafka.{k}={v}" for k, v in FAST_GROUP.items()),
            f"pipeline.batch_size={batch_size}",
        ],
    )
    svc = build_service(settings, serve=False, registry=CollectorRegistry())
    pipe = svc.pipeline
    marks: dict[str, float] = {}
    real_poll = pipe.source.poll
    real_batch = pipe.process_batch

    def poll(max_records: int, timeout_s: float) -> list[Any]:
        recs = real_poll(max_records, timeout_s)
        if recs and "start" not in marks:
            marks["start"] = time.perf_counter()
        return recs

    def process_batch(records: list[Any], stop: Any = None) -> bool:
        ok = real_batch(records, stop)
        if pipe.stats.records >= n:
            marks["end"] = time.perf_counter()
            pipe.stop_event.set()
        return ok

    pipe.source.poll = poll  # type: ignore[method-assign]
    pipe.process_batch = process_batch  # type: ignore[method-assign]
    prof = cProfile.Profile() if profile else None
    try:
        if prof is not None:
            prof.enable()
        stats = pipe.run(pipe.stop_event)
    finally:
        if prof is not None:
            prof.disable()
        svc.store.close()
    if stats.records < n:
        raise RuntimeError(f"pipeline got {stats.records} of {n} records")
    return marks["end"] - marks["start"], stats, pstats.Stats(prof) if prof is not None else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--episodes", type=int, default=50_000)
    ap.add_argument("--partitions", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="paired raw/pipeline measurements; medians are reported")
    ap.add_argument("--batch-size", type=int, default=500, help="pipeline.batch_size (records per transaction)")
    ap.add_argument(
        "--pure-python-crc",
        action="store_true",
        help="make kafka-python check CRCs in pure Python, as it does when the crc32c extension is missing",
    )
    ap.add_argument("--profile", action="store_true", help="cProfile the pipeline run and print the top functions")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.pure_python_crc:
        import kafka.record.util as kafka_util

        kafka_util.calc_crc32c.__defaults__ = (kafka_util.crc32c_py,)

    values, origin = make_episodes(args.episodes)
    avg = sum(len(v) for _, v in values) / len(values)
    crc = "pure-Python CRC" if args.pure_python_crc else "C CRC (crc32c)"
    print(f"episodes: {len(values)} from {origin}, {avg:.0f} bytes on average; kafka-python with {crc}", flush=True)
    raw_rates: list[float] = []
    pipe_rates: list[float] = []
    prof = None
    with tempfile.TemporaryDirectory(prefix="kafka-bench-") as workdir:
        broker = tansu.start_broker(Path(workdir) / "tansu.log")
        try:
            topic = f"bench-{uuid.uuid4().hex[:6]}"
            tansu.create_topic(broker.bootstrap, topic, args.partitions)
            tansu.create_topic(broker.bootstrap, f"{topic}.dlq", 1)
            t0 = time.perf_counter()
            ends = tansu.produce(broker.bootstrap, topic, values, linger_ms=20)
            produce_s = time.perf_counter() - t0
            assert sum(ends.values()) == len(values), ends
            print(f"produce: {len(values) / produce_s:,.0f} records/s ({produce_s:.2f}s) partitions {ends}", flush=True)
            for r in range(args.rounds):
                # The raw loop gets the same consumer settings as the service (max_poll_records).
                raw_s, nbytes = raw_consume(broker.bootstrap, topic, len(values), KafkaConfig().max_poll_records)
                raw_rates.append(len(values) / raw_s)
                pipe_s, stats, prof = pipeline_consume(
                    broker.bootstrap, topic, len(values), args.batch_size, f"{workdir}/r{r}", args.profile
                )
                pipe_rates.append(len(values) / pipe_s)
                print(
                    f"round {r}: (a) raw kafka-python consume {raw_rates[-1]:,.0f} records/s"
                    f" ({nbytes / raw_s / 1e6:.0f} MB/s)"
                    f"  (b) pipeline consume->validate->sample->store {pipe_rates[-1]:,.0f} records/s"
                    f" ({stats.batches} batches, sampled {stats.sampled})",
                    flush=True,
                )
        finally:
            broker.stop()
    raw_rate = statistics.median(raw_rates)
    pipe_rate = statistics.median(pipe_rates)
    ratio = statistics.median(p / r for p, r in zip(pipe_rates, raw_rates, strict=True))
    overhead_us = (1 / pipe_rate - 1 / raw_rate) * 1e6
    print(
        f"median: raw {raw_rate:,.0f}/s, pipeline {pipe_rate:,.0f}/s, ratio (b)/(a) {ratio:.2f} (goal >= 0.8); "
        f"the service path adds {overhead_us:.0f} us per record",
        flush=True,
    )
    if prof is not None:
        for key in ("tottime", "cumulative"):
            buf = io.StringIO()
            prof.stream = buf  # type: ignore[attr-defined]
            prof.sort_stats(key).print_stats(30)
            print(f"--- cProfile of (b), top 30 by {key}\n{buf.getvalue()}")
    summary = {
        "bench": "kafka_ingest",
        "episodes": len(values),
        "origin": origin,
        "avg_bytes": round(avg),
        "partitions": args.partitions,
        "batch_size": args.batch_size,
        "produce_records_per_s": round(len(values) / produce_s, 1),
        "kafka_crc": "python" if args.pure_python_crc else "c",
        "rounds": args.rounds,
        "overhead_us_per_record": round(overhead_us, 1),
        "raw_records_per_s": round(raw_rate, 1),
        "pipeline_records_per_s": round(pipe_rate, 1),
        "ratio": round(ratio, 3),
        "profiled": bool(args.profile),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
