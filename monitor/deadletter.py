"""Dead-letter sinks: every invalid record is kept with its raw bytes and the reason.

Written and flushed before the batch's offsets are committed, so a crash can
repeat a dead letter (each carries an idempotency key: source, partition,
offset) but never lose one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Protocol

from monitor.config import KafkaConfig


@dataclass(slots=True)
class DeadLetter:
    reason: str
    detail: str
    raw: bytes
    source: str
    partition: int
    offset: int
    received_at: float
    size: int
    key: bytes | None = None
    episode_id: str | None = None
    stream: str | None = None

    @property
    def idempotency_key(self) -> str:
        return f"{self.source}:{self.partition}:{self.offset}"


class DeadLetterSink(Protocol):
    def send(self, letter: DeadLetter) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class JsonlDeadLetterSink:
    """Appends one JSON object per dead letter; raw bytes are base64 (they may not be UTF-8)."""

    def __init__(self, path: str, max_raw_bytes: int, fsync: bool = True):
        self.path = path
        self.max_raw_bytes = max_raw_bytes
        self._fsync = fsync
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        self._fh = open(path, "ab")  # noqa: SIM115 (kept open for the sink's life)
        self._pending = 0

    def send(self, letter: DeadLetter) -> None:
        raw = letter.raw[: self.max_raw_bytes]
        obj: dict[str, Any] = {
            "id": letter.idempotency_key,
            "reason": letter.reason,
            "detail": letter.detail,
            "source": letter.source,
            "partition": letter.partition,
            "offset": letter.offset,
            "received_at": letter.received_at,
            "dead_lettered_at": time.time(),
            "episode_id": letter.episode_id,
            "stream": letter.stream,
            "size": letter.size,
            "raw_truncated": len(raw) < letter.size,
            "raw_sha256": hashlib.sha256(letter.raw).hexdigest(),
            "raw_b64": base64.b64encode(raw).decode("ascii"),
        }
        if letter.key is not None:
            obj["key_b64"] = base64.b64encode(letter.key).decode("ascii")
        # ensure_ascii: a dead letter is attacker-controlled text; keep the file plain ASCII.
        self._fh.write(json.dumps(obj, ensure_ascii=True).encode("ascii") + b"\n")
        self._pending += 1

    def flush(self) -> None:
        if self._pending:
            self._fh.flush()
            if self._fsync:
                os.fsync(self._fh.fileno())
            self._pending = 0

    def close(self) -> None:
        self.flush()
        self._fh.close()


class KafkaDeadLetterSink:
    """Produces the raw bytes to ``<topic>.dlq`` with the reason in headers."""

    def __init__(self, cfg: KafkaConfig, max_raw_bytes: int):
        from kafka import KafkaProducer

        from monitor.sources.kafka import client_security

        self.topic = cfg.dead_letter_topic
        self.max_raw_bytes = max_raw_bytes
        self._producer = KafkaProducer(
            bootstrap_servers=cfg.bootstrap_servers,
            acks="all",
            retries=5,
            max_request_size=max(1048576, max_raw_bytes + 65536),
            **client_security(cfg),
        )
        self._futures: list[Any] = []

    def send(self, letter: DeadLetter) -> None:
        raw = letter.raw[: self.max_raw_bytes]
        headers = [
            ("oversight.error.reason", letter.reason.encode()),
            ("oversight.error.detail", letter.detail.encode("utf-8", "backslashreplace")[:1000]),
            ("oversight.source", letter.source.encode()),
            ("oversight.source.partition", str(letter.partition).encode()),
            ("oversight.source.offset", str(letter.offset).encode()),
            ("oversight.idempotency_key", letter.idempotency_key.encode()),
            ("oversight.size", str(letter.size).encode()),
            ("oversight.raw_sha256", hashlib.sha256(letter.raw).hexdigest().encode()),
            ("oversight.raw_truncated", b"true" if len(raw) < letter.size else b"false"),
        ]
        self._futures.append(self._producer.send(self.topic, value=raw, key=letter.key, headers=headers))

    def flush(self) -> None:
        if not self._futures:
            return
        self._producer.flush(timeout=30)
        futures, self._futures = self._futures, []
        for f in futures:
            f.get(timeout=30)  # raises if the broker did not take it: the batch is not committed

    def close(self) -> None:
        self.flush()
        self._producer.close(timeout=10)
