"""Outages of the database: the service stays up, says so in /readyz and the metrics, and recovers
with exactly-once effects.

A private PostgreSQL cluster (Debian's server binaries, its own port and data directory: the
shared server is never touched) is crashed (immediate shutdown: every connection dies mid-statement)
and restarted again and again while ``oversight run`` ingests a pipe that a writer keeps feeding.
The pipe cannot be read twice, so a batch lost or rolled back would show as a missing sample.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from outage_helpers import (
    OVERSIGHT,
    SETTINGS,
    PacedWriter,
    Partition,
    assert_exactly_once,
    can_partition,
    episode,
    free_port,
    http_get,
    metric,
    readyz,
    start_service,
    stop,
    tail,
    wait_for,
)
from pg_cluster import PgCluster

pytestmark = pytest.mark.postgres

READY_WITHIN_S = 5.0  # the bound for /readyz after an outage starts or ends


def traffic(pg: PgCluster, db: str) -> int:
    import sqlalchemy as sa

    engine = sa.create_engine(pg.url(db))
    try:
        with engine.connect() as c:
            return int(c.execute(sa.text("SELECT COALESCE(SUM(episodes), 0) FROM traffic")).scalar_one())
    except sa.exc.DBAPIError:
        return 0
    finally:
        engine.dispose()


class FedService:
    """``oversight run`` on a FIFO that a paced writer keeps feeding (see :func:`fed_service`)."""

    def __init__(self, proc: Any, port: int, writer: PacedWriter, log_path: Path):
        self.proc, self.port, self.writer, self.log_path = proc, port, writer, log_path

    def assert_alive(self, what: str = "") -> None:
        assert self.proc.poll() is None, f"the service exited{what}:\n{tail(self.log_path)}"

    def finish(self) -> int:
        """Close the input; the service reads to its end and exits 0. Returns the records written."""
        n = self.writer.finish()
        rc = self.proc.wait(timeout=60)
        assert rc == 0, f"exit status {rc}:\n{tail(self.log_path)}"
        return n

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def fed_service(db_url: str, tmp_path: Path, *, ready: bool = True) -> Iterator[FedService]:
    """The service on ``db_url``, its input fed at 300 episodes/s; stopped at the end. ``ready``:
    yielded once it is ready (else at once, as it starts)."""
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    port = free_port()
    proc, log = start_service(fifo, db_url, port, tmp_path)
    writer = PacedWriter(fifo, rate=300).start()
    svc = FedService(proc, port, writer, tmp_path / "service.log")
    try:
        if ready:
            wait_for(lambda: proc.poll() is not None or readyz(port)[0] == 200, 60, "ready after start")
            svc.assert_alive(" at start")
        yield svc
    finally:
        writer.abandon()
        stop(proc)
        log.close()
        log.close()


def database_outages(tmp_path: Path, outages: int, down_s: float) -> None:
    with PgCluster() as pg:
        url = pg.create_database("oversight")
        with fed_service(url, tmp_path) as svc:
            port = svc.port
            errors_before = metric(port, "oversight_commit_errors_total", target="store") or 0.0
            for i in range(outages):
                seen = traffic(pg, "oversight")

                def progressed(s: int = seen) -> bool:
                    return traffic(pg, "oversight") > s + 50

                wait_for(progressed, 30, f"progress before outage {i}")
                pg.crash()
                took = wait_for(lambda: readyz(port)[0] == 503, READY_WITHIN_S, f"/readyz 503 in outage {i}")
                code, checks = readyz(port)
                assert code == 503 and checks["database"] is False and checks["source"] is True, checks
                # The gauges come from the same function: they agree with the endpoint.
                assert metric(port, "oversight_ready") == 0.0
                assert metric(port, "oversight_ready_check", check="database") == 0.0
                time.sleep(max(0.0, down_s - took))
                svc.assert_alive(f" in outage {i}")
                pg.start()
                wait_for(lambda: readyz(port)[0] == 200, READY_WITHIN_S, f"/readyz 200 after outage {i}")
                assert metric(port, "oversight_ready") == 1.0
                assert metric(port, "oversight_ready_check", check="database") == 1.0
            errors = metric(port, "oversight_commit_errors_total", target="store") or 0.0
            assert errors >= errors_before + outages, "every outage is counted in oversight_commit_errors_total"
            # One consumer: a batch whose commit reply died with the server is its own, not one
            # another consumer took (it happens when the crash falls between COMMIT and its answer).
            assert metric(port, "oversight_stale_batches_total") == 0.0, tail(svc.log_path)
            n = svc.finish()
        out = svc.log()
        # No traceback through the pipeline's path (other components log theirs: the action worker).
        assert not re.search(r'File ".*/monitor/(pipeline|retry|drift|store|sources|signals|deadletter)', out), out
        assert f"stopped after {n} records" in out, tail(svc.log_path)
        assert_exactly_once(url, [episode(i) for i in range(n)])


def test_a_database_down_at_start_is_waited_for(tmp_path: Path) -> None:
    """The server is down when ``oversight run`` starts: the service waits, alive and not ready
    (``/readyz`` 503, ``database`` false), and starts once the server is up: it migrates, becomes
    ready and stores everything fed to it, exactly once. Before, it exited at once."""
    with PgCluster() as pg:
        url = pg.create_database("oversight")
        pg.stop()
        with fed_service(url, tmp_path, ready=False) as svc:
            port = svc.port
            wait_for(lambda: svc.proc.poll() is not None or readyz(port)[0] == 503, 60, "/readyz 503 while waiting")
            assert readyz(port) == (503, {"database": False})
            time.sleep(3)
            svc.assert_alive(" while the database was down")
            assert traffic(pg, "oversight") == 0
            pg.start()
            wait_for(lambda: readyz(port)[0] == 200, 60, "/readyz 200 once the database is up")
            wait_for(lambda: traffic(pg, "oversight") > 100, 30, "episodes stored")
            n = svc.finish()
        out = svc.log()
        assert "database unavailable at start, waiting for it" in out and "database available after" in out
        assert not re.search(r'File ".*/monitor/', out), tail(svc.log_path)
        assert_exactly_once(url, [episode(i) for i in range(n)])


@pytest.mark.parametrize("command", ["serve", "ingest serve"])
def test_a_web_service_waits_for_a_database_down_at_start(tmp_path: Path, command: str) -> None:
    """The review and ingest servers, started while the server is down: their port answers at once
    (``/healthz`` 200, everything else 503, ``/readyz`` naming the database), and once the server is
    up they migrate, serve and are ready on the same port; SIGTERM then stops them cleanly."""
    import subprocess

    with PgCluster() as pg:
        url = pg.create_database("oversight")
        pg.stop()
        port = free_port()
        args = [OVERSIGHT, *command.split(), "--db", url, "--dev", "--port", str(port)]
        if command == "serve":
            args += ["--set", f"review.metrics_port={free_port()}"]
        log_path = tmp_path / "service.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("OVERSIGHT_")}
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                wait_for(lambda: proc.poll() is not None or readyz(port)[0] == 503, 60, "/readyz 503 while waiting")
                assert readyz(port) == (503, {"database": False}), tail(log_path)
                assert http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200
                time.sleep(2)
                assert proc.poll() is None, tail(log_path)
                pg.start()
                wait_for(lambda: readyz(port)[0] == 200, 60, "/readyz 200 once the database is up")
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=30) == 0, tail(log_path)
            finally:
                stop(proc)
        out = log_path.read_text(errors="replace")
        assert "database available after" in out and "Traceback" not in out, out
        assert ("review UI stopped" if command == "serve" else "ingest API stopped") in out, out


def test_database_outage_mid_stream(tmp_path: Path) -> None:
    """A crash of the database mid-stream: no exit, /readyz red within 5 s and green within 5 s
    of the restart, the gauges agree, exact results (the fast suite's share of the 20 outages)."""
    database_outages(tmp_path, outages=1, down_s=1.5)


@pytest.mark.slow
def test_twenty_database_outages_mid_stream(tmp_path: Path) -> None:
    """The issue's goal: 0 exits over 20 database outages mid-stream, readiness right each time."""
    database_outages(tmp_path, outages=20, down_s=2.0)


def test_every_database_read_of_a_batch_waits_out_an_outage(tmp_path: Path) -> None:
    """The reads on a batch's path (sampling state of a new stream, drift state, the labels
    feed's cursor and new labels, the reward-model registry) meet a database that is down: the
    batch waits for it and commits exactly, instead of the error ending the process."""
    import json
    import threading

    from prometheus_client import CollectorRegistry

    from monitor.config import load_settings
    from monitor.episodes.deadletter import JsonlDeadLetterSink
    from monitor.service import build_service
    from monitor.sources.memory import MemorySource
    from monitor.store import Store

    # The first batch is one stream; the next ones bring streams not loaded yet: reads in the hot loop.
    eps = [episode(i, ("chat",)) for i in range(30)] + [episode(i) for i in range(30, 300)]
    values = [json.dumps(e).encode() for e in eps]
    with PgCluster() as pg:
        url = pg.create_database()
        s = load_settings(None, [*SETTINGS, f"database.url={url}", f"dead_letter.path={tmp_path / 'dlq.jsonl'}"])
        store = Store(url)
        sink = JsonlDeadLetterSink(s.dead_letter.path, s.dead_letter.max_raw_bytes)
        svc = build_service(
            s, source=MemorySource(values), serve=False, store=store, dead_letters=sink, registry=CollectorRegistry()
        )
        assert svc.labels_feed is not None and svc.drift is not None and svc.scorer is not None
        p = svc.pipeline
        p.open()
        assert p.process_batch(p.source.poll(30, 0.0))
        pg.crash()
        seen: list[bool] = []
        watcher_stop = threading.Event()

        def watch() -> None:
            while not watcher_stop.wait(0.05):
                seen.append(p.readiness()["database"])

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        threading.Timer(2.0, pg.start).start()
        t0 = time.monotonic()
        while records := p.source.poll(50, 0.0):
            assert p.process_batch(records)
        waited = time.monotonic() - t0
        watcher_stop.set()
        watcher.join()
        # Read once more after the last batch: on a fast machine every batch after the recovery
        # can commit within the watcher's 50 ms period, and its last reading is then the outage's.
        seen.append(p.readiness()["database"])
        p.close()
        assert waited >= 1.5, "the batches did not meet the outage"
        assert False in seen and seen[-1] is True, "readiness did not show the outage and the recovery"
        store.close()
        assert_exactly_once(url, eps)


@pytest.mark.postgres
def test_a_statement_limit_is_the_records_fault_not_an_outage(pg_url: str) -> None:
    """PostgreSQL raises "stack depth limit exceeded" (SQLSTATE 54001) as an OperationalError.
    Treated as an outage, the batch holding such a value would be retried forever; it must go
    to find_rejected (a dead letter) instead. A connection failure stays an outage."""
    import sqlalchemy as sa

    from monitor.retry import transient

    engine = sa.create_engine(pg_url)
    try:
        with pytest.raises(sa.exc.OperationalError) as deep, engine.connect() as conn:
            conn.execute(sa.text("SELECT (:v)::jsonb"), {"v": "[" * 200_000 + "]" * 200_000})
        assert str(getattr(deep.value.orig, "sqlstate", "")) == "54001"
        assert not transient(deep.value)
    finally:
        engine.dispose()
    down = sa.create_engine("postgresql+psycopg://root@127.0.0.1:1/test")
    with pytest.raises(sa.exc.OperationalError) as refused, down.connect():
        pass
    assert transient(refused.value)


def test_inbox_reads_in_a_database_outage_are_counted_and_retried(tmp_path: Path) -> None:
    """The ingest API's inbox is read from the database the outage took: every refused read is
    an empty poll, counted in ``oversight_source_errors_total{operation="read"}``, the source
    check of /readyz is red, and the rows written before and after are consumed exactly once."""
    import json
    import threading

    from prometheus_client import CollectorRegistry

    from monitor.config import load_settings
    from monitor.episodes.deadletter import JsonlDeadLetterSink
    from monitor.metrics import Metrics
    from monitor.pipeline import Pipeline
    from monitor.sources.inbox import InboxSource
    from monitor.store import Store
    from monitor.store.ingest import Inbox, InboxRow

    eps = [episode(i) for i in range(200)]
    rows = [InboxRow(str(e["episode_id"]), str(e["stream"]), json.dumps(e).encode(), time.time()) for e in eps]
    with PgCluster() as pg:
        url = pg.create_database()
        s = load_settings(None, [*SETTINGS, f"database.url={url}", f"dead_letter.path={tmp_path / 'dlq.jsonl'}"])
        store = Store(url)
        inbox = Inbox(store)
        registry = CollectorRegistry()
        sink = JsonlDeadLetterSink(s.dead_letter.path, s.dead_letter.max_raw_bytes)
        p = Pipeline(s, store, InboxSource(inbox), sink, Metrics(registry, s.metrics.max_streams))

        def errors() -> float:
            return registry.get_sample_value("oversight_source_errors_total", {"operation": "read"}) or 0.0

        stop = threading.Event()
        runner = threading.Thread(target=p.run, args=(stop,), daemon=True)
        try:
            inbox.insert(rows[:100])
            runner.start()
            wait_for(lambda: inbox.position() == rows_end(inbox), 30, "the first rows consumed")
            assert errors() == 0.0
            pg.crash()
            wait_for(lambda: errors() >= 2, READY_WITHIN_S, "refused reads counted")
            assert p.readiness()["source"] is False
            pg.start()
            wait_for(lambda: p.readiness()["source"], READY_WITHIN_S, "the source ready after the outage")
            counted = errors()
            inbox.insert(rows[100:])
            wait_for(lambda: inbox.position() == rows_end(inbox), 30, "the rows written after consumed")
            assert errors() == counted, "reads that succeed are not counted"
        finally:
            stop.set()
            runner.join(30)
        assert not runner.is_alive()
        store.close()
        assert_exactly_once(url, eps)


def rows_end(inbox: Any) -> int:
    """The id after the newest inbox row (the consumer's position once it has read them all)."""
    got = inbox.read(0, 1_000_000)
    return int(got[-1].id) + 1 if got else 0


def stalled_service(url: str, tmp_path: Path, eps: list[dict[str, Any]], *more: str) -> Any:
    """A service over ``eps`` on ``url`` whose operations count as stalled after 1 s (and whose
    batches' statements PostgreSQL cancels after 1 s), its first batch committed."""
    import json

    from prometheus_client import CollectorRegistry

    from monitor.config import load_settings
    from monitor.episodes.deadletter import JsonlDeadLetterSink
    from monitor.service import build_service
    from monitor.sources.memory import MemorySource

    extra = [f"database.url={url}", f"dead_letter.path={tmp_path / 'dlq.jsonl'}", "pipeline.stall_timeout_s=1", *more]
    s = load_settings(None, [*SETTINGS, *extra])
    sink = JsonlDeadLetterSink(s.dead_letter.path, s.dead_letter.max_raw_bytes)
    values = [json.dumps(e).encode() for e in eps]
    # The store as the service opens it (database.*: its timeouts), closed with the service.
    svc = build_service(s, source=MemorySource(values), serve=False, dead_letters=sink, registry=CollectorRegistry())
    svc.pipeline.open()
    assert svc.pipeline.process_batch(svc.pipeline.source.poll(50, 0.0))
    return svc


def the_rest(svc: Any) -> Any:
    """A thread that processes the service's remaining records."""
    import threading

    def run() -> None:
        while records := svc.pipeline.source.poll(50, 0.0):
            assert svc.pipeline.process_batch(records)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.postgres
def test_a_lock_held_elsewhere_is_an_outage_not_a_hang(pg_url: str, tmp_path: Path) -> None:
    """Another session holds a lock the batch needs (a migration, an operator's open
    transaction): the batch's statement is cancelled after ``pipeline.stall_timeout_s``, counted
    as a store error and retried, /readyz shows the database down meanwhile, and the batches
    commit exactly once when the lock goes. Without the timeout the pipeline would wait on the
    lock for as long as it is held, with /readyz green."""
    import sqlalchemy as sa

    from monitor.store.store import normalize_url

    eps = [episode(i, ("chat",)) for i in range(300)]
    svc = stalled_service(pg_url, tmp_path, eps)
    registry = svc.metrics.registry

    def errors() -> float:
        return registry.get_sample_value("oversight_commit_errors_total", {"target": "store"}) or 0.0

    assert errors() == 0.0
    locker = sa.create_engine(normalize_url(pg_url))
    conn = locker.connect()
    lock = conn.begin()
    conn.execute(sa.text("LOCK TABLE offsets IN ACCESS EXCLUSIVE MODE"))
    try:
        runner = the_rest(svc)
        wait_for(lambda: not svc.pipeline.readiness()["database"], READY_WITHIN_S, "/readyz shows the lock wait")
        wait_for(lambda: errors() >= 2, READY_WITHIN_S, "the cancelled statements counted")
        assert runner.is_alive(), "the batch gave up instead of waiting the lock out"
    finally:
        lock.rollback()
        conn.close()
        locker.dispose()
    runner.join(30)
    assert not runner.is_alive()
    assert svc.pipeline.readiness()["database"]
    assert svc.pipeline.stats.records == len(eps) and svc.pipeline.stats.stale_batches == 0
    svc.close()
    assert_exactly_once(pg_url, eps)


def test_a_frozen_database_shows_in_readyz(tmp_path: Path) -> None:
    """Every server process stopped (SIGSTOP: a storage or VM stall): the kernel still accepts
    the batch's bytes, so no error comes and no timeout of the connection fires. /readyz must
    show the database down once the batch has been in flight for ``pipeline.stall_timeout_s``,
    and up again when the server resumes and the batches commit, exactly once."""
    eps = [episode(i, ("chat",)) for i in range(300)]
    with PgCluster() as pg:
        url = pg.create_database()
        svc = stalled_service(url, tmp_path, eps)
        registry = svc.metrics.registry
        errors_before = registry.get_sample_value("oversight_commit_errors_total", {"target": "store"})
        pg.freeze()
        try:
            runner = the_rest(svc)
            took = wait_for(lambda: not svc.pipeline.readiness()["database"], 1 + READY_WITHIN_S, "/readyz red")
            assert took >= 0.9, "red before the operation had been in flight for the stall timeout"
            # Nothing failed: the readiness comes from the operation in flight alone.
            assert registry.get_sample_value("oversight_commit_errors_total", {"target": "store"}) == errors_before
            time.sleep(1.0)
            assert runner.is_alive() and not svc.pipeline.readiness()["database"]
        finally:
            pg.thaw()
        runner.join(30)
        assert not runner.is_alive()
        wait_for(lambda: svc.pipeline.readiness()["database"], READY_WITHIN_S, "/readyz green after the thaw")
        assert svc.pipeline.stats.records == len(eps)
        svc.close()
        assert_exactly_once(url, eps)


def test_a_failover_to_a_standby_keeps_exactly_once(tmp_path: Path) -> None:
    """The primary dies mid-stream and its synchronous standby is promoted (what a managed
    PostgreSQL or Patroni does). The service is given both servers in one libpq URL with
    ``target_session_attrs=read-write``: it is red while neither accepts writes (the standby
    refuses them until its promotion), moves to the new primary without a restart, and every
    record lands exactly once. Synchronous replication is what makes a commit the service saw
    survive the failover (README, "Database failover")."""
    with PgCluster() as primary:
        primary.create_database("oversight")
        standby = PgCluster(standby_of=primary)
        try:
            standby.start()
            primary.replicate_synchronously()
            both = (
                f"postgresql://postgres@/oversight?host=127.0.0.1:{primary.port}&host=127.0.0.1:{standby.port}"
                "&target_session_attrs=read-write"
            )
            with fed_service(both, tmp_path) as svc:
                port = svc.port
                wait_for(lambda: traffic(primary, "oversight") > 300, 30, "progress on the primary")
                primary.crash()  # and it stays down: the standby takes over
                wait_for(lambda: readyz(port)[0] == 503, READY_WITHIN_S, "/readyz 503 without a primary")
                time.sleep(1.5)  # the failover's detection and decision, as an orchestrator takes them
                assert readyz(port)[0] == 503, "ready while no server accepts writes"
                svc.assert_alive(" without a primary")
                standby.promote()
                wait_for(lambda: readyz(port)[0] == 200, READY_WITHIN_S, "/readyz 200 on the new primary")
                moved = traffic(standby, "oversight")
                wait_for(lambda: traffic(standby, "oversight") > moved + 100, 30, "progress on the new primary")
                assert metric(port, "oversight_stale_batches_total") == 0.0, tail(svc.log_path)
                n = svc.finish()
            assert f"stopped after {n} records" in svc.log(), tail(svc.log_path)
            assert_exactly_once(standby.url("oversight"), [episode(i) for i in range(n)])
        finally:
            standby.destroy()


def test_an_asynchronous_failover_reads_the_lost_batches_again(tmp_path: Path) -> None:
    """The standby is promoted without the last batches the primary had acknowledged
    (asynchronous replication, its link lost first). The service finds its offset behind what it
    committed: a loss, not another consumer. It counts it, and reads the source again from the
    stored offset, so the new primary ends with every record once."""
    eps = [episode(i, ("chat", "search")) for i in range(400)]
    with PgCluster() as primary:
        primary.create_database("oversight")
        standby = PgCluster(standby_of=primary)
        try:
            standby.start()
            both = (
                f"postgresql://postgres@/oversight?host=127.0.0.1:{primary.port}&host=127.0.0.1:{standby.port}"
                "&target_session_attrs=read-write"
            )
            svc = stalled_service(both, tmp_path, eps)  # its first batch committed
            p = svc.pipeline
            assert p.process_batch(p.source.poll(50, 0.0))
            wait_for(lambda: traffic(standby, "oversight") == 100, 10, "the standby has the first batches")
            standby.detach()
            for _ in range(2):  # acknowledged by the primary alone
                assert p.process_batch(p.source.poll(50, 0.0))
            primary.crash()
            standby.promote()
            assert traffic(standby, "oversight") == 100, "the new primary lacks the last two batches"
            while records := p.source.poll(50, 0.0):
                p.process_batch(records)
            assert p.stats.offset_regressions == 1 and p.stats.stale_batches == 0
            assert svc.metrics.registry.get_sample_value("oversight_offset_regressions_total") == 1.0
            assert p.readiness()["database"]
            svc.close()
            assert_exactly_once(standby.url("oversight"), eps)
        finally:
            standby.destroy()


def test_a_primary_that_replicates_asynchronously_is_named_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A failover can lose acknowledged commits only where commits do not wait for a standby:
    the service says so when it starts, and not for a synchronous pair, a lone server or SQLite."""
    import logging

    from monitor.service.build import warn_of_asynchronous_replication
    from monitor.store import Replication, Store

    def warned(store: Store) -> bool:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="monitor.service.build"):
            warn_of_asynchronous_replication(store)
        return "replicates asynchronously to 1 standby" in caplog.text

    with PgCluster() as primary:
        url = primary.create_database("oversight")
        store = Store(url)
        assert store.replication() == Replication(0, False) and not warned(store)  # a lone server
        standby = PgCluster(standby_of=primary)
        try:
            standby.start()
            wait_for(lambda: store.replication() == Replication(1, False), 10, "the standby attached")
            assert warned(store)
            primary.replicate_synchronously()  # a reload: sessions read it at their next statement or so
            wait_for(lambda: store.replication() == Replication(1, True), 10, "the setting reloaded")
            assert not warned(store)
        finally:
            store.close()
            standby.destroy()
    lite = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    assert lite.replication() is None and not warned(lite)
    lite.close()


@pytest.mark.skipif(not can_partition(), reason="needs root with network namespaces (as in CI)")
def test_a_network_partition_is_an_outage_not_a_hang(tmp_path: Path) -> None:
    """The database's network goes silent mid-stream (a partition, a host gone, a failover that
    moved its address): what the batch sends is dropped without a reset or a refusal, so the
    driver would wait for the kernel's retransmissions to give up, about 15 minutes. /readyz
    shows the database down after ``pipeline.stall_timeout_s``; the dead connection is closed
    after ``database.tcp_timeout_s``, counted as a store error, and retried; when the network
    heals the batches commit, exactly once."""
    eps = [episode(i, ("chat",)) for i in range(300)]
    with Partition() as net, PgCluster(host=net.server_ip, netns=net.name) as pg:
        url = pg.create_database()
        svc = stalled_service(url, tmp_path, eps, "database.tcp_timeout_s=2")
        registry = svc.metrics.registry

        def errors() -> float:
            return registry.get_sample_value("oversight_commit_errors_total", {"target": "store"}) or 0.0

        assert errors() == 0.0
        net.cut()
        try:
            runner = the_rest(svc)
            wait_for(lambda: not svc.pipeline.readiness()["database"], 1 + READY_WITHIN_S, "/readyz red")
            wait_for(lambda: errors() >= 1, 2 + READY_WITHIN_S, "the silent connection closed and counted")
            assert runner.is_alive(), "the batch gave up instead of retrying"
        finally:
            net.heal()
        runner.join(60)
        assert not runner.is_alive()
        wait_for(lambda: svc.pipeline.readiness()["database"], READY_WITHIN_S, "/readyz green after the heal")
        assert svc.pipeline.stats.records == len(eps) and svc.pipeline.stats.stale_batches == 0
        svc.close()
        assert_exactly_once(url, eps)


# A replica that stopped mid-transaction (its node gone, its network cut, its process paused),
# holding a lock others need: the row of the offset its batch moves ("batch"), or the inbox's
# ordering lock ("inbox"). Its transaction never ends on its own.
ZOMBIE = """
import sys, time
import monitor.store.ingest as ingest
from monitor.store import BatchWrite, Store

mode, url, timeout_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
store = Store(url, migrate=False)


def paused(*args, **kwargs):  # the lock is taken: stop here
    print("holding", flush=True)
    time.sleep(3600)


if mode == "batch":  # right after the compare-and-set, which locked the offset's row
    store.insert_ignore = paused
    expected = int(sys.argv[5])
    store.commit_batch(BatchWrite(offsets={(sys.argv[4], 0): (expected, expected + 1)}), timeout_s=timeout_s)
else:  # right after the advisory lock, before the rows
    ingest._insert = paused
    ingest.Inbox(store, timeout_s).insert([ingest.InboxRow("z", "s", b"{}", 0.0)])
"""


def stopped_writer(mode: str, url: str, *args: str) -> Any:
    """The stopped writer (a subprocess), once it holds its lock; its transactions' limits are 1 s."""
    import subprocess
    import sys

    zombie = subprocess.Popen(
        [sys.executable, "-c", ZOMBIE, mode, url, "1.0", *args], stdout=subprocess.PIPE, text=True
    )
    assert zombie.stdout is not None and zombie.stdout.readline().strip() == "holding"
    return zombie


@pytest.mark.postgres
def test_a_replica_stopped_mid_batch_does_not_hold_the_offsets(pg_url: str, tmp_path: Path) -> None:
    """Another replica stopped in the middle of its batch's transaction, holding the row lock of
    the offset this one must move. The server keeps such a session until its TCP keepalive
    notices, two hours by default; the batch's idle-in-transaction timeout ends it after
    ``pipeline.stall_timeout_s``, and this replica's batches commit, exactly once, while the
    stopped one is still alive."""
    eps = [episode(i, ("chat",)) for i in range(300)]
    svc = stalled_service(pg_url, tmp_path, eps)
    source = svc.pipeline.source.name
    zombie = stopped_writer("batch", pg_url, source, str(svc.store.load_offsets(source)[0]))
    try:
        t0 = time.monotonic()
        runner = the_rest(svc)
        runner.join(20)
        assert not runner.is_alive(), "the stopped replica's lock held the batches"
        assert time.monotonic() - t0 < 15
        assert zombie.poll() is None, "the lock was freed by the replica exiting, not by the server"
    finally:
        zombie.kill()
        zombie.wait(10)
    assert svc.pipeline.stats.records == len(eps) and svc.pipeline.stats.stale_batches == 0
    svc.close()
    assert_exactly_once(pg_url, eps)


@pytest.mark.postgres
def test_an_ingest_writer_stopped_mid_insert_does_not_hold_the_inbox(pg_url: str) -> None:
    """An ingest replica stopped inside an inbox insert, holding the lock that orders the
    inbox's ids: another replica's insert waits at most ``ingest.inbox_timeout_s`` (then 503,
    and the client retries), and once the server has ended the stopped transaction (idle for as
    long) the inserts go through, while the stopped replica is still alive."""
    import threading

    import sqlalchemy as sa

    from monitor.store import Store
    from monitor.store.ingest import Inbox, InboxRow

    store = Store(pg_url)
    inbox = Inbox(store, timeout_s=1.0)
    rows = [InboxRow(f"e{i}", "s", b"{}", time.time()) for i in range(3)]
    waits: list[float] = []  # how long each refused insert waited
    taken: set[tuple[str, str]] = set()

    def insert_until_taken() -> None:  # as a client does: retry after a 503
        while not taken:
            t0 = time.monotonic()
            try:
                taken.update(inbox.insert(rows))
            except sa.exc.OperationalError:  # cancelled while the lock was held: the API's 503
                waits.append(time.monotonic() - t0)
                time.sleep(0.2)

    zombie = stopped_writer("inbox", pg_url)
    try:
        client = threading.Thread(target=insert_until_taken, daemon=True)
        client.start()
        client.join(15)
        assert not client.is_alive(), "the stopped writer kept the inbox's lock"
        assert taken == {("s", "e0"), ("s", "e1"), ("s", "e2")} and all(w < 5 for w in waits), waits
        assert zombie.poll() is None, "the lock was freed by the writer exiting, not by the server"
    finally:
        zombie.kill()
        zombie.wait(10)
    assert [r.id for r in inbox.read(0, 10)] == sorted(r.id for r in inbox.read(0, 10)) and inbox.count() == 3
    store.close()
