"""The Kafka source against a real Kafka-protocol broker (Tansu): sampling, dead letters,
offsets in the database, resume after restart, the CLI's SIGTERM drain."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.kafka

STREAMS = ("chat", "code", "search")


def _group() -> str:
    return f"g-{uuid.uuid4().hex[:8]}"


def _wait_committed(kenv: Any, group: str, topic: str, ends: dict[int, int], timeout_s: float = 10.0) -> dict[int, int]:
    deadline = time.monotonic() + timeout_s
    got: dict[int, int] = {}
    while time.monotonic() < deadline:
        got = kenv.committed(group, topic)
        if all(got.get(p) == o for p, o in ends.items()):
            break
        time.sleep(0.2)
    return got


def test_valid_and_invalid_records(kenv: Any, db_url: str) -> None:
    topic, group = kenv.topic(partitions=3), _group()
    eps = [kenv.episode(i, s) for i in range(40) for s in STREAMS]
    ends = kenv.produce_episodes(topic, eps)
    bad = [(raw, reason) for raw, reason in kenv.bad_records] + [(None, "invalid_json")]  # a tombstone
    bad_ends = kenv.produce(topic, [(b"bad-key", raw) for raw, _ in bad])
    for p, o in bad_ends.items():
        ends[p] = max(ends.get(p, 0), o)
    assert sum(ends.values()) == len(eps) + len(bad)

    settings = kenv.settings(topic, group, db_url)
    source = kenv.source_name(group, topic)
    stats = kenv.run_until(settings, lambda store: kenv.offsets_reached(db_url, source, ends))

    assert stats.records == len(eps) + len(bad)
    assert stats.invalid == len(bad)
    kenv.assert_exactly_once(db_url, settings, eps)
    offsets = dict(kenv.db_rows(db_url, f"SELECT partition, next_offset FROM offsets WHERE source = '{source}'"))
    assert {int(p): int(o) for p, o in offsets.items()} == ends

    # Every invalid record is on <topic>.dlq once, with its reason and its raw bytes.
    letters = kenv.consume_all(f"{topic}.dlq", expect=len(bad))
    assert len(letters) == len(bad)
    want = sorted(((raw or b""), reason) for raw, reason in bad)
    got = []
    for m in letters:
        h = dict(m.headers)
        got.append((m.value, h["oversight.error.reason"].decode()))
        assert h["oversight.source"].decode() == source
        assert m.key == b"bad-key"
        assert h["oversight.raw_truncated"] == b"false"
        assert int(h["oversight.size"]) == len(m.value)
    assert sorted(got) == want

    # Kafka's committed offsets (lag tooling) reach the end too.
    assert _wait_committed(kenv, group, topic, ends) == ends


def test_a_record_with_a_huge_key_is_a_dead_letter_not_a_stall(kenv: Any, sqlite_url: str) -> None:
    """A broker that takes large messages (Tansu takes any; Kafka with message.max.bytes raised)
    delivers an invalid record whose key is 1.5 MB. Its dead letter kept the whole key, passed
    the producer's request size, was refused at every retry, and the pipeline waited on it
    forever with nothing after it processed. The key is cut now, its size and hash kept."""
    import hashlib

    topic, group = kenv.topic(), _group()
    eps = [kenv.episode(i, "chat") for i in range(30)]
    big_key = bytes(range(256)) * 6000
    items = [(b"chat", json.dumps(e).encode()) for e in eps[:10]] + [(big_key, b'{"episode_id": "cut')]
    ends = kenv.produce(topic, items + [(b"chat", json.dumps(e).encode()) for e in eps[10:]])
    settings = kenv.settings(topic, group, sqlite_url)
    source = kenv.source_name(group, topic)
    stats = kenv.run_until(settings, lambda store: kenv.offsets_reached(sqlite_url, source, ends), timeout_s=45)
    assert stats.records == 31 and dict(stats.dead_letters) == {"invalid_json": 1}
    kenv.assert_exactly_once(sqlite_url, settings, eps)
    [letter] = kenv.consume_all(f"{topic}.dlq", expect=1)
    h = dict(letter.headers)
    assert letter.value == b'{"episode_id": "cut' and letter.key == big_key[:1024]
    assert int(h["oversight.key_size"]) == len(big_key)
    assert h["oversight.key_sha256"].decode() == hashlib.sha256(big_key).hexdigest()


def test_letters_the_broker_refuses_for_their_size_go_without_their_raw_bytes(kenv: Any) -> None:
    """A dead-letter topic whose max.message.bytes is below the episodes topic's refuses a large
    letter at every retry: the batch would wait forever. The letter goes again without its raw
    bytes (reason, position, size and hash kept) and is counted. Tansu enforces no message size,
    so a stand-in for a broker that does fails the sends of values over 10,000 bytes as Kafka
    answers them (``MessageSizeTooLargeError`` on the future); the rest is the real producer and
    broker."""
    import hashlib

    from kafka.errors import MessageSizeTooLargeError

    from monitor.config import KafkaConfig
    from monitor.episodes.deadletter import DeadLetter, KafkaDeadLetterSink

    topic = kenv.topic()
    dropped: list[int] = []
    sink = KafkaDeadLetterSink(
        KafkaConfig(bootstrap_servers=[kenv.bootstrap], topic=topic), 900_000, on_raw_dropped=dropped.append
    )
    send = sink._producer.send

    class Refused:
        """The future of a send the broker answered MESSAGE_TOO_LARGE."""

        def get(self, timeout: float | None = None) -> Any:
            raise MessageSizeTooLargeError("over the topic's max.message.bytes")

    def enforcing(t: str, value: bytes, **kw: Any) -> Any:
        return Refused() if len(value) > 10_000 else send(t, value=value, **kw)

    sink._producer.send = enforcing
    small, large = b'{"a": "small"}', b'{"a": "' + b"L" * 50_000 + b'"}'
    for i, raw in enumerate((small, large)):
        sink.send(DeadLetter("invalid_json", "cut off", raw, "kafka:g:t", 0, i, 0.0, len(raw), b"chat"))
    sink.close()
    assert dropped == [1]
    letters = {int(dict(m.headers)["oversight.source.offset"]): m for m in kenv.consume_all(f"{topic}.dlq", expect=2)}
    assert letters[0].value == small and "oversight.raw_dropped" not in dict(letters[0].headers)
    h = dict(letters[1].headers)
    assert letters[1].value == b"" and h["oversight.raw_dropped"] and h["oversight.raw_truncated"] == b"true"
    assert h["oversight.raw_sha256"].decode() == hashlib.sha256(large).hexdigest()
    assert int(h["oversight.size"]) == len(large) and h["oversight.error.reason"] == b"invalid_json"


def test_restart_resumes_from_database_offsets(kenv: Any, db_url: str) -> None:
    from kafka import KafkaAdminClient, TopicPartition
    from kafka.structs import OffsetAndMetadata

    topic, group = kenv.topic(partitions=3), _group()
    first = [kenv.episode(i, s) for i in range(60) for s in STREAMS]
    ends = kenv.produce_episodes(topic, first)
    settings = kenv.settings(topic, group, db_url, "pipeline.batch_size=20")
    source = kenv.source_name(group, topic)

    def total(store: Any) -> int:
        return sum(store.load_offsets(source).values())

    # Stop part-way (at least two batches in).
    kenv.run_until(settings, lambda store: total(store) >= 40)
    done_first = sum(int(o) for _, o in kenv.db_rows(db_url, "SELECT partition, next_offset FROM offsets"))
    assert 40 <= done_first <= len(first)

    # The database, not Kafka, decides where to resume: rewind the group's Kafka offsets
    # to 0; resuming from them would count the first records twice.
    admin = KafkaAdminClient(bootstrap_servers=kenv.bootstrap)
    try:
        admin.alter_group_offsets(group, {TopicPartition(topic, p): OffsetAndMetadata(0, "", -1) for p in ends})
    finally:
        admin.close()
    assert all(o == 0 for o in kenv.committed(group, topic).values())

    second = [kenv.episode(i, s) for i in range(60, 120) for s in STREAMS]
    for p, o in kenv.produce_episodes(topic, second).items():
        ends[p] = max(ends.get(p, 0), o)
    kenv.run_until(settings, lambda store: kenv.offsets_reached(db_url, source, ends))

    kenv.assert_exactly_once(db_url, settings, first + second)
    assert _wait_committed(kenv, group, topic, ends) == ends


def test_stale_batch_rewinds_every_partition(kenv: Any, sqlite_url: str) -> None:
    """A batch rolled back as stale is redone in full, including partitions that had no stored offset."""
    import sqlalchemy as sa

    from monitor.store import tables as t

    topic, group = kenv.topic(partitions=3), _group()
    eps = [kenv.episode(i, s) for i in range(20) for s in ("s0", "s1", "s2", "s3", "s4", "s5")]
    ends = kenv.produce_episodes(topic, eps)
    assert len(ends) >= 2
    settings = kenv.settings(topic, group, sqlite_url, "pipeline.batch_size=1000")
    source = kenv.source_name(group, topic)
    injected: list[int] = []

    def prepare(svc: Any) -> None:
        store = svc.store
        real = store.commit_batch

        def commit_batch(batch: Any, **kw: Any) -> None:
            fresh = sorted(p for (_, p), (expected, _) in batch.offsets.items() if expected is None)
            if not injected and len(batch.offsets) >= 2 and fresh:
                # Another consumer "created" one partition's offset at 0 meanwhile.
                injected.append(fresh[0])
                with store.engine.begin() as c:
                    c.execute(
                        sa.insert(t.offsets).values(source=source, partition=fresh[0], next_offset=0, updated_at=0.0)
                    )
            real(batch, **kw)

        store.commit_batch = commit_batch

    stats = kenv.run_until(
        settings, lambda store: kenv.offsets_reached(sqlite_url, source, ends), timeout_s=30, prepare=prepare
    )
    assert injected, "no batch spanned two fresh partitions; the scenario did not happen"
    assert stats.stale_batches == 1
    kenv.assert_exactly_once(sqlite_url, settings, eps)


def test_cli_run_drains_on_sigterm(kenv: Any, tmp_path: Path) -> None:
    topic, group = kenv.topic(partitions=2), _group()
    eps = [kenv.episode(i, s) for i in range(50) for s in STREAMS]
    ends = kenv.produce_episodes(topic, eps)
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    source = kenv.source_name(group, topic)
    args = ["--dev", "--db", db, "--set", "server.port=0"]
    for item in kenv.overrides(topic, group, db):
        if not item.startswith(("dev=", "database.url=")):
            args += ["--set", item]
    log = tmp_path / "run.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "monitor.cli", "run", *args],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=kenv.env_without_oversight(),
        )
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                if Path(tmp_path / "cli.db").exists() and kenv.offsets_reached(db, source, ends):
                    break
                time.sleep(0.2)
            assert proc.poll() is None, log.read_text()[-3000:]
            assert kenv.offsets_reached(db, source, ends), log.read_text()[-3000:]
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=10)
            elapsed = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    out = log.read_text()
    assert rc == 0, out[-3000:]
    assert elapsed < 10
    assert "signal SIGTERM: draining" in out
    assert f"stopped after {len(eps)} records (0 invalid, 0 duplicates)" in out
    kenv.assert_exactly_once(db, kenv.settings(topic, group, db), eps)
    assert _wait_committed(kenv, group, topic, ends, timeout_s=2) == ends


def test_database_decides_where_an_unseen_partition_starts(kenv: Any, sqlite_url: str) -> None:
    """A fresh (or reset) database against a group whose Kafka offsets are at the end: the
    database has no offsets, so every record is read (auto_offset_reset), none skipped."""
    from kafka import KafkaAdminClient, TopicPartition
    from kafka.structs import OffsetAndMetadata

    topic, group = kenv.topic(partitions=2), _group()
    eps = [kenv.episode(i, s) for i in range(30) for s in STREAMS]
    ends = kenv.produce_episodes(topic, eps)
    admin = KafkaAdminClient(bootstrap_servers=kenv.bootstrap)
    try:
        admin.alter_group_offsets(
            group, {TopicPartition(topic, p): OffsetAndMetadata(o, "", -1) for p, o in ends.items()}
        )
    finally:
        admin.close()
    settings = kenv.settings(topic, group, sqlite_url)
    source = kenv.source_name(group, topic)
    stats = kenv.run_until(settings, lambda store: kenv.offsets_reached(sqlite_url, source, ends))
    assert stats.records == len(eps)
    kenv.assert_exactly_once(sqlite_url, settings, eps)


def _gauged(svc: Any) -> set[str]:
    """The partitions of a service's ``oversight_consumer_lag`` series."""
    return {
        sample.labels["partition"]
        for metric in svc.metrics.registry.collect()
        if metric.name == "oversight_consumer_lag"
        for sample in metric.samples
    }


class _NothingStored:
    def assigned(self, partitions: list[int]) -> dict[int, int]:
        return {}

    def revoked(self, partitions: list[int]) -> None:
        pass


def test_the_lag_counts_partitions_nothing_was_taken_from_yet(kenv: Any, sqlite_url: str) -> None:
    """A replica behind takes its records a partition at a time: a partition it has not reached
    yet (no stored offset, nothing fetched from it taken) was left out of the lag, so the lag
    said a quarter of the backlog. It starts where auto_offset_reset puts it, asked of the broker."""
    from monitor.sources.kafka import KafkaSource

    topic, group = kenv.topic(partitions=2), _group()
    # Records of 2 KB: a fetch holds at most 1 MB of a partition, and the consumer hands out one
    # partition's fetch before the next one's.
    eps = [{**kenv.episode(i, s), "prompt": "p" * 2000} for i in range(700) for s in STREAMS]
    ends = kenv.produce_episodes(topic, eps)
    assert all(ends.values())
    settings = kenv.settings(topic, group, sqlite_url, "kafka.max_poll_records=5")
    source = KafkaSource(settings.kafka)
    source.open(_NothingStored())
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not source.lag():
            source.poll(5, 0.2)  # taken slowly, never committed: a partition at a time
            time.sleep(0.05)
        # Nothing was committed: both partitions are behind, the one not reached yet too.
        lag = source.lag()
        assert set(lag) == set(ends) and all(0 < lag[p] <= ends[p] for p in ends), (lag, ends)
    finally:
        source.close()


def test_second_replica_joining_mid_stream_rebalances_without_loss(kenv: Any, pg_url: str) -> None:
    """Two in-process replicas in one group; the second joins while the first is busy, taking
    partitions away from it (revocation with batches in flight). Effects stay exactly-once and
    per-stream sampling state moves with the partitions."""
    import threading

    from prometheus_client import CollectorRegistry

    from monitor.service import build_service

    topic, group = kenv.topic(partitions=3), _group()
    streams = [f"s{i}" for i in range(9)]
    eps = [kenv.episode(i, s) for i in range(400) for s in streams]
    ends = kenv.produce_episodes(topic, eps)
    settings = kenv.settings(topic, group, pg_url, "pipeline.batch_size=25")
    source = kenv.source_name(group, topic)
    services = [build_service(settings, serve=False, registry=CollectorRegistry()) for _ in range(2)]
    for svc in services:
        # Slow commits (a busy database) so the first replica is still working when the
        # second one's join (a few seconds) completes.
        real = svc.store.commit_batch

        def slow_commit(batch: Any, real: Any = real, **kw: Any) -> None:
            time.sleep(0.03)
            real(batch, **kw)

        svc.store.commit_batch = slow_commit  # type: ignore[method-assign]
    stops = [threading.Event(), threading.Event()]
    threads = [
        threading.Thread(target=svc.pipeline.run, args=(stop,), daemon=True)
        for svc, stop in zip(services, stops, strict=True)
    ]
    threads[0].start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (
            sum(services[0].store.load_offsets(source).values()) < 100 or len(_gauged(services[0])) < 3
        ):
            time.sleep(0.05)
        threads[1].start()
        deadline = time.monotonic() + 90
        while not kenv.offsets_reached(pg_url, source, ends) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert kenv.offsets_reached(pg_url, source, ends)
        time.sleep(2.5)  # the lag is published once a second
        # Each replica's lag gauge names the partitions it holds, no more: the first one's series of
        # the partitions it lost were kept at their last value and added into every sum.
        for svc in services:
            held = {str(p) for p in svc.pipeline.source.lag()}
            assert held and _gauged(svc) == held, (_gauged(svc), held)
    finally:
        for stop in stops:
            stop.set()
        for th in threads:
            if th.is_alive() or th.ident is not None:
                th.join(30)
        for svc in services:
            # The whole service: its outbox relays would otherwise go on publishing (and logging
            # failures) after the test's schema is dropped.
            svc.close()
    both = [svc.pipeline.stats.records for svc in services]
    assert both[1] > 0, f"the second replica never got a partition: {both}"
    kenv.assert_exactly_once(pg_url, settings, eps)
    # The stream states checkpointed by whichever replica owned them cover every stream.
    states = {r[0] for r in kenv.db_rows(pg_url, "SELECT stream FROM stream_state WHERE component = 'sampling'")}
    assert states == set(streams)


test_second_replica_joining_mid_stream_rebalances_without_loss = pytest.mark.postgres(
    test_second_replica_joining_mid_stream_rebalances_without_loss
)


def test_the_consumer_holds_a_fetch_no_longer_than_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    """``kafka.fetch_max_wait_ms`` reaches the consumer. Tansu holds a fetch for that long whenever
    one requested partition has nothing new, so a consumer whose partitions drain unevenly read
    in bursts 500 ms apart at kafka-python's default (bench/kafka_ingest.py --fetch-wait-ms)."""
    import kafka

    from monitor.config import KafkaConfig
    from monitor.sources.kafka import KafkaSource

    seen: dict[str, Any] = {}

    class Captured(Exception):
        pass

    def consumer(**kwargs: Any) -> None:
        seen.update(kwargs)
        raise Captured

    class NoOffsets:
        def assigned(self, partitions: list[int]) -> dict[int, int]:
            return {}

        def revoked(self, partitions: list[int]) -> None:
            pass

    monkeypatch.setattr(kafka, "KafkaConsumer", consumer)
    for wait in (None, 20):
        cfg = KafkaConfig() if wait is None else KafkaConfig(fetch_max_wait_ms=wait)
        with pytest.raises(Captured):
            KafkaSource(cfg).open(NoOffsets())
        assert seen["fetch_max_wait_ms"] == (500 if wait is None else 20)


class _Stored:
    """The offsets the database stored for the source's partitions."""

    def __init__(self, offsets: dict[int, int]) -> None:
        self.offsets = offsets

    def assigned(self, partitions: list[int]) -> dict[int, int]:
        return {p: o for p, o in self.offsets.items() if p in partitions}

    def revoked(self, partitions: list[int]) -> None:
        pass


def test_a_stored_offset_past_the_logs_end_makes_the_replica_not_ready(
    kenv: Any, sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The topic was deleted and created again (or its log cut back) since the database stored its
    offset: the replica read nothing of the new log until it reached the old offset, and never what
    came before, while the lag said 0 and /readyz 200. Now it is not ready and says why; a stored
    offset inside the log is ready as before."""
    from monitor.sources.kafka import KafkaSource

    topic, group = kenv.topic(partitions=1), _group()
    ends = kenv.produce_episodes(topic, [kenv.episode(i, "chat") for i in range(10)])
    settings = kenv.settings(topic, group, sqlite_url)
    for stored, ready in ((300, False), (4, True)):
        source = KafkaSource(settings.kafka)
        source.open(_Stored({0: stored}))
        try:
            deadline = time.monotonic() + 20
            taken = 0
            while time.monotonic() < deadline and (0 not in source.lag() or source.ready() is not ready):
                taken += len(source.poll(100, 0.2))
            assert source.ready() is ready, (stored, source.lag())
            assert source.lag()[0] == (0 if stored > ends[0] else ends[0] - stored)
        finally:
            source.close()
        said = [r.getMessage() for r in caplog.records if "past the log's end" in r.getMessage()]
        assert bool(said) is not ready, said
        if not ready:
            assert taken == 0  # nothing of the new log is read
        caplog.clear()
