"""The durable hand-off of accepted records, done before the ingest API answers 2xx.

* ``inbox`` (embedded default): one database transaction inserts the records into ``inbox``,
  skipping those whose stream holds their episode id already (a retried request reports them as
  duplicates; another stream's id does not: the pipeline decides that record).
* ``kafka``: each record is produced to ``kafka.topic`` keyed by its stream with acks=all, and
  every send's acknowledgement is awaited. Kafka does not deduplicate: a retried request is
  produced again, and the pipeline skips the copy (``monitor.pipeline.dedup``), so the API
  reports no duplicates in this mode.

An outage raises :class:`HandoffUnavailable` (the API answers 503 + Retry-After); nothing is
acknowledged that the target did not durably take.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from monitor.config import KafkaConfig
from monitor.store import Store
from monitor.store.ingest import Inbox, InboxRow

log = logging.getLogger(__name__)

PROBE_EVERY_S = 1.0  # readiness re-checks a failed target at most this often


class HandoffUnavailable(RuntimeError):
    """The target did not take the records (an outage); nothing may be acknowledged."""


class Handoff(Protocol):
    kind: str

    def submit(self, rows: Sequence[InboxRow]) -> set[tuple[str, str]]:
        """Hand the rows off durably; the (stream, episode id) pairs that were new (the rest were
        duplicates)."""
        ...

    def backlog(self, cap: int) -> int | None:
        """Records handed off but not consumed yet, up to ``cap`` + 1; None when unknown."""
        ...

    def ready(self) -> bool: ...

    def close(self) -> None: ...


class _Health:
    """The outcome of the last hand-off, with a probe of a failed target now and then.

    The probe runs on a thread of its own, at most one at a time, and :meth:`check` returns at
    once with what is known: ``/readyz`` and ``/metrics`` (whose ``oversight_ready`` reads the same
    function) call it, and a probe run by them waited as long as the target did not answer (a
    database frozen by a storage stall acknowledges the bytes and answers nothing, a KafkaProducer
    waits for its bootstrap), so every scrape and readiness probe of an outage timed out instead of
    showing it, each holding a server thread."""

    def __init__(self) -> None:
        self.ok = True
        self._probed = 0.0
        self._failures = 0  # a probe that started before the latest failure does not clear it
        self._probing = threading.Lock()

    def failed(self) -> None:
        self._failures += 1
        self.ok = False

    def succeeded(self) -> None:
        self.ok = True

    def due(self) -> bool:
        now = time.monotonic()
        if now - self._probed < PROBE_EVERY_S:
            return False
        self._probed = now
        return True

    def check(self, probe: Callable[[], bool]) -> bool:
        """Whether the target is healthy, as far as is known now; starts ``probe`` (True: the
        target takes writes again) on a thread when the target failed, a probe is due and none is
        in flight."""
        if not self.ok and self.due() and self._probing.acquire(blocking=False):
            thread = threading.Thread(target=self._probe, args=(probe, self._failures), daemon=True)
            thread.name = "handoff-probe"
            thread.start()
        return self.ok

    def _probe(self, probe: Callable[[], bool], failures: int) -> None:
        try:
            if probe() and failures == self._failures:
                self.succeeded()
        except Exception:  # a probe that raises says what a False says: not yet
            log.debug("hand-off probe failed", exc_info=True)
        finally:
            self._probing.release()


class InboxHandoff:
    kind = "inbox"

    def __init__(self, store: Store, timeout_s: float | None = None):
        self._store = store
        self._inbox = Inbox(store, timeout_s)
        self._health = _Health()

    def submit(self, rows: Sequence[InboxRow]) -> set[tuple[str, str]]:
        try:
            new = self._inbox.insert(rows)
        except Exception as e:
            self._health.failed()
            self._store.reconnect()  # never reuse a connection opened during the outage
            raise HandoffUnavailable(f"database: {type(e).__name__}") from e
        self._health.succeeded()
        return new

    def backlog(self, cap: int) -> int | None:
        try:
            return self._inbox.backlog(cap)
        except Exception as e:
            self._health.failed()
            raise HandoffUnavailable(f"database: {type(e).__name__}") from e

    def ready(self) -> bool:
        return self._health.check(self._writable)

    def _writable(self) -> bool:
        """Whether a write commits now: a ``SELECT 1`` succeeds on a read-only database (a failover
        to a standby) or a full disk, and /readyz said ready while every request was refused 503."""
        try:
            self._store.probe_write()
        except Exception:
            self._store.reconnect()
            return False
        return True

    def close(self) -> None:
        pass


class KafkaHandoff:
    kind = "kafka"

    def __init__(self, cfg: KafkaConfig, timeout_s: float):
        self._cfg = cfg
        self._timeout_s = timeout_s
        self._producer: Any = None
        self._lock = threading.Lock()
        self._health = _Health()

    def _get_producer(self) -> Any:
        with self._lock:
            if self._producer is None:
                from kafka import KafkaProducer

                from monitor.sources.kafka import client_security

                ms = int(self._timeout_s * 1000)
                self._producer = KafkaProducer(
                    bootstrap_servers=self._cfg.bootstrap_servers,
                    acks="all",
                    retries=5,
                    linger_ms=2,
                    max_block_ms=ms,
                    bootstrap_timeout_ms=ms,  # a broker that is down: 503 after this, not 30 s
                    request_timeout_ms=ms,
                    client_id="oversight-ingest",
                    **client_security(self._cfg),
                )
            return self._producer

    def submit(self, rows: Sequence[InboxRow]) -> set[tuple[str, str]]:
        producer = None
        try:
            producer = self._get_producer()
            futures = [producer.send(self._cfg.topic, key=r.stream.encode(), value=r.raw) for r in rows]
            producer.flush(timeout=self._timeout_s)
            deadline = time.monotonic() + self._timeout_s
            for f in futures:
                f.get(timeout=max(0.1, deadline - time.monotonic()))
        except Exception as e:
            self._health.failed()
            if producer is not None:
                self._discard(producer)
            raise HandoffUnavailable(f"broker: {type(e).__name__}") from e
        self._health.succeeded()
        return {(r.stream, r.episode_id) for r in rows}

    def _discard(self, producer: Any) -> None:
        """A request's send failed: the next request builds a new producer (see
        ``monitor.sources.kafka.discard_producer``). Requests in flight on this one fail too and
        are answered 503, which clients retry."""
        from monitor.sources.kafka import discard_producer

        with self._lock:
            if self._producer is not producer:
                return  # another request's failure replaced it already
            self._producer = None
        discard_producer(producer)

    def backlog(self, cap: int) -> int | None:
        return None

    def ready(self) -> bool:
        return self._health.check(lambda: bool(self._get_producer().bootstrap_connected()))

    def close(self) -> None:
        with self._lock:
            if self._producer is not None:
                try:
                    self._producer.close(timeout=self._timeout_s)
                finally:
                    self._producer = None
