"""The machinery every client shares: serialization in ``log()``, the buffer, the sender thread,
results and counters, flush and close. A transport (HTTP, Kafka) only delivers batches."""

from __future__ import annotations

import atexit
import functools
import json
import logging
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from oversight_client.buffer import Buffer, Item, OnFull
from oversight_client.episode import new_episode_id
from oversight_client.retry import Backoff
from oversight_client.stats import Counters, Result, Stats, Status

log = logging.getLogger("oversight_client")

OnResult = Callable[[Result], None]


class Delivery:
    """What a transport reports each episode's outcome to, and how it waits between attempts."""

    def __init__(self, counters: Counters, on_result: OnResult | None, backoff: Backoff, max_retries: int | None):
        self._counters = counters
        self._on_result = on_result
        self._backoff = backoff
        self._max_retries = max_retries
        # Set by close() past its timeout: stop retrying, fail what is left.
        self.abandon = threading.Event()
        self._open: dict[int, Item] = {}
        # The sender reports results; close() may fail what it still holds (give_up) meanwhile.
        self._lock = threading.Lock()

    def begin(self, batch: list[Item]) -> None:
        with self._lock:
            self._open = {id(i): i for i in batch}

    def end(self) -> None:
        """Whatever the transport did not report (it raised) failed: every episode is accounted for."""
        self.give_up("internal_error")

    def give_up(self, reason: str) -> None:
        """Fail every episode of the batch in flight not reported yet; a result the transport reports
        for one later is ignored (close() calls this when the sender is stuck in an exchange)."""
        with self._lock:
            items, self._open = list(self._open.values()), {}
        for item in items:
            self._finish(item, "failed", reason, None)

    def result(self, item: Item, status: Status, reason: str | None = None, detail: str | None = None) -> None:
        with self._lock:
            if self._open.pop(id(item), None) is None:
                return  # reported already
        self._finish(item, status, reason, detail)

    def dropped(self, item: Item) -> None:
        """The full buffer discarded ``item`` (called on the application's thread)."""
        self._finish(item, "dropped", "buffer_full", None)

    def _finish(self, item: Item, status: Status, reason: str | None, detail: str | None) -> None:
        self._counters.finished(status)
        if self._on_result is not None:
            try:
                self._on_result(Result(item.episode_id, status, reason, detail))
            except Exception:
                # The application's callback must not stop delivery.
                log.exception("on_result callback raised")

    def results(self, items: list[Item], status: Status, reason: str | None = None, detail: str | None = None) -> None:
        for item in items:
            self.result(item, status, reason, detail)

    def request(self) -> None:
        self._counters.add("requests")

    def retry(self, attempt: int, retry_after_s: float | None = None) -> bool:
        """Wait before retry ``attempt`` (0-based); False when the caller must give up instead."""
        if self.abandon.is_set() or (self._max_retries is not None and attempt >= self._max_retries):
            return False
        self._counters.add("retries")
        return not self.abandon.wait(self._backoff.delay(attempt, retry_after_s))


class Transport(Protocol):
    def deliver(self, batch: list[Item], ctx: Delivery) -> None:
        """Send ``batch``, retrying through ``ctx.retry``; report each episode through ``ctx.result``."""

    def close(self) -> None: ...


def _close_at_exit(ref: weakref.ReferenceType[BaseClient]) -> None:
    client = ref()
    if client is not None:
        client.close()


class BaseClient:
    """Buffers episodes and sends them in batches from one background thread.

    ``log()`` does no network I/O: it serializes the episode (so later changes to the caller's
    dict do not leak in), and enqueues it. Thread-safe. Memory is bounded: at most ``max_buffer``
    episodes wait, plus the one batch being sent.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        stream: str | None = None,
        batch_size: int = 500,
        flush_interval_s: float = 1.0,
        max_buffer: int = 100_000,
        on_full: OnFull = "drop_oldest",
        block_timeout_s: float | None = None,
        max_retries: int | None = 10,
        backoff: Backoff | None = None,
        on_result: OnResult | None = None,
    ):
        if batch_size < 1 or flush_interval_s <= 0:
            raise ValueError("batch_size must be >= 1 and flush_interval_s > 0")
        if max_retries is not None and max_retries < 0:
            raise ValueError("max_retries must be >= 0 (None: retry until close)")
        self._transport = transport
        self._stream = stream
        self._batch_size = batch_size
        self._flush_interval_s = flush_interval_s
        self._block_timeout_s = block_timeout_s
        self._buffer = Buffer(max_buffer, on_full)
        self._counters = Counters()
        self._delivery = Delivery(self._counters, on_result, backoff or Backoff(), max_retries)
        self._close_lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="oversight-client-sender", daemon=True)
        self._thread.start()
        # Flush on interpreter exit; a weak reference, so the hook never keeps a client alive.
        self._atexit_hook = functools.partial(_close_at_exit, weakref.ref(self))
        atexit.register(self._atexit_hook)

    # -- the application's side ------------------------------------------------
    def log(self, episode: Mapping[str, Any]) -> None:
        """Enqueue one episode (a schema v1 or v2 record); no network I/O.

        Fills ``episode_id`` (a random id) when absent, so that retries stay idempotent, and
        ``stream`` from the client's default. Raises :class:`TypeError` or :class:`ValueError` if
        the record cannot be serialized as JSON, :class:`BufferFull` per ``on_full``, and
        :class:`ClientClosed` after ``close()``. Content problems (a missing field, invalid
        Unicode, an oversize record) are the server's to judge: they come back as ``rejected``.
        """
        item = self._serialize(episode)
        self._counters.enqueued()
        try:
            dropped = self._buffer.put(item, self._block_timeout_s)
        except BaseException:
            self._counters.unenqueue()  # it never entered: the caller sees why instead
            raise
        if dropped is not None:
            self._delivery.dropped(dropped)

    def _serialize(self, episode: Mapping[str, Any]) -> Item:
        if not isinstance(episode, Mapping):
            raise TypeError(f"an episode is a mapping, not {type(episode).__name__}")
        record = dict(episode)
        eid = record.get("episode_id")
        if eid is None:
            record["episode_id"] = eid = new_episode_id()
        if "stream" not in record and self._stream is not None:
            record["stream"] = self._stream
        stream = record.get("stream")
        try:
            line = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()
        except UnicodeEncodeError:
            # A lone surrogate (broken model output) cannot be UTF-8: send it escaped and let the
            # server reject it with its precise reason instead of failing the caller here.
            line = json.dumps(record, separators=(",", ":")).encode()
        except RecursionError as e:
            raise ValueError("episode is nested too deeply to serialize") from e
        return Item(str(eid), stream if isinstance(stream, str) else "default", line)

    @property
    def stats(self) -> Stats:
        """A consistent snapshot of the counters."""
        return self._counters.snapshot()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Send everything logged so far now; True if it was all answered within the timeout."""
        return self._buffer.wait_empty(timeout_s)

    def close(self, timeout_s: float | None = 30.0) -> Stats:
        """Flush, stop the sender and release the connection; later ``log()`` calls raise.

        Past ``timeout_s`` the sender stops retrying and what is left counts as ``failed``; past
        twice ``timeout_s``, so does a batch still in an exchange (a server that never answers: the
        sender thread is left to it, and whatever it reports later is ignored).
        Idempotent; also runs at interpreter exit and when a ``with`` block ends.
        """
        with self._close_lock:
            if not self._closed:
                self._closed = True
                atexit.unregister(self._atexit_hook)
                self._buffer.close()
                self._thread.join(timeout_s)
                if self._thread.is_alive():
                    self._delivery.abandon.set()
                    self._thread.join(timeout_s)
                if self._thread.is_alive():
                    self._delivery.give_up("closed")
                    self._fail(self._buffer.drain(), "closed")
                self._transport.close()
        return self.stats

    def __enter__(self) -> BaseClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the sender thread -----------------------------------------------------
    def _run(self) -> None:
        while True:
            if self._delivery.abandon.is_set():
                self._fail(self._buffer.drain(), "closed")
                return
            batch = self._buffer.take(self._batch_size, self._flush_interval_s)
            if not batch:
                if self._buffer.closed:
                    return
                continue
            self._send(batch)

    def _send(self, batch: list[Item]) -> None:
        self._delivery.begin(batch)
        try:
            self._transport.deliver(batch, self._delivery)
        except Exception:
            log.exception("delivery raised; the batch counts as failed")
        finally:
            self._delivery.end()
            self._buffer.done(len(batch))

    def _fail(self, items: list[Item], reason: str) -> None:
        self._delivery.begin(items)
        self._delivery.results(items, "failed", reason)
        self._buffer.done(len(items))
