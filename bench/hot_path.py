"""Where the ingest hot path's time per record goes (file -> validate -> sample -> signals -> SQLite).

    python bench/hot_path.py [--episodes 20000] [--configs core,signals,default] [--steady] [--drift-steady]

Input: the bundled real traffic repeated with fresh ids (as ``bench/replay.py``). Per
configuration, one run without a profiler gives the wall time per record; a second run under
``cProfile`` gives each area's share of the *own* time of its functions (``tottime``: a function's
time without the functions it calls), grouped by where the code lives. The shares are applied to
the unprofiled time per record, so each area reads in microseconds per record. The profiler
slows Python code more than C code, so Python areas are somewhat overstated.

Configurations: ``core`` (validate, sample, store: drift off), ``signals`` (plus the text signals
and their CUSUMs on every episode, embeddings off), ``default`` (the default settings: embeddings
of the 5% drift channel inline, which is why the default path runs at the encoder's pace).

``--steady``: each configuration is timed on a database that an untimed replay of as many other
episodes warmed first, so its streams' references are full and their detectors built: what a
service that has been running pays per record (from empty, the ``signals`` run is mostly its
detector builds). Both inputs are then drawn at random from the bundled traffic (a stationary
mixture), so that no shift makes a signal warm up and build again in the timed run.
``--drift-steady``: the drift monitor alone, a batch at once against one episode at a time.
``--state-writes``: the service path (as ``oversight run`` builds it: detectors built in the
background, embeddings on the inference worker) at the default settings from an empty database,
references filling: the bytes of stream state each batch's checkpoint writes (JSON, what the
store encodes), on average, at most and in all.

Prints a table per configuration and one JSON line ``{"bench": "hot_path", ...}``.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any
from unittest import mock

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from bench.replay import make_input  # noqa: E402

CONFIGS: dict[str, list[str]] = {
    "core": ["drift.enabled=false"],
    "signals": ["drift.enabled=true", "drift.embedding.enabled=false"],
    "default": [],
}

#: (area, test on the profiler's (file, function name)), first match wins; order matters.
AREAS: list[tuple[str, Any]] = [
    ("SQLite (C)", lambda f, n: "sqlite3" in n),
    ("JSON parse (orjson, C)", lambda f, n: "orjson" in n or "orjson" in f),
    ("hashing (C)", lambda f, n: "hashlib" in n or "_blake2" in n or "openssl" in n),
    ("inference (torch, transformers)", lambda f, n: "/torch/" in f or "/transformers/" in f or "torch." in n),
    ("SQLAlchemy", lambda f, n: "/sqlalchemy/" in f),
    ("validation (monitor/episodes)", lambda f, n: "/monitor/episodes/" in f),
    ("sampling (sampling/)", lambda f, n: f"{os.sep}sampling{os.sep}" in f and "/site-packages/" not in f),
    ("signals (monitor/signals)", lambda f, n: "/monitor/signals/" in f),
    ("drift and detectors", lambda f, n: "/monitor/drift/" in f or f"{os.sep}detectors{os.sep}" in f),
    ("pipeline loop (monitor/pipeline)", lambda f, n: "/monitor/pipeline/" in f),
    ("store (monitor/store)", lambda f, n: "/monitor/store/" in f),
    ("source (monitor/sources)", lambda f, n: "/monitor/sources/" in f),
    ("metrics (prometheus_client)", lambda f, n: "/prometheus_client/" in f),
    ("other monitor code", lambda f, n: "/monitor/" in f),
    ("Python built-ins and stdlib", lambda f, n: True),
]


def area_of(filename: str, name: str) -> str:
    for area, test in AREAS:
        if test(filename, name):
            return str(area)
    return "Python built-ins and stdlib"


def file_settings(path: Path, tmp: str, tag: str, overrides: list[str]) -> Any:
    """Settings that read ``path`` into the database ``<tag>.sqlite`` under ``tmp`` (dev mode)."""
    from monitor.config import load_settings

    return load_settings(
        None,
        [
            "dev=true",
            "source.kind=file",
            f"source.path={path}",
            f"database.url=sqlite:///{tmp}/{tag}.sqlite",
            f"dead_letter.path={tmp}/{tag}-dlq.jsonl",
            *overrides,
        ],
    )


def run(
    data: Path, tmp: str, overrides: list[str], tag: str, profile: bool, warm: Path | None = None
) -> tuple[float, int, Any]:
    """One replay of ``data`` into the database ``<tag>.sqlite``: seconds, episodes, the profile.
    ``warm``: first an untimed replay of that file into the same database, so that the timed one
    meets streams whose references are full and detectors built (what a running service pays)."""
    from monitor.service.replay import replay_file

    def settings(path: Path) -> Any:
        return file_settings(path, tmp, tag, overrides)

    if warm is not None:
        replay_file(settings(warm), str(warm), name=f"hot-path-{tag}-warm-{os.getpid()}")
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if prof is not None:
        prof.enable()
    report = replay_file(settings(data), str(data), name=f"hot-path-{tag}-{os.getpid()}")
    if prof is not None:
        prof.disable()
    return time.perf_counter() - t0, int(report["episodes"]), prof


def shares(prof: cProfile.Profile) -> dict[str, float]:
    """Each area's share of the profiled own time."""
    stats = pstats.Stats(prof)
    by: dict[str, float] = defaultdict(float)
    for (filename, _line, name), row in stats.stats.items():  # type: ignore[attr-defined]
        by[area_of(filename.replace(os.sep, "/"), name)] += row[2]  # tottime
    total = sum(by.values()) or 1.0
    return {k: v / total for k, v in sorted(by.items(), key=lambda kv: -kv[1])}


def drift_steady(data: Path, episodes: int) -> dict[str, float]:
    """The drift monitor alone once its detectors are built (the service builds them in the
    background, so this is its ingest-path cost per episode), best of 3 runs: a 100-episode batch
    as the pipeline gives it (``prepare``, the batch's text signals through their detectors at once,
    then ``observe`` of each episode), the same one episode at a time (``observe`` alone: text
    statistics and every signal's detector updates, as before ``prepare``), and the checkpoint."""
    import dataclasses

    from monitor.config import load_settings
    from monitor.drift import DriftMonitor
    from monitor.episodes.validate import parse_episode
    from monitor.metrics import Metrics
    from monitor.store import BatchWrite, Store
    from sampling.policy import Decision

    eps: list[Any] = []
    for line in data.read_bytes().splitlines()[: max(episodes, 2000)]:
        ep = parse_episode(line, 1 << 20, time.time())
        eps.append(dataclasses.replace(ep, stream="s", timestamp=1_767_225_600.0 + len(eps)))
    settings = load_settings(None, ["dev=true", "drift.embedding.enabled=false"])
    nothing = Decision({}, {}, 0.5, 0.5)

    def monitor() -> tuple[Any, Store]:
        store = Store("sqlite://")
        return DriftMonitor(settings.drift, store, b"k" * 32, Metrics(), boost=lambda *a: None), store

    def feed(mon: Any, store: Store, start: int, n: int, batched: bool) -> tuple[float, float]:
        observe = checkpoint = 0.0
        for b in range(start, start + n, 100):
            batch_eps = [(eps[i % len(eps)], i) for i in range(b, b + 100)]
            t0 = time.perf_counter()
            if batched:
                mon.prepare(batch_eps)
            for ep, i in batch_eps:
                mon.observe(ep, nothing, i)
            t1 = time.perf_counter()
            batch = BatchWrite()
            batch.states.update(mon.checkpoint())
            mon.add_rows(batch)
            store.commit_batch(batch)
            observe += t1 - t0
            checkpoint += time.perf_counter() - t1
        return observe / n * 1e6, checkpoint / n * 1e6

    out: dict[str, float] = {}
    for batched, key in ((True, "batch_us"), (False, "observe_us")):
        mon, store = monitor()
        feed(mon, store, 0, 3000, batched)  # the references fill and the detectors are built inline
        runs = [feed(mon, store, 3000 + j * 5000, 5000, batched) for j in range(3)]
        out[key] = round(min(r[0] for r in runs), 1)
        if batched:
            out["checkpoint_us"] = round(min(r[1] for r in runs), 1)
            mon.observe(eps[0], nothing, 18_000)
            state = {c: v for (_, c), v in mon.checkpoint().items()}  # what one more batch of the stream writes
            out["state_bytes_per_batch"] = len(json.dumps(state))
    return out


def state_writes(data: Path, tmp: str) -> dict[str, float]:
    """Bytes of stream state (drift, sampling) each batch's checkpoint writes on the service path
    over ``data`` from an empty database, at the default settings and built as ``oversight run``
    builds itself (detectors built in the background while the values wait, embeddings on the
    inference worker): what the filling references and the waiting values cost every batch
    (``monitor/drift/reference.py``, ``waiting.py``)."""
    from prometheus_client import CollectorRegistry

    from monitor.service import build_service
    from monitor.store import BatchWrite, Store

    sizes: list[int] = []
    real = Store.commit_batch

    def counting(store: Store, batch: BatchWrite, *, timeout_s: float | None = None) -> None:
        if batch.states:
            sizes.append(sum(len(json.dumps(v)) for v in batch.states.values()))
        real(store, batch, timeout_s=timeout_s)

    settings = file_settings(data, tmp, "state-writes", [])
    with mock.patch.object(Store, "commit_batch", counting):
        svc = build_service(settings, serve=False, registry=CollectorRegistry(), background_calibration=True)
        try:
            stats = svc.pipeline.run(svc.pipeline.stop_event)
        finally:
            svc.close()
    return {
        "episodes": int(stats.records),
        "batches": len(sizes),
        "state_kb_per_batch": round(sum(sizes) / max(1, len(sizes)) / 1e3, 1),
        "state_kb_max": round(max(sizes, default=0) / 1e3, 1),
        "state_mb": round(sum(sizes) / 1e6, 1),
    }


def kmmd_state_bytes(ref_rows: int) -> dict[str, int]:
    """What the embedding detector (``kmmd``, defaults, float32 MiniLM-sized inputs) writes: its whole
    snapshot, and the part a checkpoint writes at every batch (``snapshot_parts``: no reference)."""
    import numpy as np

    from detectors.kernel_mmd import KernelMMDDetector

    rng = np.random.default_rng(0)
    det = KernelMMDDetector(ert=10_000, x_ref=rng.standard_normal((ref_rows, 384)).astype(np.float32))
    for _ in range(2 * det.window_size):
        det.update(rng.standard_normal(384).astype(np.float32))
    online, _ = det.snapshot_parts()
    return {"kmmd_snapshot_bytes": len(det.snapshot()), "kmmd_per_batch_bytes": len(online)}


def windowed_state_bytes(ref_size: int) -> dict[str, int]:
    """What a ``windowed`` detector (defaults, a normal-scored reference) writes per batch once it
    has learned a day at 1 episode/s (``snapshot_parts``: its reference goes with the static part)."""
    import numpy as np

    from detectors.windowed import WindowedShiftDetector

    rng = np.random.default_rng(0)
    det = WindowedShiftDetector(x_ref=rng.standard_normal(ref_size))
    t0 = 4 * 86_400.0
    times = t0 + np.arange(2 * 86_400, dtype=float)
    det.update_many(times, rng.standard_normal(times.size))
    online, _ = det.snapshot_parts()
    return {"windowed_per_batch_bytes": len(online)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--episodes", type=int, default=20_000)
    ap.add_argument("--configs", default="core,signals,default", help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument(
        "--drift-steady", action="store_true", help="also time the drift monitor once its detectors are built"
    )
    ap.add_argument(
        "--steady",
        action="store_true",
        help="time each configuration on a database an untimed replay of as many other episodes warmed"
        " (references full, detectors built: a service that has been running), not from empty",
    )
    ap.add_argument(
        "--state-writes",
        action="store_true",
        help="also count the stream state the checkpoints write, default settings from an empty database",
    )
    args = ap.parse_args()
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "in.jsonl"
        warm = None
        if args.steady:  # a stationary mixture of the bundled traffic: no shift, so no detector is rebuilt
            warm = Path(tmp) / "warm.jsonl"
            make_input(warm, args.episodes, tag="w", seed=1)
            make_input(data, args.episodes, tag="t", seed=2)
        else:
            make_input(data, args.episodes)
        for name in args.configs.split(","):
            wall, n, _ = run(data, tmp, CONFIGS[name], f"{name}-plain", profile=False, warm=warm)
            _, _, prof = run(data, tmp, CONFIGS[name], f"{name}-profiled", profile=True, warm=warm)
            per = wall / max(n, 1) * 1e6
            parts = shares(prof)
            out[name] = {
                "episodes": n,
                "episodes_per_s": round(n / wall),
                "us_per_record": round(per, 1),
                "areas_us": {k: round(v * per, 1) for k, v in parts.items()},
                "steady": args.steady,
            }
            state = "steady (warm database)" if args.steady else "from an empty database"
            print(f"\n{name}, {state}: {n} episodes, {n / wall:,.0f} episodes/s, {per:.1f} us per record")
            for area, share in parts.items():
                if share >= 0.005:
                    print(f"  {area:<34} {share * per:8.1f} us  {share:6.1%}")
        if args.drift_steady:
            out["drift_steady"] = d = (
                drift_steady(data, args.episodes) | kmmd_state_bytes(200) | windowed_state_bytes(500)
            )
            print(
                f"\ndrift monitor once built (default signals, embeddings off, 100-episode batches): a batch at"
                f" once (prepare + observe) {d['batch_us']} us per episode, one episode at a time (observe)"
                f" {d['observe_us']} us, checkpoint {d['checkpoint_us']} us per episode,"
                f" {d['state_bytes_per_batch']:,} bytes of stream state written per batch"
            )
            print(
                f"embedding detector (kmmd, 200 x 384 reference): snapshot {d['kmmd_snapshot_bytes']:,} bytes,"
                f" {d['kmmd_per_batch_bytes']:,} bytes of it written per batch; a windowed detector (500-value"
                f" reference, two days learned) writes {d['windowed_per_batch_bytes']:,} bytes per batch"
            )
        if args.state_writes:
            out["state_writes"] = w = state_writes(data, tmp)
            print(
                "\nstream state written by the checkpoints (the service path, default settings, from an empty"
                f" database): {w['episodes']:,} episodes in {w['batches']} batches, {w['state_kb_per_batch']} KB"
                f" a batch on average, {w['state_kb_max']} KB at most, {w['state_mb']} MB in all"
            )
    print(json.dumps({"bench": "hot_path", **out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
