"""Kafka ingest throughput: the service's consume -> validate -> sample -> store path against a
raw kafka-python consume loop over the same topic, records/s (goal: ratio >= 0.5 at default settings).

    python bench/kafka_ingest.py [--episodes N] [--partitions P] [--batch-size B] [--configs C,...]
        [--steady [--warm-episodes N]] [--profile]

Each configuration (``--configs``: ``default``, as ``oversight run`` ships, with the embeddings on
the inference worker; ``external``, the model work in an ``oversight infer`` process of its own
beside the pipeline; ``same-priority``, ``default`` with the worker threads at ingest's CPU
priority, as before ``inference.nice``; ``no-inference``, embeddings and reward scoring off; ``core``, drift off too)
is measured against the raw loop of the same round.

Starts its own Tansu broker (memory storage), produces N realistic episodes (prompts and
responses from ../shared/data/alpaca_eval when present, synthetic otherwise) keyed by stream,
then measures (a) a raw consumer in a new group and (b) the Pipeline with the KafkaSource and a
SQLite database in a temporary directory (dev mode). Both clocks run from the first record a
poll returns to the last record consumed (a) or committed to the database (b), so the group
join is not counted. Both consumers fetch with ``fetch_max_wait_ms`` 20 (``--fetch-wait-ms``; the
service's ``kafka.fetch_max_wait_ms``, 500 by default, is the only setting changed): see
``FETCH_WAIT_MS``. Over the same span each run also reads the CPU clocks of its threads (Linux's
per-thread clocks): the raw loop's, and the service's ingest thread, Kafka consumer thread and the
rest of the process (the model workers), per record. On a 2-core machine the broker, the consumer
thread, the ingest thread and the model workers take turns, and the wall-clock ratio moves from run
to run with how they happen to; the CPU a record moves less. Prints one line per measurement and
a JSON summary line.

Cold and steady. By default the service path starts on an empty database, so its 20,000 episodes
are mostly warm-up: every stream's signals fill their references and build their detectors (a
calibration each) while the clock runs, and the episodes come in the shared data's order (model
after model), so detectors fire and build again. ``--steady`` measures a service that has been
running: the episodes of both topics are a seeded random mixture of the same rows (stationary
traffic), and before each configuration's timed runs one untimed run over a warm-up topic of
``--warm-episodes`` builds the detectors inline and checkpoints them; each timed run starts from a
copy of that database (the state a restarted replica loads). It also counts the drift events of the
timed run, which on stationary traffic should be few: each re-references a signal and so costs a
build.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import gzip
import io
import json
import os
import pstats
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
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
# Both consumers' fetch_max_wait_ms. Tansu holds a fetch for that long whenever one requested
# partition has nothing new (Apache Kafka answers once any has data), so as the partitions drain
# unevenly a consumer reads in bursts with that much idle time between them: at kafka-python's
# 500 ms the raw loop ran 4,000-15,000 records/s in some rounds and 40,000-100,000 in others,
# measuring the broker's hold rather than the cost of consuming, and in its slow rounds the
# service path "beat" it (ratio 1.03-1.16 at `core`). At 20 ms neither side waits.
FETCH_WAIT_MS = 20
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
    # Loudly: short synthetic texts cost the text statistics far less than real answers, so a run on
    # them cannot be compared with one on the shared data (a checkout elsewhere than beside
    # ../shared, a worktree under /tmp, measures another workload without this line).
    print(f"warning: no AlpacaEval data at {ALPACA}: synthetic texts, not comparable with real data", file=sys.stderr)
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


def make_episodes(
    n: int, mix_seed: int | None = None, prefix: str = "bench", start_ts: float = BASE_TS
) -> tuple[list[tuple[bytes, bytes]], str]:
    """``n`` episodes over the shared rows, in their order (model after model: the traffic drifts)
    or, with ``mix_seed``, drawn at random from all of them (a stationary mixture); 50 a second of
    event time from ``start_ts``."""
    base, origin = load_base()
    rng = random.Random(mix_seed)
    out = []
    for i in range(n):
        b = base[i % len(base)] if mix_seed is None else rng.choice(base)
        ep = {
            "episode_id": f"{prefix}-{i}",
            "stream": b["stream"],
            "model": b["model"],
            "timestamp": start_ts + i * 0.02,
            "prompt": b["prompt"],
            "response": b["response"],
            "metadata": {"turn": i % 5, "lang": "en"},
        }
        out.append((b["stream"].encode(), json.dumps(ep).encode()))
    return out, origin


def raw_consume(bootstrap: str, topic: str, n: int, max_records: int, fetch_wait_ms: int) -> tuple[float, int, float]:
    """The raw loop over ``topic`` until ``n`` records: its seconds from the first record polled,
    the bytes it read and its thread's CPU seconds over the same span."""
    from kafka import KafkaConsumer

    c = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"bench-raw-{uuid.uuid4().hex[:6]}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=fetch_wait_ms,
        **FAST_GROUP,
    )
    got = 0
    nbytes = 0
    t0 = None
    cpu0 = 0.0
    deadline = time.monotonic() + 300
    try:
        while got < n and time.monotonic() < deadline:
            batches = c.poll(timeout_ms=200, max_records=max_records)
            if batches and t0 is None:
                t0, cpu0 = time.perf_counter(), time.thread_time()
            for msgs in batches.values():
                for m in msgs:
                    got += 1
                    nbytes += len(m.value)
        elapsed = time.perf_counter() - (t0 or time.perf_counter())
        cpu = time.thread_time() - cpu0
    finally:
        c.close(autocommit=False)
    if got < n:
        raise RuntimeError(f"raw consumer got {got} of {n} records")
    return elapsed, nbytes, cpu


def cpu_clocks(consumer_thread: str = "kafka-consumer") -> dict[str, float]:
    """CPU seconds so far of the calling thread (the pipeline's), of the service's Kafka consumer
    thread (0 when it is not running) and of the whole process. Linux's per-thread clocks: the
    consumer thread is read through its pthread id, so nothing of the service is wrapped (where
    the platform has no such clock, it reads 0)."""
    consumer = 0.0
    for th in threading.enumerate():
        if th.name == consumer_thread and th.ident is not None:
            with contextlib.suppress(OSError, AttributeError):
                consumer = time.clock_gettime(time.pthread_getcpuclockid(th.ident))
    return {"ingest": time.thread_time(), "consumer": consumer, "process": time.process_time()}


def cpu_per_record(start: dict[str, float], end: dict[str, float], n: int) -> dict[str, float]:
    """Microseconds of CPU a record between two :func:`cpu_clocks` readings: the ingest thread,
    the consumer thread and the process's other threads (the model workers, the checkpointer; with
    ``external`` the model work runs in a process of its own, which this does not count)."""
    ingest = end["ingest"] - start["ingest"]
    consumer = end["consumer"] - start["consumer"]
    other = max(0.0, end["process"] - start["process"] - ingest - consumer)
    return {k: round(v / n * 1e6, 1) for k, v in (("ingest", ingest), ("consumer", consumer), ("other", other))}


# What each configuration changes from the defaults. `default` is `oversight run` as shipped: drift
# on (text signals on every episode, embeddings of the drift sample), built as the service builds
# itself, so the embeddings run on the inference worker, off the ingest path.
CONFIGS: dict[str, list[str]] = {
    "default": [],
    # The model work in a process of its own (`oversight infer`, started beside the pipeline on the
    # same database): the pipeline loads no model and feeds what the worker stored. One encoder
    # thread, as `default` leaves a core to the ingest loop (on a cluster: pods of their own).
    "external": ["inference.external=true", "inference.threads=1"],
    # `default` with the model workers' threads at ingest's CPU priority (before inference.nice):
    # the same run shows what the lower priority gives ingest when the cores are all busy.
    "same-priority": ["inference.nice=0"],
    "no-inference": ["drift.embedding.enabled=false", "reward.enabled=false"],
    "core": ["drift.enabled=false", "reward.enabled=false"],
}


def pipeline_consume(
    bootstrap: str,
    topic: str,
    n: int,
    batch_size: int,
    workdir: str,
    profile: bool,
    config: str = "default",
    fetch_wait_ms: int = FETCH_WAIT_MS,
    inline_builds: bool = False,
) -> tuple[float, Any, pstats.Stats | None, dict[str, float], dict[str, float]]:
    """The service path over ``topic`` until ``n`` records are committed: its seconds from the first
    record polled, its stats, the profile, the embedding worker's figures and the CPU a record
    (:func:`cpu_per_record`). ``inline_builds``: detectors built on the pipeline's thread (as
    ``replay`` builds them; the warm-up run), not in the background as ``oversight run`` builds them."""
    from prometheus_client import CollectorRegistry

    from monitor.config import load_settings
    from monitor.service import build_service

    overrides = [
        "dev=true",
        f"database.url=sqlite:///{workdir}/bench.db",
        "source.kind=kafka",
        f'kafka.bootstrap_servers=["{bootstrap}"]',
        f"kafka.topic={topic}",
        f"kafka.group_id=bench-svc-{uuid.uuid4().hex[:6]}",
        *(f"kafka.{k}={v}" for k, v in FAST_GROUP.items()),
        f"pipeline.batch_size={batch_size}",
        f"kafka.fetch_max_wait_ms={fetch_wait_ms}",
        *CONFIGS[config],
    ]
    if inline_builds:  # a calibration on the pipeline's thread outlasts the fast group's poll interval
        overrides.append("kafka.max_poll_interval_ms=300000")
    settings = load_settings(None, overrides)
    # As `oversight run` builds it: detectors built in the background, inference on its workers.
    svc = build_service(settings, serve=False, registry=CollectorRegistry(), background_calibration=not inline_builds)
    infer = start_infer(workdir, overrides) if settings.inference.external else None
    pipe = svc.pipeline
    marks: dict[str, float] = {}
    clocks: dict[str, dict[str, float]] = {}
    real_poll = pipe.source.poll
    real_batch = pipe.process_batch

    def poll(max_records: int, timeout_s: float) -> list[Any]:
        recs = real_poll(max_records, timeout_s)
        if recs and "start" not in marks:
            marks["start"] = time.perf_counter()
            clocks["start"] = cpu_clocks()
        return recs

    def process_batch(records: list[Any], stop: Any = None) -> bool:
        ok = real_batch(records, stop)
        if pipe.stats.records >= n:
            marks["end"] = time.perf_counter()
            clocks["end"] = cpu_clocks()
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
        workers = worker_figures(svc, marks)
        svc.close()
        if infer is not None:
            infer.terminate()
            infer.wait(30)
    if stats.records < n:
        raise RuntimeError(f"pipeline got {stats.records} of {n} records")
    cpu = cpu_per_record(clocks["start"], clocks["end"], n)
    return marks["end"] - marks["start"], stats, pstats.Stats(prof) if prof is not None else None, workers, cpu


def start_infer(workdir: str, overrides: list[str]) -> subprocess.Popen[bytes]:
    """`oversight infer` on the pipeline's settings and database, its log in the work directory."""
    cmd = [str(Path(sys.executable).parent / "oversight"), "infer", "--port", "0"]
    for o in overrides:
        cmd += ["--set", o]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OVERSIGHT_")} | {"HF_HUB_OFFLINE": "1"}
    with open(f"{workdir}/infer.log", "wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def worker_figures(svc: Any, marks: dict[str, float]) -> dict[str, float]:
    """The embedding worker during the ingest run: items embedded, per second of wall time and per
    second of its own computing time (its capacity), and what still waited at the end."""
    worker = None if svc.drift is None else svc.drift.worker
    if worker is None or "end" not in marks:
        return {}
    from monitor.store.inference import embedding_backlog

    wall = marks["end"] - marks["start"]
    out = {
        "embedded": float(worker.computed),  # external: embeddings fed from what `oversight infer` stored
        "embedded_per_s": worker.computed / wall if wall > 0 else 0.0,
        "waiting_at_end": float(embedding_backlog(svc.store).waiting),
    }
    if not svc.settings.inference.external:  # else the reader's rate, not the encoder's
        out["capacity_per_s"] = worker.capacity() or 0.0
    return out


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--episodes", type=int, default=20_000)
    ap.add_argument("--partitions", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="paired raw/pipeline measurements; medians are reported")
    ap.add_argument("--batch-size", type=int, default=500, help="pipeline.batch_size (records per transaction)")
    ap.add_argument(
        "--configs",
        default="default,same-priority,no-inference",
        help=f"comma-separated service configurations, each measured against the raw loop: {', '.join(CONFIGS)}",
    )
    ap.add_argument(
        "--pure-python-crc",
        action="store_true",
        help="make kafka-python check CRCs in pure Python, as it does when the crc32c extension is missing",
    )
    ap.add_argument("--profile", action="store_true", help="cProfile the pipeline run and print the top functions")
    ap.add_argument(
        "--steady",
        action="store_true",
        help="stationary traffic, and each configuration timed from the database of a warm-up run (see the module)",
    )
    ap.add_argument("--warm-episodes", type=int, default=20_000, help="the warm-up topic's size (--steady)")
    ap.add_argument(
        "--fetch-wait-ms",
        type=int,
        default=FETCH_WAIT_MS,
        help=f"fetch_max_wait_ms of both consumers (the service's kafka.fetch_max_wait_ms; default {FETCH_WAIT_MS})",
    )
    args = ap.parse_args()
    args.configs = [c for c in args.configs.split(",") if c]
    unknown = set(args.configs) - set(CONFIGS)
    if unknown:
        ap.error(f"unknown configurations {sorted(unknown)}; known: {sorted(CONFIGS)}")
    return args


class Rounds:
    """The measurements of every round: the raw loop, and each configuration against it."""

    def __init__(self, configs: list[str], warm: tuple[str, int] | None = None):
        self.configs = configs
        # --steady: the warm-up topic and its size; the database each configuration warmed.
        self.warm = warm
        self.warmed: dict[str, Path] = {}
        self.events: dict[str, list[int]] = {c: [] for c in configs}
        self.raw: list[float] = []
        self.raw_cpu: list[float] = []  # the raw loop's CPU a record, us
        self.cpu: dict[str, list[dict[str, float]]] = {c: [] for c in configs}
        self.rates: dict[str, list[float]] = {c: [] for c in configs}
        self.ratios: dict[str, list[float]] = {c: [] for c in configs}
        self.workers: dict[str, list[dict[str, float]]] = {c: [] for c in configs}
        self.prof: pstats.Stats | None = None

    def run(self, args: argparse.Namespace, bootstrap: str, topic: str, n: int, workdir: str) -> None:
        for r in range(args.rounds):
            # The raw loop gets the same consumer settings as the service (max_poll_records).
            raw_s, nbytes, raw_cpu = raw_consume(
                bootstrap, topic, n, KafkaConfig().max_poll_records, args.fetch_wait_ms
            )
            self.raw.append(n / raw_s)
            self.raw_cpu.append(raw_cpu / n * 1e6)
            print(
                f"round {r}: (a) raw kafka-python consume {self.raw[-1]:,.0f} records/s"
                f" ({nbytes / raw_s / 1e6:.0f} MB/s; CPU {self.raw_cpu[-1]:.1f} us a record)",
                flush=True,
            )
            for config in self.configs:
                self.one(args, bootstrap, topic, n, f"{workdir}/r{r}-{config}", config)

    def one(self, args: argparse.Namespace, bootstrap: str, topic: str, n: int, workdir: str, config: str) -> None:
        os.makedirs(workdir, exist_ok=True)
        if self.warm is not None:
            copy_db(self.warm_db(args, bootstrap, str(Path(workdir).parent), config), Path(workdir) / "bench.db")
        before = drift_events(Path(workdir) / "bench.db").keys()
        pipe_s, stats, self.prof, w, cpu = pipeline_consume(
            bootstrap, topic, n, args.batch_size, workdir, args.profile, config, args.fetch_wait_ms
        )
        self.cpu[config].append(cpu)
        found = drift_events(Path(workdir) / "bench.db")
        events = {i: sig for i, sig in found.items() if i not in before}
        self.events[config].append(len(events))
        rate = n / pipe_s
        self.rates[config].append(rate)
        self.ratios[config].append(rate / self.raw[-1])
        if w:
            self.workers[config].append(w)
        capacity = f", capacity {w['capacity_per_s']:.1f}/s" if "capacity_per_s" in w else ""
        extra = (
            f"; embedding worker {w['embedded']:.0f} done ({w['embedded_per_s']:.1f}/s of wall time{capacity}),"
            f" {w['waiting_at_end']:.0f} waiting at the end"
            if w
            else ""
        )
        print(
            f"         (b) service path [{config}] {rate:,.0f} records/s, ratio {self.ratios[config][-1]:.3f}"
            f" ({stats.batches} batches, sampled {stats.sampled}, drift events {by_signal(events)}){extra};"
            f" CPU a record: ingest thread {cpu['ingest']} us, consumer thread {cpu['consumer']} us,"
            f" other threads {cpu['other']} us",
            flush=True,
        )

    def warm_db(self, args: argparse.Namespace, bootstrap: str, root: str, config: str) -> Path:
        """The database of one untimed run of ``config`` over the warm-up topic, detectors built
        inline and checkpointed (made once per configuration)."""
        assert self.warm is not None
        if config not in self.warmed:
            topic, n = self.warm
            workdir = f"{root}/warm-{config}"
            os.makedirs(workdir, exist_ok=True)
            t0 = time.perf_counter()
            pipeline_consume(bootstrap, topic, n, args.batch_size, workdir, False, config, args.fetch_wait_ms, True)
            self.warmed[config] = Path(workdir) / "bench.db"
            print(
                f"         warm-up [{config}]: {n:,} episodes in {time.perf_counter() - t0:.0f}s,"
                f" drift events {by_signal(drift_events(self.warmed[config]))}, detectors built inline",
                flush=True,
            )
        return self.warmed[config]

    def summary(self) -> dict[str, Any]:
        raw_rate = statistics.median(self.raw)
        out: dict[str, Any] = {}
        for config in self.configs:
            pipe_rate = statistics.median(self.rates[config])
            ratio = statistics.median(self.ratios[config])
            overhead_us = (1 / pipe_rate - 1 / raw_rate) * 1e6
            print(
                f"median [{config}]: raw {raw_rate:,.0f}/s, service path {pipe_rate:,.0f}/s, ratio {ratio:.3f}"
                f" (goal >= 0.5 at default settings); the service path adds {overhead_us:.0f} us per record",
                flush=True,
            )
            cpu = {
                k: round(statistics.median(c[k] for c in self.cpu[config]), 1) for k in ("ingest", "consumer", "other")
            }
            cpu_ratio = statistics.median(self.raw_cpu) / max(1e-9, cpu["ingest"] + cpu["consumer"])
            print(
                f"  CPU a record [{config}]: raw loop {statistics.median(self.raw_cpu):.1f} us; service path: ingest"
                f" thread {cpu['ingest']} + consumer thread {cpu['consumer']} us (ratio {cpu_ratio:.3f}),"
                f" other threads {cpu['other']} us",
                flush=True,
            )
            entry: dict[str, Any] = {
                "pipeline_records_per_s": round(pipe_rate, 1),
                "ratio": round(ratio, 4),
                "overhead_us_per_record": round(overhead_us, 1),
                "cpu_us_per_record": cpu,
                "cpu_ratio": round(cpu_ratio, 4),
                "drift_events_per_run": statistics.median(self.events[config]),
            }
            ws = self.workers[config]
            if ws:
                entry["embedding_worker_per_s"] = round(statistics.median(w["embedded_per_s"] for w in ws), 1)
                if all("capacity_per_s" in w for w in ws):
                    entry["embedding_capacity_per_s"] = round(statistics.median(w["capacity_per_s"] for w in ws), 1)
            out[config] = entry
        return out


def drift_events(db: Path) -> dict[int, str]:
    """The drift events stored in a bench database, by id: their signal (none before it exists)."""
    if not db.exists():
        return {}
    with sqlite3.connect(db) as conn:
        return {int(i): str(sig) for i, sig in conn.execute("SELECT id, signal FROM drift_events")}


def by_signal(events: dict[int, str]) -> str:
    """``n`` or ``n: signal x k, ...`` for a line of the report."""
    counts = collections.Counter(events.values())
    return f"{len(events)}" + (": " + ", ".join(f"{s} x{k}" for s, k in sorted(counts.items())) if counts else "")


def copy_db(src: Path, dst: Path) -> None:
    """A consistent copy of a closed SQLite database (its WAL included), through the backup API."""
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)


def print_profile(prof: pstats.Stats) -> None:
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        prof.stream = buf  # type: ignore[attr-defined]
        prof.sort_stats(key).print_stats(30)
        print(f"--- cProfile of (b), top 30 by {key}\n{buf.getvalue()}")


def main() -> int:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.pure_python_crc:
        import kafka.record.util as kafka_util

        kafka_util.calc_crc32c.__defaults__ = (kafka_util.crc32c_py,)

    values, origin = make_episodes(args.episodes, 1 if args.steady else None)
    avg = sum(len(v) for _, v in values) / len(values)
    crc = "pure-Python CRC" if args.pure_python_crc else "C CRC (crc32c)"
    mode = "steady (stationary mixture, detectors warmed)" if args.steady else "cold (empty database, rows in order)"
    print(
        f"episodes: {len(values)} from {origin}, {avg:.0f} bytes on average; kafka-python with {crc}; {mode}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="kafka-bench-") as workdir:
        broker = tansu.start_broker(Path(workdir) / "tansu.log")
        try:
            warm = None
            if args.steady:
                warm_topic = tansu.episodes_topic(broker.bootstrap, "warm", args.partitions)
                # Served before the timed topic, in event time as in offsets.
                warm_values = make_episodes(args.warm_episodes, 2, "warm", BASE_TS - args.warm_episodes * 0.02)[0]
                tansu.produce(broker.bootstrap, warm_topic, warm_values, 20)
                warm = (warm_topic, args.warm_episodes)
            rounds = Rounds(args.configs, warm)
            topic = tansu.episodes_topic(broker.bootstrap, "bench", args.partitions)
            t0 = time.perf_counter()
            ends = tansu.produce(broker.bootstrap, topic, values, linger_ms=20)
            produce_s = time.perf_counter() - t0
            assert sum(ends.values()) == len(values), ends
            print(f"produce: {len(values) / produce_s:,.0f} records/s ({produce_s:.2f}s) partitions {ends}", flush=True)
            rounds.run(args, broker.bootstrap, topic, len(values), workdir)
        finally:
            broker.stop()
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
        "mode": "steady" if args.steady else "cold",
        "warm_episodes": args.warm_episodes if args.steady else 0,
        "raw_records_per_s": round(statistics.median(rounds.raw), 1),
        "raw_cpu_us_per_record": round(statistics.median(rounds.raw_cpu), 1),
        "profiled": bool(args.profile),
        "configs": rounds.summary(),
    }
    if rounds.prof is not None:
        print_profile(rounds.prof)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
