"""Delivery straight to the monitor's Kafka topic, and :class:`KafkaClient`.

kafka-python is imported when a :class:`KafkaClient` is made, never by ``import oversight_client``:
install it with the ``kafka`` extra (``pip install oversight-client[kafka]``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from oversight_client.buffer import Item, OnFull
from oversight_client.core import BaseClient, Delivery, OnResult
from oversight_client.retry import Backoff


class KafkaTransport:
    """Produces each episode keyed by its ``stream`` (the monitor keeps a stream's state on the
    partition that holds it) with ``acks="all"``; an episode counts as accepted once its produce
    is acknowledged. The broker does not de-duplicate: a retry after an ambiguous failure may
    write an episode twice, which the monitor's pipeline absorbs (idempotent by episode_id)."""

    def __init__(self, bootstrap_servers: str | list[str], topic: str, timeout_s: float, config: Mapping[str, Any]):
        try:
            from kafka import KafkaProducer
        except ImportError as e:  # pragma: no cover - depends on the installation
            raise ImportError("KafkaClient needs kafka-python: pip install 'oversight-client[kafka]'") from e
        self._topic = topic
        self._timeout_s = timeout_s
        ms = int(timeout_s * 1000)
        self._settings: dict[str, Any] = {
            "bootstrap_servers": bootstrap_servers,
            "acks": "all",
            "linger_ms": 5,
            # Retries are ours (with the client's backoff and counters), not the producer's.
            "retries": 0,
            "max_block_ms": ms,
            "request_timeout_ms": ms,
            **config,
        }
        if "bootstrap_timeout_ms" in KafkaProducer.DEFAULT_CONFIG:  # kafka-python 3 connects in the constructor
            self._settings.setdefault("bootstrap_timeout_ms", ms)
        self._factory = KafkaProducer
        self._producer: Any = None

    def _connected(self) -> Any:
        """The producer, made on first use on the sender thread: a broker that is down when the
        application starts delays delivery (retried like any outage), never ``KafkaClient()``."""
        if self._producer is None:
            self._producer = self._factory(**self._settings)
        return self._producer

    def deliver(self, batch: list[Item], ctx: Delivery) -> None:
        pending, attempt = batch, 0
        while pending:
            ctx.request()
            try:
                producer = self._connected()
            except Exception as e:  # no broker reachable within the timeout
                reason = f"kafka_unavailable: {type(e).__name__}"
            else:
                pending, reason = self._produce(producer, pending, ctx)
            if pending and not ctx.retry(attempt):
                ctx.results(pending, "failed", reason)
                return
            attempt += 1

    def _produce(self, producer: Any, items: list[Item], ctx: Delivery) -> tuple[list[Item], str]:
        """Produce ``items``, report the acknowledged ones; returns the rest and the last error."""
        futures: list[tuple[Item, Any]] = []
        failed: list[Item] = []
        reason = ""
        for item in items:
            try:
                futures.append((item, producer.send(self._topic, key=item.stream.encode(), value=item.payload)))
            except Exception as e:  # metadata unavailable within max_block_ms, buffer full, closed
                if too_large(e):
                    ctx.result(item, "rejected", "oversize", f"{type(e).__name__}: {e}"[:200])
                    continue
                failed.append(item)
                reason = f"kafka_error: {type(e).__name__}"
        producer.flush(timeout=self._timeout_s)
        for item, fut in futures:
            try:
                fut.get(timeout=0 if fut.is_done else self._timeout_s)
            except Exception as e:
                if too_large(e):
                    ctx.result(item, "rejected", "oversize", f"{type(e).__name__}: {e}"[:200])
                    continue
                failed.append(item)
                reason = f"kafka_error: {type(e).__name__}"
            else:
                ctx.result(item, "accepted")
        return failed, reason

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=self._timeout_s)


def too_large(e: BaseException) -> bool:
    """Whether the producer or the broker refused the record for its size: final, the record's own.
    Retried, one such record held the sender, and every batch behind it, for all its retries
    (about 30 s each with the defaults; for ever with ``max_retries=None``)."""
    return type(e).__name__ in ("MessageSizeTooLargeError", "RecordListTooLargeError")


class KafkaClient(BaseClient):
    """Logs episodes by producing them to the monitor's topic (the same buffer, batching, retry
    and result policies as :class:`~oversight_client.Client`); ``producer_config`` is passed to
    kafka-python's ``KafkaProducer`` (security settings, compression, ...)."""

    def __init__(
        self,
        bootstrap_servers: str | list[str],
        topic: str,
        *,
        stream: str | None = None,
        batch_size: int = 500,
        flush_interval_s: float = 1.0,
        max_buffer: int = 100_000,
        on_full: OnFull = "drop_oldest",
        block_timeout_s: float | None = None,
        timeout_s: float = 10.0,
        max_retries: int | None = 10,
        backoff: Backoff | None = None,
        on_result: OnResult | None = None,
        producer_config: Mapping[str, Any] | None = None,
    ):
        super().__init__(
            KafkaTransport(bootstrap_servers, topic, timeout_s, producer_config or {}),
            stream=stream,
            batch_size=batch_size,
            flush_interval_s=flush_interval_s,
            max_buffer=max_buffer,
            on_full=on_full,
            block_timeout_s=block_timeout_s,
            max_retries=max_retries,
            backoff=backoff,
            on_result=on_result,
        )
