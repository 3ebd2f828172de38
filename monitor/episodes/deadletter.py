"""Dead-letter sinks: every invalid record is kept with its raw bytes and the reason.

Written and flushed before the batch's offsets are committed, so a crash can
repeat a dead letter (each carries an idempotency key: source, partition,
offset) but never lose one.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Protocol

from monitor.config import KafkaConfig

FLUSH_TIMEOUT_S = 5


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
    """Appends one JSON object per dead letter; raw bytes are base64 (they may not be UTF-8).

    Lines are buffered here and written with one unbuffered append per flush. A failed flush (a
    full disk, an I/O error) leaves no partial line behind: the file is cut back to its last
    flushed length, the unflushed letters are dropped, and the pipeline sends the batch's letters
    again when it retries, so every line in the file is whole and none is lost."""

    def __init__(self, path: str, max_raw_bytes: int, fsync: bool = True):
        self.path = path
        self.max_raw_bytes = max_raw_bytes
        self._fsync = fsync
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        self._fh = open(path, "ab", buffering=0)  # noqa: SIM115 (kept open for the sink's life)
        self._good = os.fstat(self._fh.fileno()).st_size  # length of what was flushed whole
        self._lines: list[bytes] = []

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
        self._lines.append(json.dumps(obj, ensure_ascii=True).encode("ascii") + b"\n")

    def flush(self) -> None:
        if not self._lines:
            return
        data = memoryview(b"".join(self._lines))
        self._lines = []
        fd = self._fh.fileno()
        try:
            rest = data
            while rest:
                rest = rest[os.write(fd, rest) :]
            if self._fsync:
                os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, self._good)  # appends go to the end: the next write starts whole
            raise
        self._good += len(data)

    def close(self) -> None:
        try:
            self.flush()
        finally:
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
            # While the broker is down, send() and flush() give up within seconds: the pipeline's
            # retry policy owns the waiting, and a stop must not sit in a 60 s metadata wait.
            max_block_ms=FLUSH_TIMEOUT_S * 1000,
            reconnect_backoff_max_ms=1000,
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
        # The pipeline sends the batch's letters again when it retries, so a failed attempt's
        # futures are dropped: a letter of it that reached the broker after all is a duplicate
        # with the same idempotency key, never a loss.
        futures, self._futures = self._futures, []
        self._producer.flush(timeout=FLUSH_TIMEOUT_S)
        for f in futures:
            f.get(timeout=FLUSH_TIMEOUT_S)  # raises if the broker did not take it: the batch is not committed

    def close(self) -> None:
        self.flush()
        self._producer.close(timeout=10)
