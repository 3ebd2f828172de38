"""Kafka source (kafka-python): consumer group, offsets stored in the database.

At-least-once delivery with exactly-once effects on the store: offsets are
committed to the database in the same transaction as the rows a batch
produced, and on every assignment the consumer seeks to the database's
offsets. Offsets are also committed to Kafka afterwards, for lag tooling.

Per-stream state belongs to whichever replica owns the partition that the
stream's key hashes to, so producers must key episodes by ``stream``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from monitor.config import KafkaConfig
from monitor.sources.base import Rebalance, Record

log = logging.getLogger(__name__)


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
        self._assigned: set[int] = set()
        # First offset returned per partition since it was assigned: where a
        # rewind goes back to when the database has no offset for it yet.
        self._first: dict[int, int] = {}
        self._last_poll_ok = 0.0

    def open(self, rebalance: Rebalance) -> None:
        from kafka import KafkaConsumer
        from kafka.consumer.subscription_state import ConsumerRebalanceListener

        self._rebalance = rebalance
        cfg = self.cfg
        self._consumer = KafkaConsumer(
            bootstrap_servers=cfg.bootstrap_servers,
            group_id=cfg.group_id,
            client_id=self._client_id,
            enable_auto_commit=False,
            auto_offset_reset=cfg.auto_offset_reset,
            session_timeout_ms=cfg.session_timeout_ms,
            heartbeat_interval_ms=cfg.heartbeat_interval_ms,
            max_poll_interval_ms=cfg.max_poll_interval_ms,
            max_poll_records=cfg.max_poll_records,
            fetch_max_bytes=cfg.fetch_max_bytes,
            **client_security(cfg),
        )
        source = self

        class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
            def on_partitions_revoked(self, revoked: Any) -> None:
                parts = sorted(tp.partition for tp in revoked)
                source._assigned.difference_update(parts)
                for p in parts:
                    source._first.pop(p, None)
                log.info("partitions revoked: %s", parts)
                rebalance.revoked(parts)

            def on_partitions_assigned(self, assigned: Any) -> None:
                parts = sorted(tp.partition for tp in assigned)
                source._assigned.update(parts)
                for p in parts:
                    source._first.pop(p, None)
                log.info("partitions assigned: %s", parts)
                stored = rebalance.assigned(parts)
                source._seek(stored, parts)

        self._consumer.subscribe([cfg.topic], listener=Listener())

    def _seek(self, stored: Mapping[int, int], parts: list[int]) -> None:
        from kafka import TopicPartition

        for p in parts:
            if p in stored:
                self._consumer.seek(TopicPartition(self.cfg.topic, p), stored[p])
            elif p in self._first:
                # No stored offset (a rolled-back batch was its first): go back to its first record.
                self._consumer.seek(TopicPartition(self.cfg.topic, p), self._first[p])

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        self._last_poll_ok = time.monotonic()
        now = time.time()
        out: list[Record] = []
        for tp, msgs in batches.items():
            p = tp.partition
            if msgs and p not in self._first:
                self._first[p] = msgs[0].offset
            for m in msgs:
                out.append(Record(m.value if m.value is not None else b"", p, m.offset, m.offset + 1, now, m.key))
        return out

    @property
    def exhausted(self) -> bool:
        return False

    def commit(self, offsets: Mapping[int, int]) -> None:
        from kafka import TopicPartition
        from kafka.structs import OffsetAndMetadata

        # Informational (lag tooling); the database holds the offsets we resume from.
        if not offsets:
            return
        try:
            self._consumer.commit_async(
                {TopicPartition(self.cfg.topic, p): OffsetAndMetadata(o, "", -1) for p, o in offsets.items()}
            )
        except Exception as e:  # a failed informational commit must not stop ingest
            log.warning("kafka offset commit failed: %s", e)

    def rewind(self) -> None:
        assert self._rebalance is not None
        parts = sorted(self._assigned)
        stored = self._rebalance.assigned(parts)
        self._seek(stored, parts)

    def lag(self) -> dict[int, int]:
        from kafka import TopicPartition

        out: dict[int, int] = {}
        for p in sorted(self._assigned):
            tp = TopicPartition(self.cfg.topic, p)
            hw = self._consumer.highwater(tp)
            if hw is None:
                continue
            try:
                pos = self._consumer.position(tp, timeout_ms=0)
            except Exception:
                continue
            if pos is not None:
                out[p] = max(0, hw - pos)
        return out

    def ready(self) -> bool:
        return self._consumer is not None and time.monotonic() - self._last_poll_ok < 30

    def close(self) -> None:
        if self._consumer is not None:
            try:
                self._consumer.close(autocommit=False)
            finally:
                self._consumer = None
