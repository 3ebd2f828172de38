"""HTTP ingest throughput and latency: episodes/s and p50/p99 latency to the 2xx through
``POST /v1/episodes`` (the oversight_client SDK, and raw httpx), through OTLP ``POST /v1/traces``
(OTLP/JSON GenAI spans), against a raw kafka-python producer (acks=all) on the same broker, in
one run.

    python bench/ingest_http.py [--episodes N] [--batch B] [--threads T] [--handoff inbox|kafka|both]

Starts its own Tansu broker (memory storage) and ``oversight ingest serve`` (a subprocess, SQLite
in a temporary directory; the hand-off is the database inbox or the broker's topic). Latency is
per request for raw httpx and OTLP (send to 2xx), per episode for the SDK (``log()`` to its
result) and for the raw producer (``send()`` to its ack). Prints one line per measurement and a
JSON summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import tansu  # noqa: E402

OVERSIGHT = str(Path(sys.executable).parent / "oversight")
BASE_TS = 1_767_225_600


def episode(run: str, i: int) -> dict[str, Any]:
    return {
        "episode_id": f"{run}-{i}",
        "stream": f"s{i % 4}",
        "model": "bench-v1",
        "timestamp": BASE_TS + i,
        "prompt": f"Question {i}: explain the difference between a list and a tuple in Python. " * 3,
        "response": f"Answer {i}: a list is mutable, a tuple is not; tuples can be dict keys. " * 8,
    }


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def summary(name: str, n: int, elapsed: float, lat: list[float]) -> dict[str, Any]:
    out = {
        "path": name,
        "episodes": n,
        "episodes_per_s": round(n / elapsed, 1),
        "p50_ms": round(pct(lat, 0.5) * 1000, 2),
        "p99_ms": round(pct(lat, 0.99) * 1000, 2),
    }
    rate, p50, p99 = out["episodes_per_s"], out["p50_ms"], out["p99_ms"]
    print(f"{name:<28} {rate:>10.0f} episodes/s   p50 {p50:>8.1f} ms   p99 {p99:>8.1f} ms", flush=True)
    return out


class Server:
    """``oversight ingest serve`` as a subprocess with its own SQLite file and token."""

    def __init__(self, workdir: Path, sets: list[str]):
        db = f"sqlite:///{workdir / 'ingest.db'}"
        common = ["--dev", "--db", db, *[a for s in sets for a in ("--set", s)]]
        self.token = subprocess.run(
            [OVERSIGHT, "ingest", "tokens", "add", "bench", *common], check=True, capture_output=True, text=True
        ).stdout.strip()
        self.port = tansu.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / "ingest.log", "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [OVERSIGHT, "ingest", "serve", *common, "--port", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ingest serve exited: see {workdir / 'ingest.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("ingest serve did not listen within 60 s")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)
        self.log.close()


def post_all(
    url: str, token: str, bodies: list[tuple[int, bytes]], content_type: str, threads: int
) -> tuple[float, list[float]]:
    """POST every body from ``threads`` threads (retrying 429/503 after Retry-After); returns the
    elapsed time and each request's latency to its 2xx."""
    lat: list[float] = []
    lock = threading.Lock()
    it = iter(bodies)

    def work() -> None:
        with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {token}", "Content-Type": content_type}) as c:
            while True:
                with lock:
                    nxt = next(it, None)
                if nxt is None:
                    return
                t0 = time.perf_counter()
                while (r := c.post(url, content=nxt[1])).status_code in (429, 503):
                    time.sleep(float(r.headers.get("retry-after", "1")))
                r.raise_for_status()
                with lock:
                    lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    ts = [threading.Thread(target=work) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return time.perf_counter() - t0, lat


def bench_raw_http(server: Server, n: int, batch: int, threads: int, label: str) -> dict[str, Any]:
    run = uuid.uuid4().hex[:8]
    eps = [json.dumps(episode(run, i)).encode() for i in range(n)]
    bodies = [(len(eps[i : i + batch]), b"\n".join(eps[i : i + batch]) + b"\n") for i in range(0, n, batch)]
    elapsed, lat = post_all(server.url + "/v1/episodes", server.token, bodies, "application/x-ndjson", threads)
    return summary(f"raw httpx ({label})", n, elapsed, lat)


def bench_sdk(server: Server, n: int, batch: int, label: str) -> dict[str, Any]:
    from oversight_client import Client, Result

    run = uuid.uuid4().hex[:8]
    started: dict[str, float] = {}
    lat: list[float] = []

    def on_result(r: Result) -> None:
        lat.append(time.perf_counter() - started[r.episode_id])

    eps = [episode(run, i) for i in range(n)]
    t0 = time.perf_counter()
    with Client(server.url, server.token, batch_size=batch, flush_interval_s=0.01, on_result=on_result) as c:
        for e in eps:
            started[e["episode_id"]] = time.perf_counter()
            c.log(e)
        c.flush()
        stats = c.stats
    elapsed = time.perf_counter() - t0
    if stats.accepted != n:
        print(f"  note: SDK stats {stats}", flush=True)
    return summary(f"SDK Client ({label})", n, elapsed, lat)


def otlp_span(run: str, i: int) -> dict[str, Any]:
    e = episode(run, i)

    def kv(k: str, v: str) -> dict[str, Any]:
        return {"key": k, "value": {"stringValue": v}}

    return {
        "traceId": uuid.uuid5(uuid.NAMESPACE_OID, f"{run}-{i}").hex,
        "spanId": f"{i + 1:016x}",
        "name": "chat bench-v1",
        "startTimeUnixNano": str((BASE_TS + i) * 10**9),
        "endTimeUnixNano": str((BASE_TS + i) * 10**9 + 5 * 10**8),
        "attributes": [
            kv("gen_ai.operation.name", "chat"),
            kv("gen_ai.system", "openai"),
            kv("gen_ai.request.model", "bench-v1"),
            kv("oversight.stream", e["stream"]),
            kv("gen_ai.input.messages", json.dumps([{"role": "user", "content": e["prompt"]}])),
            kv("gen_ai.output.messages", json.dumps([{"role": "assistant", "content": e["response"]}])),
        ],
    }


def bench_otlp(server: Server, n: int, batch: int, threads: int, label: str) -> dict[str, Any] | None:
    probe = httpx.post(server.url + "/v1/traces", content=b"{}", headers={"Content-Type": "application/json"})
    if probe.status_code == 404:
        print("OTLP /v1/traces: not served by this build, skipped", flush=True)
        return None
    run = uuid.uuid4().hex[:8]
    bodies = []
    for i in range(0, n, batch):
        spans = [otlp_span(run, j) for j in range(i, min(n, i + batch))]
        req = {"resourceSpans": [{"resource": {}, "scopeSpans": [{"scope": {"name": "bench"}, "spans": spans}]}]}
        bodies.append((len(spans), json.dumps(req).encode()))
    elapsed, lat = post_all(server.url + "/v1/traces", server.token, bodies, "application/json", threads)
    return summary(f"OTLP/JSON ({label})", n, elapsed, lat)


def bench_raw_kafka(bootstrap: str, n: int) -> dict[str, Any]:
    from kafka import KafkaProducer

    topic = f"bench-raw-{uuid.uuid4().hex[:8]}"
    tansu.create_topic(bootstrap, topic, 4)
    run = uuid.uuid4().hex[:8]
    eps = [(e["stream"].encode(), json.dumps(e).encode()) for e in (episode(run, i) for i in range(n))]
    lat: list[float] = []
    p = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2, batch_size=256 * 1024)

    def acked(t0: float) -> Callable[[Any], None]:
        return lambda _md: lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    for key, value in eps:
        p.send(topic, key=key, value=value).add_callback(acked(time.perf_counter()))
    p.flush(timeout=300)
    elapsed = time.perf_counter() - t0
    p.close(timeout=10)
    return summary("raw kafka-python (acks=all)", n, elapsed, lat)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=500, help="episodes (spans) per request")
    ap.add_argument("--threads", type=int, default=4, help="concurrent requests of raw httpx and OTLP")
    ap.add_argument("--handoff", choices=["inbox", "kafka", "both"], default="both")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        broker = tansu.start_broker(Path(tmp) / "tansu.log")
        try:
            handoffs = ["inbox", "kafka"] if args.handoff == "both" else [args.handoff]
            for handoff in handoffs:
                results += run_handoff(handoff, broker.bootstrap, Path(tmp) / handoff, args)
            results.append(bench_raw_kafka(broker.bootstrap, args.episodes))
        finally:
            broker.stop()
    print(json.dumps({"bench": "ingest_http", "batch": args.batch, "results": results}))
    return 0


def run_handoff(handoff: str, bootstrap: str, workdir: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    workdir.mkdir()
    sets = [f"ingest.handoff={handoff}", "ingest.max_backlog=10000000"]
    if handoff == "kafka":
        topic = f"bench-ingest-{uuid.uuid4().hex[:8]}"
        tansu.create_topic(bootstrap, topic, 4)
        sets += [f'kafka.bootstrap_servers=["{bootstrap}"]', f"kafka.topic={topic}"]
    server = Server(workdir, sets)
    try:
        out = [
            bench_sdk(server, args.episodes, args.batch, handoff),
            bench_raw_http(server, args.episodes, args.batch, args.threads, handoff),
        ]
        otlp = bench_otlp(server, args.episodes, args.batch, args.threads, handoff)
        return out + ([otlp] if otlp is not None else [])
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
