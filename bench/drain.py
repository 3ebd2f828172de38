"""SIGTERM drain time of ``oversight run`` under load, seconds from the signal to the exit.

    python bench/drain.py [--cycles 8] [--oversight PATH] [--set K=V]...

Each cycle starts ``oversight run`` with the default configuration (drift detection with
embeddings, reward-model scoring) on a fresh SQLite database, feeds it the bundled real traffic
(repeated with fresh episode ids, new streams every 400 episodes so that references keep filling
and detectors keep being calibrated) through a FIFO as fast as it reads, and sends SIGTERM at a
random moment 2-15 s after the service is up. Prints one line per cycle (drain seconds, exit code)
and a JSON summary line. The watchdog exits with code 3 after ``pipeline.drain_timeout_s`` (8 s).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from monitor.simulate.demo import bundled_traffic


def traffic() -> list[dict[str, object]]:
    out = []
    with gzip.open(bundled_traffic(), "rb") as fh:
        for line in fh:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and isinstance(obj.get("episode_id"), str) and "response" in obj:
                out.append(obj)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def feed(fifo: Path, base: list[dict[str, object]], stop: threading.Event) -> None:
    try:
        with open(fifo, "w", encoding="utf-8") as fh:
            i = 0
            while not stop.is_set():
                ep = dict(base[i % len(base)])
                ep["episode_id"] = f"drain-{i}"
                ep["stream"] = f"s{i // 400}"  # a new stream every 400 episodes: references fill, detectors arm
                fh.write(json.dumps(ep) + "\n")
                i += 1
    except OSError:
        pass  # the service exited: the pipe is closed


def cycle(oversight: str, base: list[dict[str, object]], extra: list[str], rng: random.Random) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        fifo = Path(tmp) / "in.fifo"
        os.mkfifo(fifo)
        port = free_port()
        args = [oversight, "run", "--input", str(fifo), "--db", f"sqlite:///{tmp}/db.sqlite"]
        args += ["--set", "sampling.key=bench-drain-key-0123456789abcdef", "--set", f"server.port={port}"]
        args += ["--set", f"dead_letter.path={tmp}/dlq.jsonl"]
        for kv in extra:
            args += ["--set", kv]
        env = {k: v for k, v in os.environ.items() if not k.startswith("OVERSIGHT_")}
        env["HF_HUB_OFFLINE"] = "1"
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        stop = threading.Event()
        threading.Thread(target=feed, args=(fifo, base, stop), daemon=True).start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                    break
            except OSError:
                time.sleep(0.2)
        time.sleep(rng.uniform(2.0, 15.0))
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        took = time.monotonic() - t0
        stop.set()
        return took, rc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=8)
    ap.add_argument("--oversight", default=str(Path(sys.executable).parent / "oversight"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="K=V")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    base = traffic()
    drains, codes = [], []
    for c in range(args.cycles):
        took, rc = cycle(args.oversight, base, args.extra, rng)
        drains.append(took)
        codes.append(rc)
        print(f"drain {c}: {took:.2f}s, exit code {rc}", flush=True)
    drains.sort()
    summary = {
        "bench": "drain",
        "cycles": args.cycles,
        "median_s": round(drains[len(drains) // 2], 2),
        "max_s": round(drains[-1], 2),
        "over_2s": sum(d > 2.0 for d in drains),
        "exit_codes": sorted(set(codes)),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
