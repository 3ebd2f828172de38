"""Publishing committed rows to Kafka (the outbox pattern).

Drift events and reward-model scores are committed with their batch first; publishing
follows and marks the rows (``published_at``). A crash in between publishes them again on
the next run (at-least-once); each message carries an idempotency key header so consumers
can drop the repeats.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from monitor.store import Store
from monitor.store import tables as t


class OutboxPublisher:
    def __init__(
        self,
        cfg: Any,
        store: Store,
        table: sa.Table,
        topic: str,
        idempotency_key: Callable[[dict[str, Any]], str],
        *,
        batch_field: str,
        what: str,
    ):
        """``batch_field``: the field of a committed ``BatchWrite`` whose rows this outbox
        publishes (a batch without any has nothing new to send); ``what``: for log lines."""
        from kafka import KafkaProducer

        from monitor.sources.kafka import client_security

        self.topic = topic
        self.batch_field = batch_field
        self.what = what
        self._store = store
        self._table = table
        self._key = idempotency_key
        self._producer = KafkaProducer(
            bootstrap_servers=cfg.bootstrap_servers, acks="all", retries=5, **client_security(cfg)
        )

    def publish_pending(self, limit: int = 500) -> int:
        rows = self._store.unpublished(self._table, limit)
        if not rows:
            return 0
        futures = []
        for row in rows:
            item = {k: v for k, v in row.items() if k != "published_at"}
            futures.append(
                self._producer.send(
                    self.topic,
                    key=str(item["stream"]).encode(),
                    value=json.dumps(item, ensure_ascii=True, sort_keys=True).encode(),
                    headers=[("oversight.idempotency_key", self._key(item).encode())],
                )
            )
        self._producer.flush(timeout=30)
        for f in futures:
            f.get(timeout=30)
        # Only after every send is acknowledged: a crash before this line publishes them again.
        self._store.mark_published(self._table, rows)
        return len(rows)

    def close(self) -> None:
        self._producer.close(timeout=10)


def drift_publisher(cfg: Any, store: Store) -> OutboxPublisher:
    return OutboxPublisher(
        cfg,
        store,
        t.drift_events,
        cfg.drift_topic,
        lambda e: f"drift-event-{e['id']}",
        batch_field="drift_events",
        what="drift events",
    )


def scores_publisher(cfg: Any, store: Store) -> OutboxPublisher:
    return OutboxPublisher(
        cfg,
        store,
        t.rm_scores,
        cfg.scores_topic,
        lambda s: f"rm-score-{s['episode_id']}-{s['version']}",
        batch_field="rm_scores",
        what="reward-model scores",
    )
