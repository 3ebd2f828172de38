"""Latency of the review API's claim and submit under concurrent reviewers, on PostgreSQL.

    python bench/review_api.py [--items N] [--clients N] [--history N] [--no-analyze] [--pg URL]

Creates a temporary schema in the ``test`` database (like the test suite), seeds N items
(every 10th with 2 reviewer slots) and, for a service that has been running, ``--history`` earlier
labels per reviewer on finished items, then analyses the tables as autovacuum would (``--no-analyze``:
the planner without statistics, a new deployment's first minute), starts the app under uvicorn in a
subprocess, and lets N client threads (httpx, one Bearer token and one reviewer each) claim and label
until the queue is empty. Prints p50/p99 latency in ms per operation and a JSON summary line.

Canaries (``review.canaries.share``, 5% of a reviewer's items by default) are mixed blind into the
queue, so the clients label more items than the seeded slots: the run succeeds when every slot
has its label in ``labels``, every other submission is a canary label in ``canary_labels``, and
no request failed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if TYPE_CHECKING:
    from monitor.review.auth import User
    from monitor.store import Store

PG_BASE = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")


def serve(db: str, port: int) -> None:
    import uvicorn

    from monitor.config import load_settings
    from monitor.review.app import create_app

    settings = load_settings(None, ["dev=true", f"database.url={db}"])
    uvicorn.run(create_app(settings), host="127.0.0.1", port=port, log_level="warning", access_log=False)


def seed(db: str, items: int, clients: int, history: int = 0) -> list[str]:
    """Items and reviewers, each reviewer with ``history`` labels of earlier, finished items;
    returns one API token per reviewer."""
    from monitor.review import auth
    from monitor.store import BatchWrite, Store
    from monitor.store import tables as t

    store = Store(db)
    now = time.time()
    batch = BatchWrite()
    for i in range(items):
        eid = f"bench-{i:06d}"
        batch.episodes.append(
            {
                "episode_id": eid,
                "stream": f"s{i % 4}",
                "model": "m",
                "ts": now - 86400 + i,
                "prompt": f"Question {i}? " * 20,
                "response": f"Answer {i}. " * 60,
                "metadata": {"i": i},
                "source": "bench",
                "position": f"0:{i}",
                "ingested_at": now,
            }
        )
        batch.samples.append(
            {
                "episode_id": eid,
                "channel": "human",
                "stream": f"s{i % 4}",
                "ts": now - 86400 + i,
                "inclusion_probability": 0.01,
                "created_at": now + i / 1000,
            }
        )
        for slot in range(2 if i % 10 == 0 else 1):
            batch.tasks.append(
                {
                    "episode_id": eid,
                    "slot": slot,
                    "stream": f"s{i % 4}",
                    "status": "pending",
                    "created_at": now + i / 1000,
                }
            )
    store.commit_batch(batch)
    pw = auth.hash_password(auth.generate_password())  # one hash for all: they never log in
    with store.engine.begin() as conn:
        conn.execute(
            t.users.insert(),
            [
                {"name": f"bench{i:03d}", "role": "reviewer", "password_hash": pw, "created_at": now}
                for i in range(clients)
            ],
        )
    users = auth.list_users(store)
    if history:
        label_history(store, users, history, now)
    tokens = [auth.create_api_token(store, u, "bench") for u in users]
    store.close()
    return tokens


def label_history(store: Store, users: list[User], per_user: int, now: float) -> None:
    """``per_user`` labels of each reviewer on earlier items, their tasks done: a service that
    has been running, not one whose reviewers start on an empty table."""
    from monitor.store import BatchWrite
    from monitor.store import tables as t

    batch = BatchWrite()
    labels = []
    for u in users:
        for i in range(per_user):
            eid = f"past-{u.id}-{i:05d}"
            ts = now - 2 * 86400 + i
            batch.episodes.append(
                {
                    "episode_id": eid,
                    "stream": "s0",
                    "model": "m",
                    "ts": ts,
                    "prompt": "Earlier?",
                    "response": "Yes.",
                    "metadata": {},
                    "source": "bench",
                    "position": f"1:{eid}",
                    "ingested_at": ts,
                }
            )
            batch.tasks.append({"episode_id": eid, "slot": 0, "stream": "s0", "status": "done", "created_at": ts})
            labels.append(
                {
                    "episode_id": eid,
                    "slot": 0,
                    "user_id": u.id,
                    "stream": "s0",
                    "skipped": False,
                    "rating": 4,
                    "flags": [],
                    "critique": "",
                    "time_spent_ms": 1000,
                    "created_at": ts,
                }
            )
    store.commit_batch(batch)
    with store.engine.begin() as conn:
        conn.execute(t.labels.insert(), labels)


def stored_labels(db: str) -> dict[str, int]:
    """The labels the run stored: of the seeded items (``labels``) and of canaries (``canary_labels``)."""
    import sqlalchemy as sa

    from monitor.store import Store
    from monitor.store import tables as t

    store = Store(db)
    try:
        with store.engine.connect() as conn:
            return {
                name: int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())
                for name, table in (("labels", t.labels), ("canary_labels", t.canary_labels))
            }
    finally:
        store.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s)) - 1))]


def wait_until_up(base: str, server: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            raise SystemExit("the review server did not start")
        time.sleep(0.1)


def reviewer(
    base: str,
    token: str,
    barrier: threading.Barrier,
    lock: threading.Lock,
    lat: dict[str, list[float]],
    errors: list[str],
) -> None:
    """One reviewer: claims and labels until the queue is empty; its latencies join ``lat`` at the end."""
    import httpx

    mine: dict[str, list[float]] = {"claim": [], "submit": [], "claim_empty": []}
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
        barrier.wait()
        while True:
            t0 = time.perf_counter()
            r = c.post("/api/v1/queue/claim")
            dt = (time.perf_counter() - t0) * 1000
            if r.status_code == 204:
                mine["claim_empty"].append(dt)
                break
            if r.status_code != 200:
                errors.append(f"claim {r.status_code}: {r.text[:200]}")
                break
            mine["claim"].append(dt)
            item = r.json()
            body = {
                "episode_id": item["episode_id"],
                "slot": item["slot"],
                "fence": item["fence"],
                "rating": 1 + len(mine["submit"]) % 7,
                "flags": ["harmful"] if len(mine["submit"]) % 5 == 0 else [],
                "time_spent_ms": 1000,
            }
            t0 = time.perf_counter()
            r = c.post("/api/v1/items/label", json=body)
            mine["submit"].append((time.perf_counter() - t0) * 1000)
            if r.status_code != 200:
                errors.append(f"label {r.status_code}: {r.text[:200]}")
    with lock:
        for k, v in mine.items():
            lat[k].extend(v)


def run(args: argparse.Namespace) -> dict[str, object]:
    import sqlalchemy as sa

    schema = f"bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(args.pg, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    db = f"{args.pg}?options=-csearch_path%3D{schema}"
    server = None
    try:
        tokens = seed(db, args.items, args.clients, args.history)
        if not args.no_analyze:
            # What autovacuum keeps on a running service. Without statistics PostgreSQL's planner
            # took the reviewer's labels for one row and read all of them for every item a claim
            # passed over (a claim p50 of 700 ms here): what a new deployment sees until autovacuum
            # first analyses the tables, within a minute or so.
            with admin.connect() as conn:
                conn.execute(sa.text(f'ANALYZE "{schema}".labels, "{schema}".review_tasks, "{schema}".canaries'))
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", "--db", db, "--port", str(port)],
            stdout=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        wait_until_up(base, server)

        lat: dict[str, list[float]] = {"claim": [], "submit": [], "claim_empty": []}
        errors: list[str] = []
        lock = threading.Lock()
        barrier = threading.Barrier(len(tokens))

        threads = [threading.Thread(target=reviewer, args=(base, tok, barrier, lock, lat, errors)) for tok in tokens]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
        stored = stored_labels(db)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
    slots = args.items + (args.items + 9) // 10
    history = args.history * args.clients
    return {
        "bench": "review_api",
        "db": "postgresql",
        "items": args.items,
        "slots": slots,
        "clients": args.clients,
        "labels": len(lat["submit"]),
        "labels_stored": stored["labels"] - history,
        "canary_labels_stored": stored["canary_labels"],
        # Every slot labelled once, every other submission a canary's.
        "history_labels": history,
        "analyzed": not args.no_analyze,
        "complete": stored["labels"] - history == slots and sum(stored.values()) - history == len(lat["submit"]),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "wall_s": round(wall, 2),
        "labels_per_s": round(len(lat["submit"]) / wall, 1),
        "claim_p50_ms": round(pct(lat["claim"], 50), 2),
        "claim_p99_ms": round(pct(lat["claim"], 99), 2),
        "claim_mean_ms": round(statistics.fmean(lat["claim"]), 2) if lat["claim"] else None,
        "submit_p50_ms": round(pct(lat["submit"], 50), 2),
        "submit_p99_ms": round(pct(lat["submit"], 99), 2),
        "submit_mean_ms": round(statistics.fmean(lat["submit"]), 2) if lat["submit"] else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--history", type=int, default=100, help="labels each reviewer made before the run (default 100)")
    ap.add_argument(
        "--no-analyze", action="store_true", help="leave the tables without planner statistics (a new deployment)"
    )
    ap.add_argument("--pg", default=PG_BASE, help="PostgreSQL URL of the database to make a temporary schema in")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--db", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.db, args.port)
        return 0
    out = run(args)
    print(
        f"review API, {out['clients']} clients, {out['labels']} labels in {out['wall_s']}s "
        f"({out['labels_stored']} of the {out['slots']} slots, {out['canary_labels_stored']} of canaries): "
        f"claim p50 {out['claim_p50_ms']} ms p99 {out['claim_p99_ms']} ms; "
        f"submit p50 {out['submit_p50_ms']} ms p99 {out['submit_p99_ms']} ms"
    )
    print(json.dumps(out))
    return 1 if out["errors"] or not out["complete"] else 0


if __name__ == "__main__":
    sys.exit(main())
