"""Readiness tells the truth, and the service recovers: a full disk (database and dead letters), a
read-only database (PostgreSQL while idle; SQLite connections opened while the volume was read-only),
a replay run twice onto one database, and a compare-and-set that can never succeed.

Disks and volumes are real: a tmpfs of a few megabytes and a read-only bind mount (root, as in CI;
read-only also works with permission bits for other users).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from outage_helpers import (
    OVERSIGHT,
    SETTINGS,
    PacedWriter,
    ReadOnlyDir,
    SmallDisk,
    assert_exactly_once,
    can_mount,
    episode,
    http_get,
    metric,
    wait_for,
)
from prometheus_client import CollectorRegistry

from monitor.config import Settings, load_settings

READY_WITHIN_S = 5.0


def settings(db_url: str, dead_letters: Path, *extra: str) -> Settings:
    return load_settings(
        None, [*SETTINGS, f"database.url={db_url}", f"dead_letter.path={dead_letters}", "server.port=0", *extra]
    )


def readyz(url: str) -> tuple[int, dict[str, bool]]:
    code, body = http_get(f"{url}/readyz")
    return code, dict(json.loads(body)["checks"])


class Running:
    """``build_service`` + ``pipeline.run`` on a thread, as ``oversight run`` does in-process."""

    def __init__(self, s: Settings, **kw: Any):
        from monitor.service import build_service

        self.svc = build_service(s, registry=CollectorRegistry(), **kw)
        assert self.svc.server is not None
        self.url = self.svc.server.url
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="pipeline", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.svc.pipeline.run(self.stop)
        except BaseException as e:  # surfaced by close()
            self.error = e

    def alive(self) -> bool:
        return self.thread.is_alive() and self.error is None

    def close(self, timeout_s: float = 60) -> None:
        self.thread.join(timeout_s)
        self.stop.set()
        self.thread.join(10)
        assert self.svc.server is not None
        self.svc.server.stop()
        self.svc.store.close()
        if self.error is not None:
            raise self.error
        assert not self.thread.is_alive(), "the pipeline did not finish"


needs_mount = pytest.mark.skipif(not can_mount(), reason="needs root with mount rights (as in CI)")


@needs_mount
def test_full_disk_turns_readyz_red_for_the_store_and_the_dead_letters(tmp_path: Path) -> None:
    """SQLite and the dead-letter file each on a 4 MB disk that fills up: /readyz turns 503
    naming the check that cannot make progress (a SELECT would still succeed), the metrics
    agree, and both recover when space is freed; no record is lost or doubled, no dead letter
    torn or repeated."""
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    with SmallDisk(tmp_path / "db-disk") as disk, SmallDisk(tmp_path / "dlq-disk") as dlq_disk:
        db = f"sqlite:///{disk.path / 'oversight.db'}"
        dlq = dlq_disk.path / "dead-letters.jsonl"
        run = Running(settings(db, dlq, "source.kind=file", f"source.path={fifo}"))
        writer = PacedWriter(fifo, rate=200).start()
        try:
            wait_for(lambda: readyz(run.url)[0] == 200, 30, "ready after start")
            port = int(run.url.rsplit(":", 1)[1])
            # 1. The database cannot write: the store's check turns red.
            disk.fill()
            wait_for(lambda: readyz(run.url)[0] == 503, READY_WITHIN_S, "503 on a full disk")
            checks = readyz(run.url)[1]
            assert checks["database"] is False, checks
            assert run.svc.store.ping(), "a SELECT still succeeds: readiness must not rest on it"
            assert metric(port, "oversight_ready") == 0.0
            assert metric(port, "oversight_ready_check", check="database") == 0.0
            assert (metric(port, "oversight_commit_errors_total", target="store") or 0) >= 1
            time.sleep(1.0)
            disk.free()
            wait_for(lambda: readyz(run.url)[0] == 200, READY_WITHIN_S, "200 after space is freed")
            assert metric(port, "oversight_ready") == 1.0
            # 2. An invalid record cannot be dead-lettered: the dead-letter check turns red.
            dlq_disk.fill()
            writer.inject('{"episode_id": "bad", "prompt": "truncated')
            wait_for(lambda: not readyz(run.url)[1].get("dead_letter", True), READY_WITHIN_S, "dead_letter red")
            assert readyz(run.url)[0] == 503
            assert metric(port, "oversight_ready_check", check="dead_letter") == 0.0
            assert (metric(port, "oversight_commit_errors_total", target="dead_letter") or 0) >= 1
            time.sleep(1.0)
            dlq_disk.free()
            wait_for(lambda: readyz(run.url)[0] == 200, READY_WITHIN_S, "200 after space is freed again")
            assert run.alive()
            n = writer.finish()
            run.close()
        finally:
            writer.abandon()
            if run.thread.is_alive():
                run.stop.set()
                run.thread.join(10)
                run.svc.store.close()
        assert_exactly_once(db, [episode(i) for i in range(n)])
        letters = [json.loads(line) for line in dlq.read_text().splitlines()]  # every line whole
        assert [x["reason"] for x in letters] == ["invalid_json"], letters


@pytest.mark.postgres
def test_read_only_database_turns_readyz_red_while_idle() -> None:
    """No traffic: the write probe notices a database that turned read-only (a plain SELECT
    still succeeds there) within seconds, and its recovery."""
    from pg_cluster import PgCluster

    from monitor.sources.memory import MemorySource

    with PgCluster() as pg:
        url = pg.create_database()
        s = settings(url, Path(pg.root) / "dlq.jsonl")

        class Idle(MemorySource):
            @property
            def exhausted(self) -> bool:
                return False  # a live source with nothing to say

        run = Running(s, source=Idle([json.dumps(episode(i)).encode() for i in range(20)], "idle"))
        try:
            wait_for(lambda: readyz(run.url)[0] == 200, 30, "ready after start")
            pg.set_read_only(True)
            wait_for(lambda: readyz(run.url)[0] == 503, READY_WITHIN_S, "503 on a read-only database")
            assert readyz(run.url)[1]["database"] is False
            assert run.svc.store.ping()
            pg.set_read_only(False)
            wait_for(lambda: readyz(run.url)[0] == 200, READY_WITHIN_S, "200 when writable again")
            assert run.alive()
        finally:
            run.stop.set()
            run.close()


@needs_mount
def test_connections_opened_on_a_read_only_volume_are_replaced_when_it_is_writable(tmp_path: Path) -> None:
    """The pipeline starts while the SQLite volume is mounted read-only (another process holds the
    database open): its connections can read but never write, even after the volume is remounted
    writable. It must not keep them: once writable, it reconnects and commits everything."""
    import sqlite3

    from monitor.store import Store

    vol = tmp_path / "vol"
    vol.mkdir()
    db = f"sqlite:///{vol / 'oversight.db'}"
    Store(db).close()  # migrated while writable
    other = sqlite3.connect(vol / "oversight.db")  # the review service, say: keeps the WAL files
    other.execute("SELECT COUNT(*) FROM offsets").fetchall()
    eps = [episode(i) for i in range(400)]
    try:
        with ReadOnlyDir(vol) as ro:
            from monitor.sources.memory import MemorySource

            src = MemorySource([json.dumps(e).encode() for e in eps], "volume")
            run = Running(settings(db, tmp_path / "dlq.jsonl"), source=src)
            try:
                wait_for(lambda: readyz(run.url)[1].get("database") is False, READY_WITHIN_S, "database red")
                time.sleep(1.0)
                assert run.alive()
                ro.make_writable()
                wait_for(lambda: readyz(run.url)[1].get("database") is True, READY_WITHIN_S, "database green")
                run.close(timeout_s=30)
            finally:
                run.stop.set()
                run.thread.join(10)
                run.svc.store.close()
    finally:
        other.close()
    assert_exactly_once(db, eps)


def test_replay_onto_a_database_that_holds_it_refuses_at_once(tmp_path: Path) -> None:
    """Replaying the same input again into the same database used to loop forever on "offset was
    created by another consumer": it must refuse at once, in one line, and change nothing."""
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(episode(i)) + "\n" for i in range(200)))
    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    args = [OVERSIGHT, "replay", "--input", str(data), "--db", db, "--set", f"dead_letter.path={tmp_path / 'd'}"]
    args += ["--set", "drift.enabled=false", "--set", "reward.enabled=false"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OVERSIGHT_")}
    first = subprocess.run(
        [*args, "--report", str(tmp_path / "r1.json")],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert first.returncode == 0, first.stderr
    t0 = time.monotonic()
    again = subprocess.run(
        [*args, "--report", str(tmp_path / "r2.json")],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert time.monotonic() - t0 < 60
    assert again.returncode == 2, again.stderr
    errors = [line for line in again.stderr.splitlines() if "already holds" in line]
    assert len(errors) == 1 and "Traceback" not in again.stderr, again.stderr
    assert "fresh database" in errors[0]
    from monitor.store import Store

    store = Store(db)
    try:
        assert store.traffic_count("chat") + store.traffic_count("assistant") + store.traffic_count("search") == 200
    finally:
        store.close()


def test_rollbacks_without_progress_back_off_and_give_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A consumer whose offset compare-and-set can never succeed (here the database silently
    ignores every update of the offsets) is rolled back batch after batch: it must back off, count
    each rollback, and give up with an error after a bound, never spin."""
    import sqlalchemy as sa

    import monitor.pipeline.commit as pipeline_module
    from monitor.episodes.deadletter import JsonlDeadLetterSink
    from monitor.metrics import Metrics
    from monitor.pipeline import Pipeline
    from monitor.retry import NoProgress
    from monitor.sources.memory import MemorySource
    from monitor.store import Store

    monkeypatch.setattr(pipeline_module, "STALE_LIMIT", 3)
    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    s = settings(db, tmp_path / "dlq.jsonl")
    store = Store(db)
    with store.engine.begin() as c:
        c.execute(sa.text("CREATE TRIGGER frozen BEFORE UPDATE ON offsets BEGIN SELECT RAISE(IGNORE); END"))
    metrics = Metrics(CollectorRegistry())
    values = [json.dumps(episode(i)).encode() for i in range(500)]
    p = Pipeline(s, store, MemorySource(values), JsonlDeadLetterSink(str(tmp_path / "dlq.jsonl"), 1000), metrics)
    t0 = time.monotonic()
    with pytest.raises(NoProgress, match="gave up after 3 batches"):
        p.run()
    took = time.monotonic() - t0
    assert took >= 0.1 + 0.2 + 0.4, "no backoff between rollbacks"
    assert p.stats.stale_batches == 4
    assert metrics.registry.get_sample_value("oversight_stale_batches_total") == 4
    store.close()


def test_an_operation_in_flight_too_long_counts_as_down() -> None:
    """An operation that neither fails nor succeeds turns its target red after ``stall_s`` and
    green when it ends; another target, and an operation that ends in time, are untouched."""
    from monitor.retry import Health, RetryPolicy

    health = Health(stall_s=1.0)  # wide enough that a stalled test host does not make 0.1 s look long
    release = threading.Event()
    policy = RetryPolicy(health)
    assert policy.call(lambda: 1, "store") == 1 and health.ok("store")
    hung = threading.Thread(target=policy.call, args=(release.wait, "store"), daemon=True)
    hung.start()
    time.sleep(0.1)
    assert health.ok("store")  # in flight, not yet for long
    time.sleep(1.2)
    assert not health.ok("store") and health.ok("dead_letter")
    release.set()
    hung.join(5)
    assert not hung.is_alive() and health.ok("store")
    # One attempt outside a retry (the idle write probe) is tracked the same way.
    flushed = threading.Event()
    probe = threading.Thread(target=policy.attempt, args=(flushed.wait, "dead_letter"), daemon=True)
    probe.start()
    time.sleep(1.2)
    assert not health.ok("dead_letter") and health.ok("store")
    flushed.set()
    probe.join(5)
    assert health.ok("dead_letter")


def test_a_lasting_outage_is_warned_about_again(caplog: pytest.LogCaptureFixture) -> None:
    """One warning when a target goes down, one every ``remind_s`` while it stays down (a command
    without /readyz must not retry in silence), one when it is back; none in between."""
    import logging

    from monitor.retry import Health, RetryPolicy

    def flaky(fails: int) -> Callable[[], int]:
        left = [fails]

        def op() -> int:
            if left[0] > 0:
                left[0] -= 1
                raise OSError(28, "No space left on device")
            return 7

        return op

    with caplog.at_level(logging.WARNING, logger="monitor.retry"):
        reminding = RetryPolicy(Health(remind_s=0.05), first_delay_s=0.02, max_delay_s=0.02)
        t0 = time.monotonic()
        assert reminding.call(flaky(12), "dead_letter") == 7
        down_s = time.monotonic() - t0
    lines = [r.getMessage() for r in caplog.records]
    assert sum("dead_letter unavailable, retrying" in m for m in lines) == 1
    reminders = [m for m in lines if "dead_letter still unavailable after" in m]
    # 11 waits of at least 20 ms (0.22 s or more down), a reminder at most every 50 ms.
    assert 2 <= len(reminders) <= down_s / 0.05, lines
    assert "No space left on device" in reminders[0] and "failed attempts" in reminders[0]
    assert sum("dead_letter available again" in m for m in lines) == 1

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="monitor.retry"):
        quiet = RetryPolicy(Health(remind_s=60.0), first_delay_s=0.02, max_delay_s=0.02)
        assert quiet.call(flaky(12), "dead_letter") == 7
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "unavailable, retrying" in lines[0] and "available again" in lines[1], lines


def test_the_start_up_ops_server_says_what_the_service_waits_for() -> None:
    """Before the service exists (``monitor/startup.py``): alive, not ready, ``database`` false while
    the database is awaited, then ``service`` false while the models load; the service then takes
    the same server over with its own checks."""
    from outage_helpers import http_get, metric, readyz
    from prometheus_client import CollectorRegistry

    from monitor.startup import StartingServer

    starting = StartingServer("127.0.0.1", 0)
    port = starting.server.port
    try:
        assert readyz(port) == (503, {"database": False})
        assert http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        assert metric(port, "oversight_ready_check", check="database") == 0.0
        starting.database_open()
        assert readyz(port) == (503, {"database": True, "service": False})
        assert metric(port, "oversight_ready_check", check="database") == 1.0
        starting.server.serve(CollectorRegistry(), lambda: {"source": True, "database": True})
        assert readyz(port) == (200, {"source": True, "database": True})
    finally:
        starting.stop()
