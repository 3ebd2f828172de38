"""Memory of ``oversight run`` on a Kafka topic at default settings: flat after warm-up?

    python bench/run_rss.py [--episodes N] [--partitions P]

Starts its own Tansu broker, produces N episodes (real AlpacaEval texts when ``../shared/data`` is
there, as ``bench/kafka_ingest.py`` does), and runs ``oversight run`` against it as users run it (a
subprocess, dev mode, SQLite, default sampling: the drift sample embedded by the inference worker).
Samples the process's resident set every second from ``/proc`` and prints it at each tenth of the
input, the peak, and where the embedding backlog stood; then again once the worker has drained it.
Memory must be bounded by streams and signals, not by how much traffic went through.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import tansu  # noqa: E402
from bench.kafka_ingest import make_episodes  # noqa: E402

OVERSIGHT = str(Path(sys.executable).parent / "oversight")


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def progress(db: Path) -> tuple[int, int]:
    """(episodes committed, drift samples waiting for their embedding)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
            done = int(c.execute("SELECT COALESCE(SUM(episodes), 0) FROM traffic").fetchone()[0])
            waiting = int(
                c.execute("SELECT COUNT(*) FROM samples WHERE channel = 'drift' AND status = 'pending'").fetchone()[0]
            )
            return done, waiting
    except sqlite3.Error:
        return 0, 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--episodes", type=int, default=100_000)
    ap.add_argument("--partitions", type=int, default=3)
    ap.add_argument("--drain-timeout", type=float, default=900.0, help="seconds to wait for the embedding backlog")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a setting of the run")
    ap.add_argument("--keep-log", metavar="FILE", help="copy the service's log here")
    args = ap.parse_args()
    values, origin = make_episodes(args.episodes)
    print(f"episodes: {len(values)} from {origin}", flush=True)
    with tempfile.TemporaryDirectory(prefix="run-rss-") as workdir:
        broker = tansu.start_broker(Path(workdir) / "tansu.log")
        try:
            topic = tansu.episodes_topic(broker.bootstrap, "rss", args.partitions)
            tansu.produce(broker.bootstrap, topic, values, linger_ms=20)
            db = Path(workdir) / "db.sqlite"
            cmd = [OVERSIGHT, "run", "--dev", "--db", f"sqlite:///{db}"]
            for s in (
                "source.kind=kafka",
                f"kafka.bootstrap_servers=[{broker.bootstrap}]",
                f"kafka.topic={topic}",
                "kafka.session_timeout_ms=6000",
                "kafka.heartbeat_interval_ms=1000",
                "kafka.max_poll_interval_ms=10000",
                f"server.port={tansu.free_port()}",
                *args.set,
            ):
                cmd += ["--set", s]
            env = {k: v for k, v in os.environ.items() if not k.startswith("OVERSIGHT_")} | {"HF_HUB_OFFLINE": "1"}
            log = open(Path(workdir) / "run.log", "wb")  # noqa: SIM115
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
            try:
                result = watch(proc.pid, db, len(values), args.drain_timeout)
            finally:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                log.close()
            if not result.get("finished"):
                print((Path(workdir) / "run.log").read_text(errors="replace")[-3000:])
            if args.keep_log:
                Path(args.keep_log).write_bytes((Path(workdir) / "run.log").read_bytes())
        finally:
            broker.stop()
    print(json.dumps({"bench": "run_rss", "episodes": len(values), **result}))
    return 0 if result.get("finished") else 1


def watch(pid: int, db: Path, n: int, drain_timeout: float) -> dict[str, object]:
    t0 = time.monotonic()
    peak = 0.0
    marks: dict[str, float] = {}
    next_tenth = 1
    while True:
        time.sleep(1.0)
        rss = rss_mib(pid)
        peak = max(peak, rss)
        done, waiting = progress(db)
        while next_tenth <= 10 and done >= n * next_tenth / 10:
            marks[f"{next_tenth * 10}%"] = round(rss, 1)
            print(
                f"{time.monotonic() - t0:6.0f} s: {done:,} episodes committed, RSS {rss:.0f} MiB"
                f" (peak {peak:.0f}), {waiting} drift samples waiting for the worker",
                flush=True,
            )
            next_tenth += 1
        if done >= n:
            break
        if time.monotonic() - t0 > 3600:
            return {"finished": False, "rss_mib_at": marks, "peak_mib": round(peak, 1)}
    ingest_s = time.monotonic() - t0
    drained = time.monotonic() + drain_timeout
    while progress(db)[1] > 0 and time.monotonic() < drained:
        time.sleep(1.0)
        peak = max(peak, rss_mib(pid))
    left = progress(db)[1]
    rss = rss_mib(pid)
    print(
        f"all {n:,} committed after {ingest_s:.0f} s; backlog {'drained' if left == 0 else f'{left} left'}"
        f" after {time.monotonic() - t0:.0f} s: RSS {rss:.0f} MiB, peak {peak:.0f} MiB",
        flush=True,
    )
    return {
        "finished": True,
        "ingest_s": round(ingest_s, 1),
        "rss_mib_at": marks,
        "rss_mib_after_drain": round(rss, 1),
        "peak_mib": round(peak, 1),
        "waiting_after_drain": left,
    }


if __name__ == "__main__":
    sys.exit(main())
