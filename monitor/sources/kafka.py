"""Kafka source (kafka-python): consumer group, offsets stored in the database.

At-least-once delivery with exactly-once effects on the store: offsets are
committed to the database in the same transaction as the rows a batch
produced, and on every assignment the consumer seeks to the database's
offsets (or, for a partition the database has never seen, to the start or
end per ``auto_offset_reset``; Kafka's committed offsets are written for lag
tooling but never read back, so a reset database cannot silently skip
records). Per-stream state belongs to whichever replica owns the partition
that the stream's key hashes to, so producers must key episodes by ``stream``.

Fetching overlaps processing: a consumer thread owns the (non-thread-safe)
KafkaConsumer, polls, and hands batches to the pipeline through a bounded
queue. Two things keep that safe:

- ``guard()``: the pipeline holds a lock while it processes and commits a
  batch, and rebalance callbacks take the same lock, so a partition is never
  revoked with one of its batches half committed;
- generations: every rebalance and rewind starts a new generation, queued
  batches of an older one are dropped, and ``guard()`` refuses them.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from monitor.config import KafkaConfig
from monitor.sources.base import SOURCE_OPERATIONS, Rebalance, Record

log = logging.getLogger(__name__)

QUEUE_BATCHES = 4
LAG_LOOKUP_MS = 2000  # the longest the consumer thread waits for the offsets of a partition not fetched yet
# The source is ready while the consumer thread saw the broker this recently: connected to the
# group coordinator and to the leader of every assigned partition (kafka-python's poll returns
# empty batches while the broker is down, so a poll that returned proves nothing).
CONTACT_S = 3.0
# Between polls that raised a retriable error: short, so ingest resumes within a second of the
# broker's return (as RECONNECT_BACKOFF_MAX_MS does for the client's own reconnects).
POLL_BACKOFF_MAX_S = 1.0
BOOTSTRAP_TIMEOUT_MS = 5000
RECONNECT_BACKOFF_MAX_MS = 1000
# A record kafka-python cannot decode (see KafkaSource._undecodable): how long a probe waits for one
# partition's next record, and how many decoding failures in a row no probe could place before the
# consumer thread gives up as it did before.
PROBE_S = 2.0
UNPLACED_MAX = 5


def decoding_failure(e: BaseException) -> bool:
    """Whether ``e`` was raised while kafka-python decoded fetched records (a codec it lacks, a
    compressed payload that does not decompress, a header key that is not UTF-8, a CRC that fails)
    rather than by the broker or the network: the frames it passed through say so.

    >>> decoding_failure(ValueError("not from kafka-python"))
    False
    """
    tb = e.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "_unpack_records" or "/kafka/record/" in code.co_filename.replace("\\", "/"):
            return True
        tb = tb.tb_next
    return False


def retriable(e: BaseException) -> bool:
    """Whether kafka-python marks ``e`` retriable (a connection refused or reset, a timeout, a
    coordinator not available yet): an outage to wait out, not a fault of this consumer.

    >>> from kafka.errors import KafkaConnectionError, UnsupportedVersionError
    >>> retriable(KafkaConnectionError("111 ECONNREFUSED")), retriable(UnsupportedVersionError())
    (True, False)
    >>> retriable(ValueError("a bug"))
    False
    """
    from kafka.errors import KafkaError

    return isinstance(e, KafkaError) and bool(getattr(e, "retriable", False))


def discard_producer(producer: Any) -> None:
    """Closes a producer whose send failed, without waiting for what it holds. kafka-python's
    idempotent producer can enter a fatal state it never leaves (an unknown producer id after a
    broker restart, an authorization refusal): kept, every later send failed the same way until
    a restart of the process. Its callers build a new one at their next attempt, and what this one
    held is sent again by them (an outbox's rows, a batch's dead letters, a request)."""
    with contextlib.suppress(Exception):
        producer.close(timeout=0)


def client_security(cfg: KafkaConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"security_protocol": cfg.security_protocol}
    if cfg.sasl_mechanism:
        out["sasl_mechanism"] = cfg.sasl_mechanism
        out["sasl_plain_username"] = cfg.sasl_username
        out["sasl_plain_password"] = cfg.sasl_password.get_secret_value() if cfg.sasl_password else None
    if cfg.ssl_cafile:
        out["ssl_cafile"] = cfg.ssl_cafile
    return out


class KafkaSource:
    def __init__(self, cfg: KafkaConfig, client_id: str = "oversight-monitor"):
        self.cfg = cfg
        self.name = f"kafka:{cfg.group_id}:{cfg.topic}"
        self._client_id = client_id
        self._consumer: Any = None
        self._rebalance: Rebalance | None = None
        # _guard: held by the pipeline for a whole batch and by rebalance
        # callbacks; _state: short critical sections of the consumer thread, so
        # that fetching never waits for a batch to be processed.
        self._guard = threading.RLock()
        self._state = threading.Lock()
        self._gen = 0
        self._queue: queue.Queue[tuple[int, list[Record]]] = queue.Queue(maxsize=QUEUE_BATCHES)
        self._leftover: list[Record] = []
        self._assigned: set[int] = set()
        # First offset fetched per partition since it was assigned: where a
        # rewind goes back to when the database has no offset for it yet.
        self._first: dict[int, int] = {}
        self._pending_seek: dict[int, int] | None = None
        self._seek_gen = 0
        self._to_commit: dict[int, int] = {}
        self._committed: dict[int, int] = {}
        self._lag: dict[int, int] = {}
        # Partitions whose stored offset lies past the log's end, with that offset (:meth:`_behind`).
        self._past_end: dict[int, int] = {}
        # Where each assigned partition starts: its stored offset, else (asked of the broker once) its
        # beginning or end per auto_offset_reset. The lag of a partition nothing was fetched from yet.
        self._start: dict[int, int] = {}
        self._last_contact = 0.0  # monotonic time the consumer thread last saw the broker up
        self._failures = 0  # polls that raised a retriable error in a row (consumer thread only)
        # Since the source was built, for oversight_source_errors_total (written by the consumer
        # thread and kafka-python's commit callbacks on it, read by the pipeline: plain ints).
        self._errors = dict.fromkeys(SOURCE_OPERATIONS, 0)
        self._commit_failures = 0  # in a row
        self._error: BaseException | None = None
        self._unplaced = 0  # decoding failures in a row that no probe could place
        self._last_undecodable: int | None = None  # the partition of the last one (probed first)
        self._last_letter: tuple[int, int] | None = None  # its (partition, offset)
        self._running = threading.Event()
        self._thread: threading.Thread | None = None
        self._max_records = cfg.max_poll_records

    # -- lifecycle -----------------------------------------------------------
    def open(self, rebalance: Rebalance) -> None:
        from kafka import KafkaConsumer
        from kafka.consumer.subscription_state import ConsumerRebalanceListener

        from monitor.sources import codecs

        self._rebalance = rebalance
        cfg = self.cfg
        codecs.install(cfg.max_batch_bytes)
        self._consumer = KafkaConsumer(
            bootstrap_servers=cfg.bootstrap_servers,
            group_id=cfg.group_id,
            client_id=self._client_id,
            enable_auto_commit=False,
            auto_offset_reset=cfg.auto_offset_reset,
            isolation_level=cfg.isolation_level,
            session_timeout_ms=cfg.session_timeout_ms,
            heartbeat_interval_ms=cfg.heartbeat_interval_ms,
            max_poll_interval_ms=cfg.max_poll_interval_ms,
            max_poll_records=cfg.max_poll_records,
            fetch_max_bytes=cfg.fetch_max_bytes,
            fetch_max_wait_ms=cfg.fetch_max_wait_ms,
            # Reconnect within a second of the broker's return (the default backoff grows to 30 s),
            # so that ingest, and /readyz, recover within seconds of an outage.
            reconnect_backoff_max_ms=RECONNECT_BACKOFF_MAX_MS,
            # A broker down at start fails this attempt within seconds; the pipeline retries it.
            bootstrap_timeout_ms=BOOTSTRAP_TIMEOUT_MS,
            **client_security(cfg),
        )
        source = self

        class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
            # Both run on the consumer thread, inside poll().
            def on_partitions_revoked(self, revoked: Any) -> None:
                parts = sorted(tp.partition for tp in revoked)
                with source._guard, source._state:  # waits for the batch in flight to commit
                    source._new_generation()
                    source._assigned.difference_update(parts)
                    for p in parts:
                        source._first.pop(p, None)
                        source._to_commit.pop(p, None)
                        source._committed.pop(p, None)
                        source._lag.pop(p, None)
                        source._start.pop(p, None)
                        source._past_end.pop(p, None)
                    log.info("partitions revoked: %s", parts)
                    rebalance.revoked(parts)

            def on_partitions_assigned(self, assigned: Any) -> None:
                parts = sorted(tp.partition for tp in assigned)
                with source._guard, source._state:
                    source._new_generation()
                    source._assigned.update(parts)
                    for p in parts:
                        source._first.pop(p, None)
                        source._start.pop(p, None)
                    stored = rebalance.assigned(parts)
                    source._start.update(stored)
                    log.info("partitions assigned: %s (stored offsets %s)", parts, dict(stored))
                    source._seek(stored, parts, fresh=True)
                    source._seek_gen = source._gen

        self._consumer.subscribe([cfg.topic], listener=Listener())
        self._running.set()
        self._thread = threading.Thread(target=self._loop, name="kafka-consumer", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._running.clear()
        if self._thread is not None:
            self._thread.join(timeout=15)
            self._thread = None

    # -- consumer thread -----------------------------------------------------
    def _new_generation(self) -> None:
        self._gen += 1
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    def _seek(self, stored: Mapping[int, int], parts: list[int], *, fresh: bool = False) -> None:
        from kafka import TopicPartition

        unseen = []
        for p in parts:
            tp = TopicPartition(self.cfg.topic, p)
            if p in stored:
                self._consumer.seek(tp, stored[p])
            elif p in self._first:
                self._consumer.seek(tp, self._first[p])
            elif fresh:
                unseen.append(tp)
        if unseen:
            # The database has never seen these partitions: it, not Kafka's
            # committed offsets, decides where to start.
            if self.cfg.auto_offset_reset == "earliest":
                self._consumer.seek_to_beginning(*unseen)
            else:
                self._consumer.seek_to_end(*unseen)

    def _loop(self) -> None:
        last_lag = 0.0
        try:
            while self._running.is_set():
                self._seek_and_commit()
                batches = self._poll_kafka()
                if batches is None:
                    continue  # a retriable failure, waited out
                self._check_contact(bool(batches))
                if time.monotonic() - last_lag >= 1.0:
                    last_lag = time.monotonic()
                    self._update_lag()
                fetched = self._records(batches) if batches else None
                if fetched is not None:
                    self._put(*fetched)
        except BaseException as e:  # surfaced to the pipeline by poll()
            log.exception("kafka consumer thread failed")
            self._error = e
        finally:
            with contextlib.suppress(Exception):
                with self._state:
                    commits, self._to_commit = self._to_commit, {}
                self._commit_kafka(commits, sync=True)
            with contextlib.suppress(Exception):
                self._consumer.close(autocommit=False)

    def _put(self, gen: int, records: list[Record]) -> None:
        # Blocks while the pipeline is behind; kafka-python's heartbeat thread
        # keeps the membership alive meanwhile (up to max_poll_interval_ms).
        while self._running.is_set():
            if gen != self._gen:
                return
            try:
                self._queue.put((gen, records), timeout=0.1)
                return
            except queue.Full:
                # Not polling while the pipeline is behind (say, waiting out a database outage):
                # the broker's liveness is still known from the client's connections.
                self._check_contact(False)
                continue

    def _seek_and_commit(self) -> None:
        """On the consumer thread: a rewind's pending seek, then the offsets the store committed."""
        with self._state:
            if self._pending_seek is not None:
                self._seek(self._pending_seek, sorted(self._assigned))
                self._pending_seek = None
                self._seek_gen = self._gen
            commits, self._to_commit = self._to_commit, {}
        self._commit_kafka(commits)

    def _poll_kafka(self) -> dict[Any, list[Any]] | None:
        """One poll of the consumer: its batches, or None after a retriable failure (waited out)."""
        try:
            batches: dict[Any, list[Any]] = self._consumer.poll(timeout_ms=100, max_records=self._max_records)
        except Exception as e:
            if decoding_failure(e):
                self._undecodable(e)
                return None
            if not retriable(e):
                raise
            self._failures += 1
            self._errors["read"] += 1
            self._poll_failed(e)
            return None
        if self._failures:
            log.info("kafka poll returned without an error after %d that raised", self._failures)
            self._failures = 0
        if batches:
            self._unplaced = 0
        return batches

    def _records(self, batches: Mapping[Any, list[Any]]) -> tuple[int, list[Record]] | None:
        """The fetched messages as records of the current generation; None when fetched before a
        rewind's seek (stale)."""
        now = time.time()
        with self._state:
            gen = self._seek_gen
            if gen != self._gen:
                return None
            out: list[Record] = []
            for tp, msgs in batches.items():
                p = tp.partition
                if msgs and p not in self._first:
                    self._first[p] = msgs[0].offset
                for m in msgs:
                    value = m.value if m.value is not None else b""
                    out.append(Record(value, p, m.offset, m.offset + 1, now, m.key))
        return gen, out

    def _undecodable(self, e: Exception) -> None:
        """A fetched record kafka-python cannot decode. It raises the same error at every poll
        (the partition's position stays on the record), so one such record used to end the
        consumer thread, and the service with it, at every restart. The partition and offset are
        found by fetching each partition alone (:meth:`_place`); the record becomes a dead letter
        (``undecodable``, its raw bytes unknown) and the partition moves past it. A compressed
        batch fails as a whole: each of its offsets is a dead letter in turn."""
        self._drop_failed_fetch()
        with self._state:
            gen = self._seek_gen
            if gen != self._gen:
                return  # a rewind's seek comes first; the next poll meets the record again
        try:
            placed = self._place()
        except Exception as probe_error:  # a rebalance or an outage during the probe: poll again
            log.warning("kafka: could not place a record that does not decode (%s): %s", e, probe_error)
            placed = None
        if placed is None:
            self._unplaced += 1
            if self._unplaced > UNPLACED_MAX:
                raise e
            log.warning("kafka: a fetched record did not decode, and did again on no partition alone: %s", e)
            return
        self._unplaced = 0
        tp, offset, err = placed
        with self._state:
            if gen != self._gen or self._pending_seek is not None:
                return  # a rebalance or a rewind came meanwhile: it seeks anew
            self._first.setdefault(tp.partition, offset)  # where a rewind goes back to, as for a record
        detail = f"kafka-python cannot decode the record at partition {tp.partition} offset {offset}: "
        detail += f"{type(err).__name__}: {err}"[:500]
        # One line per run of offsets (a compressed batch fails offset by offset), not per record.
        level = logging.DEBUG if self._last_letter == (tp.partition, offset - 1) else logging.ERROR
        log.log(level, "%s; dead-lettered, the partition goes on", detail)
        self._last_letter = (tp.partition, offset)
        self._last_undecodable = tp.partition
        self._consumer.seek(tp, offset + 1)
        self._put(gen, [Record(b"", tp.partition, offset, offset + 1, time.time(), undecodable=detail)])

    def _place(self) -> tuple[Any, int, BaseException] | None:
        """The partition, offset and error of a record that does not decode: each assigned
        partition is fetched alone (the others paused), the last one to hold such a record
        first; None when every partition yields a record or nothing."""
        consumer = self._consumer
        parts = sorted(consumer.assignment(), key=lambda tp: (tp.partition != self._last_undecodable, tp.partition))
        for tp in parts:
            others = [p for p in parts if p != tp]
            consumer.pause(*others)
            try:
                placed = self._probe(tp)
            finally:
                for p in others:  # one at a time: a partition revoked meanwhile must not keep the rest paused
                    with contextlib.suppress(Exception):
                        consumer.resume(p)
            if placed is not None:
                return placed
        return None

    def _drop_failed_fetch(self) -> None:
        """Forgets the fetched records whose decoding raised. kafka-python 3.0 keeps them as the
        partition's next in line with their generator spent: every later poll takes nothing from
        them and never moves on (poll spins on the CPU), even after a seek to the same offset.
        Drained, the partition is fetched anew. kafka-python's own attributes, read defensively:
        another version without them has nothing to drop here."""
        fetcher = getattr(self._consumer, "_fetcher", None)
        stale = getattr(fetcher, "_next_partition_records", None)
        if stale is not None:
            stale.drain()
            fetcher._next_partition_records = None  # type: ignore[union-attr]
        if getattr(fetcher, "_next_in_line_exception_metadata", None) is not None:
            fetcher._next_in_line_exception_metadata = None  # type: ignore[union-attr]  # raised already

    def _probe(self, tp: Any) -> tuple[Any, int, BaseException] | None:
        """Fetches ``tp`` alone from its position: the error its record there raises, or None once
        it yields a record (given back: the consumer seeks to it again) or nothing within
        ``PROBE_S``. The probe's fetch is the record's second: a batch damaged in transit, not
        on the broker, reads whole this time and is no dead letter."""
        consumer = self._consumer
        start = consumer.position(tp, timeout_ms=int(PROBE_S * 1000))
        deadline = time.monotonic() + PROBE_S
        while time.monotonic() < deadline:
            try:
                got = consumer.poll(timeout_ms=100, max_records=1)
            except Exception as e:
                if not decoding_failure(e):
                    raise
                self._drop_failed_fetch()
                return tp, start, e
            if got:
                consumer.seek(tp, start)
                return None
        return None

    def _poll_failed(self, e: BaseException) -> None:
        """A poll that raised a retriable error (the broker refused or reset a connection while
        kafka-python looked up the coordinator): an outage, not the end of the consumer thread.
        Contact is not renewed, so /readyz and ``oversight_ready_check{check="source"}`` show it
        within ``CONTACT_S``; the next poll retries after a backoff that grows to a second."""
        if self._failures == 1:
            log.warning("kafka poll failed, retrying: %s", e)
        else:
            log.debug("kafka poll failed again (%d in a row): %s", self._failures, e)
        time.sleep(min(POLL_BACKOFF_MAX_S, 0.05 * 2 ** min(self._failures, 5)))

    def _check_contact(self, fetched: bool) -> None:
        """On the consumer thread (the client is not thread-safe): note the time if the broker is
        reachable now. Records just fetched prove it; otherwise the connections to the group
        coordinator and to every assigned partition's leader must be up, and a stable member's
        heartbeats must be answered (a hung broker keeps its sockets open)."""
        from kafka import TopicPartition

        now = time.monotonic()
        if not fetched:
            try:
                client = self._consumer._client
                coordinator = self._consumer._coordinator
                node = coordinator.coordinator_id
                if node is None or not client.connected(node):
                    return
                for p in self._assigned:
                    leader = client.cluster.leader_for_partition(TopicPartition(self.cfg.topic, p))
                    if leader is None or leader < 0 or not client.connected(leader):
                        return
                silent = now - coordinator.heartbeat.last_receive
                if coordinator.stable() and silent > max(3.0, 2.5 * self.cfg.heartbeat_interval_ms / 1000):
                    return
            except AttributeError:  # another kafka-python: only fetched records prove contact
                return
        self._last_contact = now

    def _commit_kafka(self, offsets: Mapping[int, int], sync: bool = False) -> None:
        from kafka import TopicPartition
        from kafka.structs import OffsetAndMetadata

        if not offsets:
            return
        data = {TopicPartition(self.cfg.topic, p): OffsetAndMetadata(o, "", -1) for p, o in offsets.items()}
        try:
            if sync:
                self._consumer.commit(data)
            else:
                # Without a callback kafka-python discards an asynchronous commit's error.
                self._consumer.commit_async(data, self._committed_async)
        except Exception as e:  # informational: must not stop ingest
            self._commit_failed(e)

    def _committed_async(self, offsets: Any, response: Any) -> None:
        if isinstance(response, BaseException):
            self._commit_failed(response)
        else:
            self._commit_failures = 0

    def _commit_failed(self, e: BaseException) -> None:
        """Kafka's offsets are for lag tooling only (the store's are read back), so a failed
        commit is counted and logged, never retried: the next batch commits newer offsets.
        Logged once per run of failures (a rebalance refuses every commit in flight)."""
        self._errors["commit"] += 1
        self._commit_failures += 1
        if self._commit_failures == 1:
            log.warning("kafka offset commit failed: %s", e)
        else:
            log.debug("kafka offset commit failed again (%d in a row): %s", self._commit_failures, e)

    def _update_lag(self) -> None:
        """Records between the end of each partition and what the store has committed.

        Uses the high watermark from fetch responses and offsets we already
        know; ``consumer.position()`` is not used: it can reset fetch state.
        """
        from kafka import TopicPartition

        out: dict[int, int] = {}
        unknown: dict[int, tuple[int | None, int | None]] = {}
        for p in sorted(self._assigned):
            hw = self._consumer.highwater(TopicPartition(self.cfg.topic, p))
            done = self._committed.get(p, self._first.get(p, self._start.get(p)))
            if hw is not None and done is not None:
                out[p] = self._behind(p, hw, done)
            else:
                unknown[p] = (hw, done)
        if unknown:
            # Nothing fetched from these yet (no high watermark) or no stored offset: asked of the
            # broker, once a second until the first fetch. They were left out, so a replica behind
            # on one partition reported only the others' lag.
            out.update(self._lag_unfetched(unknown))
        self._lag = out

    def _behind(self, p: int, end: int, done: int) -> int:
        """The lag of partition ``p``, noting a stored offset past the log's end: the topic was
        deleted and made again, or its log cut back (an unclean leader election), since the
        database stored it. The replica then reads nothing of that partition until the new log
        reaches the old offset, and whatever comes before it is never read: the lag said 0 and
        ``/readyz`` 200 while every new record was skipped. Now the replica is not ready
        (:meth:`ready`) and says why, once per partition and offset."""
        if done <= end:
            self._past_end.pop(p, None)
            return end - done
        if self._past_end.get(p) != done:
            self._past_end[p] = done
            log.error(
                "partition %d of %s: the offset the database stored, %d, is past the log's end, %d: the topic"
                " was deleted and created again, or its log cut back, since it was stored. Nothing of this"
                " partition is read until the log reaches %d, and the records before that never are; this"
                " replica reports not ready until then (the stored offsets are the offsets table's rows of %s)",
                p,
                self.cfg.topic,
                done,
                end,
                done,
                self.name,
            )
        return 0

    def _lag_unfetched(self, unknown: Mapping[int, tuple[int | None, int | None]]) -> dict[int, int]:
        from kafka import TopicPartition

        tps = {p: TopicPartition(self.cfg.topic, p) for p in unknown}
        # A short wait: this is the consumer thread, and a broker gone between two polls would hold
        # it for the client's request timeout (minutes) over a metric.
        wait = LAG_LOOKUP_MS
        try:
            ends = self._consumer.end_offsets(list(tps.values()), timeout_ms=wait)
            starts = {}
            fresh = [tps[p] for p, (_, done) in unknown.items() if done is None]
            if fresh:
                earliest = self.cfg.auto_offset_reset == "earliest"
                starts = self._consumer.beginning_offsets(fresh, timeout_ms=wait) if earliest else ends
        except Exception as e:  # the lag waits for the next try; consuming does not
            log.debug("cannot read the offsets of %s: %s", sorted(unknown), e)
            return {}
        out: dict[int, int] = {}
        for p, (known_hw, known_done) in unknown.items():
            tp = tps[p]
            done = known_done
            if done is None and starts.get(tp) is not None:
                done = self._start[p] = int(starts[tp])
            hw = known_hw if known_hw is not None else ends.get(tp)
            if hw is not None and done is not None:
                out[p] = self._behind(p, int(hw), done)
        return out

    # -- pipeline side -------------------------------------------------------
    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        if self._error is not None:
            raise RuntimeError(f"kafka consumer thread failed: {self._error}") from self._error
        deadline = time.monotonic() + timeout_s
        while True:
            if self._leftover and self._leftover[0].generation == self._gen:
                records = self._leftover
            else:
                try:
                    gen, records = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    return []
                if gen != self._gen:
                    continue
                for r in records:
                    r.generation = gen
            # A fetch can hold more than a batch: the rest waits for the next poll.
            self._leftover = records[max_records:]
            return records[:max_records]

    @contextlib.contextmanager
    def guard(self, records: list[Record]) -> Iterator[bool]:
        with self._guard:
            yield bool(records) and records[0].generation == self._gen

    @property
    def exhausted(self) -> bool:
        return False

    def commit(self, offsets: Mapping[int, int]) -> None:
        with self._state:
            for p, o in offsets.items():
                if p in self._assigned:
                    self._to_commit[p] = max(o, self._to_commit.get(p, o))
                    self._committed[p] = o

    def rewind(self) -> None:
        """Drop fetched records and seek every partition back to its stored offset."""
        assert self._rebalance is not None
        parts = sorted(self._assigned)
        stored = dict(self._rebalance.assigned(parts))
        with self._state:
            self._new_generation()
            self._pending_seek = stored

    def lag(self) -> dict[int, int]:
        return dict(self._lag)

    def failures(self) -> Mapping[str, int]:
        return dict(self._errors)

    def ready(self) -> bool:
        return (
            self._thread is not None
            and self._thread.is_alive()
            and self._error is None
            and time.monotonic() - self._last_contact < CONTACT_S
            and not self._past_end
        )
