"""Publishing committed rows to Kafka (the outbox pattern).

Drift events and reward-model scores are committed with their batch first; publishing
follows and marks the rows (``published_at``). A crash in between publishes them again on
the next run (at-least-once); each message carries an idempotency key header so consumers
can drop the repeats.

Publishing runs on a thread of its own (:class:`OutboxRelay`); a commit only wakes it. It ran on
the ingest thread after each commit before, and the broker's waits were ingest's: a topic whose
metadata never came (a production cluster with automatic topic creation off) held every batch
with a score or a drift event for the producer's 60 s metadata wait, and a broker down at start
stopped the service after 30 s. Now the outbox waits, is retried with backoff, and is shown in
``/readyz`` (check ``outbox``) and in ``oversight_outbox_*``, while ingest goes on.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from monitor.metrics import Metrics
from monitor.retry import first_line
from monitor.store import Store
from monitor.store import tables as t

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT_S = 10.0  # a send's metadata wait, the bootstrap, and the acknowledgements
BATCH_ROWS = 500  # rows read and sent at once
ROUND_BATCHES = 20  # at most this many batches a round, so that a stop is seen between them
POLL_S = 5.0  # a relay without commits still looks (rows another run left) this often
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
REMIND_S = 60.0  # a failure that lasts is logged again this often
OUTBOX_LOCK = 7163529  # first key of the per-outbox pg_try_advisory_lock(int, int) of a publishing round


class OutboxPublisher:
    """One outbox table sent to one topic. The producer is made at the first send, so a broker
    that is down when the service starts is an outage of the outbox, retried, not a failed start."""

    def __init__(
        self,
        cfg: Any,
        store: Store,
        table: sa.Table,
        topic: str,
        idempotency_key: Callable[[dict[str, Any]], str],
        *,
        what: str,
    ):
        """``what``: for log lines."""
        self.topic = topic
        self.table = table
        self.what = what
        self._cfg = cfg
        self._store = store
        self._key = idempotency_key
        self._producer: Any = None

    @property
    def name(self) -> str:
        """The outbox's label in metrics: its table."""
        return str(self.table.name)

    def _connected(self) -> Any:
        if self._producer is None:
            from kafka import KafkaProducer

            from monitor.sources.kafka import client_security

            ms = int(PUBLISH_TIMEOUT_S * 1000)
            self._producer = KafkaProducer(
                bootstrap_servers=self._cfg.bootstrap_servers,
                acks="all",
                retries=5,
                max_block_ms=ms,
                bootstrap_timeout_ms=ms,
                request_timeout_ms=ms,
                reconnect_backoff_max_ms=1000,
                **client_security(self._cfg),
            )
        return self._producer

    def publish_pending(self, limit: int = BATCH_ROWS) -> int:
        """Send up to ``limit`` rows still to publish, oldest first, and mark them once every send
        is acknowledged. Raises on a failure: the rows stay in the outbox.

        One relay at a time per outbox (``Store.one_at_a_time``): every replica's relay reads the
        same unpublished rows, and two of them between the read and the mark sent each row twice
        in normal operation (10 messages for 9 drift events with two replicas, no fault). A round
        that finds another relay publishing sends nothing; it looks again at its next poll."""
        with self._store.one_at_a_time(OUTBOX_LOCK, self.name) as (mine, conn):
            return self._publish(limit, conn) if mine else 0

    def _publish(self, limit: int, conn: Connection | None) -> int:
        rows = self._store.unpublished(self.table, limit, conn)
        if not rows:
            return 0
        producer = self._connected()
        try:
            futures = []
            for row in rows:
                item = {k: v for k, v in row.items() if k != "published_at"}
                futures.append(
                    producer.send(
                        self.topic,
                        key=str(item["stream"]).encode(),
                        value=json.dumps(item, ensure_ascii=True, sort_keys=True).encode(),
                        headers=[("oversight.idempotency_key", self._key(item).encode())],
                    )
                )
            producer.flush(timeout=PUBLISH_TIMEOUT_S)
            for f in futures:
                f.get(timeout=PUBLISH_TIMEOUT_S)
        except Exception:
            from monitor.sources.kafka import discard_producer

            self._producer = None  # the next round builds a new one (see discard_producer)
            discard_producer(producer)
            raise
        # Only after every send is acknowledged: a crash before this line publishes them again.
        self._store.mark_published(self.table, rows, conn)
        return len(rows)

    def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.close(timeout=PUBLISH_TIMEOUT_S)


class OutboxRelay:
    """Publishes one outbox on a thread of its own: :meth:`notify` (after a commit) wakes it, and
    it looks every ``poll_s`` anyway. A failed round waits a backoff (``FIRST_BACKOFF_S`` doubling
    to ``MAX_BACKOFF_S``) and is tried again; nothing it does holds a batch.

    :meth:`ready` is false after a failed round until one succeeds, and while a round has been in
    flight for over ``stall_s`` (a broker that accepts the connection and never answers)."""

    def __init__(
        self,
        publisher: OutboxPublisher,
        store: Store,
        metrics: Metrics,
        *,
        stall_s: float,
        poll_s: float = POLL_S,
        first_backoff_s: float = FIRST_BACKOFF_S,
        max_backoff_s: float = MAX_BACKOFF_S,
    ):
        self.publisher = publisher
        self.stall_s = stall_s
        self.poll_s = poll_s
        self.first_backoff_s = first_backoff_s
        self.max_backoff_s = max_backoff_s
        self._store = store
        self._metrics = metrics
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ok = True
        self._in_flight: float | None = None  # monotonic start of the round in flight
        self._failures = 0  # failed rounds since the last success
        self._reminded = 0.0
        metrics.outbox_published.labels(publisher.name)
        metrics.outbox_errors.labels(publisher.name)
        metrics.outbox_oldest.labels(publisher.name).set(0)

    def notify(self) -> None:
        """Rows were committed: publish them soon. Never waits."""
        self._wake.set()

    def ready(self) -> bool:
        started = self._in_flight
        stalled = started is not None and time.monotonic() - started > self.stall_s
        return self._ok and not stalled

    def start(self) -> OutboxRelay:
        self._thread = threading.Thread(target=self._loop, name=f"outbox-{self.publisher.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 2 * PUBLISH_TIMEOUT_S) -> None:
        """Stop the thread after its round; then, if the outbox was healthy, one last round for
        what the last batches committed (a failure leaves it to the next run)."""
        self._stop.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=timeout_s)
        # Not beside a round still in flight (a broker that never answers): the rows wait instead.
        if self._ok and (thread is None or not thread.is_alive()):
            self.run_once()
        self.publisher.close()

    def _loop(self) -> None:
        full = self.run_once() >= ROUND_BATCHES * BATCH_ROWS  # what a previous run left first
        while not self._stop.is_set():
            if not full:  # a full round may have left more: go on at once (a backlog after an outage)
                self._wake.wait(self.poll_s if self._ok else self._backoff())
            self._wake.clear()
            if not self._stop.is_set():
                full = self.run_once() >= ROUND_BATCHES * BATCH_ROWS

    def _backoff(self) -> float:
        return float(min(self.max_backoff_s, self.first_backoff_s * 2 ** max(0, self._failures - 1)))

    def run_once(self) -> int:
        """One round: publish until the outbox is empty (at most ``ROUND_BATCHES`` batches).
        Returns the rows published; a failure is counted, logged and shown, never raised."""
        published = 0
        self._in_flight = time.monotonic()
        try:
            for _ in range(ROUND_BATCHES):
                n = self.publisher.publish_pending()
                published += n
                self._metrics.outbox_published.labels(self.publisher.name).inc(n)
                if n < BATCH_ROWS or self._stop.is_set():
                    break
        except Exception as e:
            self._failed(e)
        else:
            self._succeeded()
        finally:
            self._in_flight = None
            self._measure_lag()
        return published

    def _failed(self, e: BaseException) -> None:
        self._metrics.outbox_errors.labels(self.publisher.name).inc()
        self._failures += 1
        now = time.monotonic()
        if self._ok:
            self._ok, self._reminded = False, now
            log.warning("publishing %s failed (kept in the outbox, retrying): %s", self.publisher.what, first_line(e))
        elif now - self._reminded >= REMIND_S:
            self._reminded = now
            log.warning(
                "publishing %s still failing (%d attempts), retrying: %s",
                self.publisher.what,
                self._failures,
                first_line(e),
            )

    def _succeeded(self) -> None:
        if not self._ok:
            log.warning("publishing %s again after %d failed attempts", self.publisher.what, self._failures)
        self._ok, self._failures = True, 0

    def _measure_lag(self) -> None:
        """How long the oldest row still to publish has waited (0: none waits)."""
        try:
            oldest = self._store.oldest_unpublished(self.publisher.table)
        except Exception as e:  # the database's outage is the pipeline's to show; keep the last value
            log.debug("outbox lag of %s not measured: %s", self.publisher.what, first_line(e))
            return
        age = 0.0 if oldest is None else max(0.0, time.time() - oldest)
        self._metrics.outbox_oldest.labels(self.publisher.name).set(age)


def drift_publisher(cfg: Any, store: Store) -> OutboxPublisher:
    return OutboxPublisher(
        cfg, store, t.drift_events, cfg.drift_topic, lambda e: f"drift-event-{e['id']}", what="drift events"
    )


def scores_publisher(cfg: Any, store: Store) -> OutboxPublisher:
    return OutboxPublisher(
        cfg,
        store,
        t.rm_scores,
        cfg.scores_topic,
        lambda s: f"rm-score-{s['episode_id']}-{s['version']}",
        what="reward-model scores",
    )
