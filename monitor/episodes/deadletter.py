"""Dead-letter sinks: every invalid record is kept with its raw bytes and the reason.

Written and flushed before the batch's offsets are committed, so a crash can
repeat a dead letter (each carries an idempotency key: source, partition,
offset) but never lose one.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

from monitor.config import KafkaConfig

FLUSH_TIMEOUT_S = 5
# A Kafka record's key is its stream name; a longer one is cut in the letter (its hash and size
# are kept), so that no key can make a letter larger than the producer's request.
KEY_MAX_BYTES = 1024
TAIL_SCAN = 65536  # bytes read at a time looking back for the last whole line of a torn file

log = logging.getLogger(__name__)


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

    Lines are buffered here and written with unbuffered appends per flush. A failed flush (a
    full disk, an I/O error) leaves no partial line behind: the file is cut back to its length
    before the failed append, the unflushed letters are dropped, and the pipeline sends the
    batch's letters again when it retries, so every line in the file is whole and none is lost.

    ``max_bytes``: a hostile producer sending oversize records at 1,000 a second writes about a
    gigabyte a second here, and a full disk stops the pipeline (the batch cannot commit until
    its letters are written). So before an append would take the file past ``max_bytes`` it is
    rotated: ``path`` becomes ``path.1``, ``path.1`` becomes ``path.2`` and so on; ``path.<keep>``
    (``path`` itself when ``keep`` is 0) is deleted, and the letters it held are counted through
    ``on_rotate``. A batch's letters may be split over two files; no line is. ``None``: never
    rotate.

    Several processes may append to one file (``oversight import`` beside ``oversight run``): a
    flush holds an exclusive ``flock`` on the file, so one process's cut-back never cuts another's
    lines and two rotations never race; a process whose file another one rotated (or an external
    logrotate moved) reopens ``path`` before it appends."""

    def __init__(
        self,
        path: str,
        max_raw_bytes: int,
        fsync: bool = True,
        max_bytes: int | None = None,
        keep: int = 3,
        on_rotate: Callable[[int], None] | None = None,
    ):
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError("max_bytes must be positive (None: never rotate)")
        if keep < 0:
            raise ValueError("keep must be at least 0")
        self.path = path
        self.max_raw_bytes = max_raw_bytes
        self.max_bytes = max_bytes
        self.keep = keep
        self._fsync = fsync
        self._on_rotate = on_rotate
        self._dir = os.path.dirname(os.path.abspath(path))
        os.makedirs(self._dir, exist_ok=True)
        self._fh = self._open()
        self._lines: list[bytes] = []

    def _open(self) -> BinaryIO:
        # Readable too: a torn last line is found by reading back (_cut_torn_tail). Appends go to the end.
        return open(self.path, "ab+", buffering=0)  # kept open for the sink's life; closed by close()

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
        pending, self._lines = self._lines, []
        self._lock_current()
        try:
            while pending:
                size = os.fstat(self._fh.fileno()).st_size
                n = self._fitting(pending, size)
                if n == 0:
                    self._rotate()
                    continue
                self._append(b"".join(pending[:n]), size)
                pending = pending[n:]
        finally:
            fcntl.flock(self._fh, fcntl.LOCK_UN)

    def _fitting(self, lines: list[bytes], size: int) -> int:
        """How many of ``lines`` go into a file of ``size`` bytes before it must be rotated; a
        line longer than ``max_bytes`` goes alone into an empty file."""
        if self.max_bytes is None:
            return len(lines)
        n, room = 0, self.max_bytes - size
        for line in lines:
            if len(line) > room:
                break
            room -= len(line)
            n += 1
        return 1 if n == 0 and size == 0 else n

    def _append(self, data: bytes, start: int) -> None:
        fd = self._fh.fileno()
        try:
            rest = memoryview(data)
            while rest:
                rest = rest[os.write(fd, rest) :]
            if self._fsync:
                os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)  # appends go to the end: the next write starts whole
            raise

    def _lock_current(self) -> None:
        """Hold the exclusive lock of the file ``path`` names now, reopening it first when
        another process rotated it (or something deleted it) since this sink opened it."""
        while True:
            fcntl.flock(self._fh, fcntl.LOCK_EX)
            if self._is_current():
                self._cut_torn_tail()
                return
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = self._open()

    def _cut_torn_tail(self) -> None:
        """Cut the file back to its last whole line, under the lock. A process killed in the middle
        of an append (kill -9, a lost node) left part of a line; the next letter was glued onto it,
        and neither could be read. The torn letter's batch never committed, so it is sent again."""
        fd = self._fh.fileno()
        end = os.fstat(fd).st_size
        if end == 0 or os.pread(fd, 1, end - 1) == b"\n":
            return
        at = end
        while at > 0:
            start = max(0, at - TAIL_SCAN)
            newline = os.pread(fd, at - start, start).rfind(b"\n")
            if newline >= 0:
                at = start + newline + 1
                break
            at = start
        log.warning(
            "dead letters: %s ended in a torn line (%d bytes), cut back to its last whole line", self.path, end - at
        )
        os.ftruncate(fd, at)

    def _is_current(self) -> bool:
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(self._fh.fileno())
        return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)

    def _rotate(self) -> None:
        """Shift the files up by one and start an empty ``path``, under the lock of the old one.
        Each rename is atomic; a crash between them leaves a gap in the numbers, never a torn
        file. Waiting processes find ``path`` renamed when they get the lock, and reopen it."""
        victim = f"{self.path}.{self.keep}" if self.keep else self.path
        discarded = _letters_in(victim)
        for i in range(self.keep - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{self.path}.{i}", f"{self.path}.{i + 1}")
        if self.keep:
            os.replace(self.path, f"{self.path}.1")
        else:
            os.unlink(self.path)
        old, self._fh = self._fh, self._open()
        fcntl.flock(self._fh, fcntl.LOCK_EX)
        old.close()  # releases its lock: the new file's is already held
        _fsync_dir(self._dir)
        if self._on_rotate is not None:
            self._on_rotate(discarded)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._fh.close()


def _letters_in(path: str) -> int:
    """Newlines in ``path`` (0 when it does not exist), read a mebibyte at a time."""
    try:
        fh = open(path, "rb")  # noqa: SIM115 (closed below)
    except FileNotFoundError:
        return 0
    n = 0
    with fh:
        while chunk := fh.read(1 << 20):
            n += chunk.count(b"\n")
    return n


def _fsync_dir(path: str) -> None:
    """Make the renames in a directory durable (a crash could otherwise undo a rotation)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class KafkaDeadLetterSink:
    """Produces the raw bytes to ``<topic>.dlq`` with the reason in headers.

    Every letter fits the producer's request: its value is cut to ``max_raw_bytes`` and its key
    to ``KEY_MAX_BYTES`` (with the whole key's hash and size in headers). A record whose key alone
    passed the request size (a broker that takes large messages, a producer that put a payload
    in the key) was refused by the producer at every retry, and the pipeline waited on it
    forever: one record stopped ingest. A letter the broker refuses as too large (the dead-letter
    topic's ``max.message.bytes`` below the episodes topic's) goes again without its raw bytes:
    the reason, the position, the size and the hash still reach the topic, the record itself
    stays at its offset in the source topic, and ``on_raw_dropped`` counts it."""

    def __init__(self, cfg: KafkaConfig, max_raw_bytes: int, on_raw_dropped: Callable[[int], None] | None = None):
        self.topic = cfg.dead_letter_topic
        self.max_raw_bytes = max_raw_bytes
        self._cfg = cfg
        self._on_raw_dropped = on_raw_dropped
        self._client: Any = None
        self._sent: list[tuple[DeadLetter, Any]] = []

    @property
    def _producer(self) -> Any:
        """Made at the first letter, not with the sink: a broker down when the service starts is
        then an outage of the dead-letter target, retried by the pipeline, not a failed start."""
        if self._client is None:
            from kafka import KafkaProducer

            from monitor.sources.kafka import client_security

            cfg = self._cfg
            self._client = KafkaProducer(
                bootstrap_servers=cfg.bootstrap_servers,
                acks="all",
                retries=5,
                max_request_size=max(1048576, self.max_raw_bytes + 65536),
                # While the broker is down, send() and flush() give up within seconds: the pipeline's
                # retry policy owns the waiting, and a stop must not sit in a 60 s metadata wait.
                max_block_ms=FLUSH_TIMEOUT_S * 1000,
                bootstrap_timeout_ms=FLUSH_TIMEOUT_S * 1000,
                reconnect_backoff_max_ms=1000,
                **client_security(cfg),
            )
        return self._client

    def send(self, letter: DeadLetter) -> None:
        try:
            self._sent.append((letter, self._produce(letter, with_raw=True)))
        except Exception:
            self._discard()
            raise

    def _discard(self) -> None:
        """A send or flush failed: the next letter goes through a new producer (see
        ``monitor.sources.kafka.discard_producer``); the pipeline sends the batch's letters again."""
        from monitor.sources.kafka import discard_producer

        client, self._client, self._sent = self._client, None, []
        if client is not None:
            discard_producer(client)

    def _produce(self, letter: DeadLetter, with_raw: bool) -> Any:
        raw = letter.raw[: self.max_raw_bytes] if with_raw else b""
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
        if not with_raw:
            headers.append(("oversight.raw_dropped", b"the broker refused the letter's size"))
        key = letter.key
        if key is not None and len(key) > KEY_MAX_BYTES:
            headers += [
                ("oversight.key_size", str(len(key)).encode()),
                ("oversight.key_sha256", hashlib.sha256(key).hexdigest().encode()),
            ]
            key = key[:KEY_MAX_BYTES]
        return self._producer.send(self.topic, value=raw, key=key, headers=headers)

    def flush(self) -> None:
        if not self._sent:
            return
        # The pipeline sends the batch's letters again when it retries, so a failed attempt's
        # futures are dropped: a letter of it that reached the broker after all is a duplicate
        # with the same idempotency key, never a loss.
        sent, self._sent = self._sent, []
        try:
            self._producer.flush(timeout=FLUSH_TIMEOUT_S)
            refused = [letter for letter, f in sent if self._too_large(f)]
            if not refused:
                return
            # Without their raw bytes: a few kilobytes of headers. If the broker refuses these too,
            # the error is raised and the batch waits, as in any outage of the dead-letter topic.
            again = [self._produce(letter, with_raw=False) for letter in refused]
            self._producer.flush(timeout=FLUSH_TIMEOUT_S)
            for f in again:
                f.get(timeout=FLUSH_TIMEOUT_S)
        except Exception:
            self._discard()
            raise
        log.warning(
            "%d dead letters sent to %s without their raw bytes: the broker refused their size",
            len(refused),
            self.topic,
        )
        if self._on_raw_dropped is not None:
            self._on_raw_dropped(len(refused))

    @staticmethod
    def _too_large(future: Any) -> bool:
        """Whether the broker (or the producer) refused a letter for its size; any other failure
        is raised: the batch is not committed."""
        from kafka.errors import MessageSizeTooLargeError, RecordListTooLargeError

        try:
            future.get(timeout=FLUSH_TIMEOUT_S)
        except (MessageSizeTooLargeError, RecordListTooLargeError):
            return True
        return False

    def close(self) -> None:
        if self._client is None:  # no letter was ever sent
            return
        self.flush()
        self._producer.close(timeout=10)
