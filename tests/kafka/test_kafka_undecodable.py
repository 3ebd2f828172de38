"""Records the consumer must decode before it can read them, against a real broker (Tansu): every
compression codec Kafka defines, and records that do not decode at all.

Before: a batch compressed with lz4, snappy or zstd (Kafka producers' usual codecs) raised
UnsupportedCodecError in kafka-python, and any record it could not decode (a compressed payload
that does not decompress, a header key that is not UTF-8) ended the consumer thread and the
service, at the same offset after every restart."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

pytestmark = pytest.mark.kafka


def _group() -> str:
    return f"g-{uuid.uuid4().hex[:8]}"


class _NotUtf8(str):
    """A header key whose bytes on the wire are not UTF-8 (kafka-python writes ``key.encode()``;
    a producer in another language writes any bytes it likes)."""

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return b"trace-\xff\xfe"


def _producer(kenv: Any, **kw: Any) -> Any:
    from kafka import KafkaProducer

    return KafkaProducer(bootstrap_servers=kenv.bootstrap, **{"linger_ms": 20, **kw})


def _send(producer: Any, topic: str, eps: list[dict[str, Any]], partition: int, **kw: Any) -> Iterator[int]:
    futures = [producer.send(topic, json.dumps(e).encode(), partition=partition, **kw) for e in eps]
    producer.flush()
    for f in futures:
        yield f.get(timeout=10).offset


def _letters(kenv: Any, topic: str, n: int) -> list[tuple[int, int, str, str]]:
    out = []
    for m in kenv.consume_all(f"{topic}.dlq", expect=n):
        h = dict(m.headers)
        out.append(
            (
                int(h["oversight.source.partition"]),
                int(h["oversight.source.offset"]),
                h["oversight.error.reason"].decode(),
                h["oversight.error.detail"].decode(),
            )
        )
    return sorted(out)


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
def test_batches_in_every_codec_are_read(kenv: Any, sqlite_url: str, codec: str) -> None:
    topic, group = kenv.topic(partitions=2), _group()
    eps = [kenv.episode(i, s, prefix=codec) for i in range(30) for s in ("chat", "code")]
    plain = _producer(kenv)
    packed = _producer(kenv, compression_type=codec)
    try:
        # Plain and compressed batches interleaved on both partitions.
        ends: dict[int, int] = {}
        for k, p in ((0, plain), (1, packed), (2, packed), (3, plain)):
            part = eps[k * 15 : (k + 1) * 15]
            for partition in (0, 1):
                mine = [e for j, e in enumerate(part) if j % 2 == partition]
                for off in _send(p, topic, mine, partition):
                    ends[partition] = max(ends.get(partition, 0), off + 1)
    finally:
        plain.close()
        packed.close()
    settings = kenv.settings(topic, group, sqlite_url)
    source = kenv.source_name(group, topic)
    stats = kenv.run_until(settings, lambda store: kenv.offsets_reached(sqlite_url, source, ends), timeout_s=45)
    assert stats.records == len(eps) and stats.invalid == 0
    kenv.assert_exactly_once(sqlite_url, settings, eps)


def test_records_that_do_not_decode_are_dead_letters_and_the_partitions_go_on(
    kenv: Any, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kafka.record.default_records as records

    topic, group = kenv.topic(partitions=2), _group()
    good = [kenv.episode(i, "chat") for i in range(30)]
    lost = [kenv.episode(i, "chat", prefix="lost") for i in range(5)]
    plain = _producer(kenv)
    try:
        ends: dict[int, int] = {}
        before = list(_send(plain, topic, good[:10], 0))
        # A gzip batch whose payload is not gzip (a broker such as Tansu stores it as sent; the
        # batch's CRC covers the damaged bytes, so it passes the CRC check).
        monkeypatch.setattr(records, "gzip_encode", lambda data, *a, **k: b"\x1f\x8b\x08not gzip" + data[:16])
        damaged = _producer(kenv, compression_type="gzip")
        try:
            bad = list(_send(damaged, topic, lost[:4], 0))
        finally:
            damaged.close()
        monkeypatch.undo()
        bad += list(_send(plain, topic, lost[4:], 0, headers=[(_NotUtf8("trace"), b"1")]))
        after = list(_send(plain, topic, good[10:20], 0))
        other = list(_send(plain, topic, good[20:], 1))
        ends = {0: after[-1] + 1, 1: other[-1] + 1}
    finally:
        plain.close()
    assert len(before) == 10 and len(bad) == 5 and bad == list(range(bad[0], bad[0] + 5))

    settings = kenv.settings(topic, group, sqlite_url)
    source = kenv.source_name(group, topic)
    stats = kenv.run_until(settings, lambda store: kenv.offsets_reached(sqlite_url, source, ends), timeout_s=60)
    assert stats.records == len(good) + len(lost)
    assert dict(stats.dead_letters) == {"undecodable": 5}
    kenv.assert_exactly_once(sqlite_url, settings, good)

    letters = _letters(kenv, topic, 5)
    assert [(p, o, r) for p, o, r, _ in letters] == [(0, o, "undecodable") for o in bad]
    assert all(f"cannot decode the record at partition 0 offset {o}: " in d for _, o, _, d in letters)
    assert all("UnicodeDecodeError" not in d for _, o, _, d in letters if o in bad[:4])
    assert "UnicodeDecodeError" in letters[-1][3]


def test_a_fetch_damaged_once_is_fetched_again_not_dead_lettered(
    kenv: Any, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that failed to decompress once (as if damaged between broker and consumer) is read
    whole from a second fetch: nothing is a dead letter."""
    from monitor.sources import codecs

    topic, group = kenv.topic(), _group()
    eps = [kenv.episode(i, "chat") for i in range(20)]
    packed = _producer(kenv, compression_type="gzip")
    try:
        ends = {0: list(_send(packed, topic, eps, 0))[-1] + 1}
    finally:
        packed.close()
    real = codecs.gzip_decode
    calls = {"n": 0}

    def once_damaged(payload: bytes, limit: int) -> bytes:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("damaged in transit")
        return real(payload, limit)

    monkeypatch.setattr(codecs, "gzip_decode", once_damaged)
    settings = kenv.settings(topic, group, sqlite_url)
    source = kenv.source_name(group, topic)
    stats = kenv.run_until(settings, lambda store: kenv.offsets_reached(sqlite_url, source, ends), timeout_s=45)
    assert calls["n"] >= 2
    assert stats.records == len(eps) and stats.invalid == 0
    kenv.assert_exactly_once(sqlite_url, settings, eps)


def test_a_batch_that_inflates_past_the_limit_is_dead_lettered_not_inflated(kenv: Any, sqlite_url: str) -> None:
    """kafka-python inflated a compressed batch whole: a megabyte of gzip could be a gigabyte in the
    consumer. Past kafka.max_batch_bytes the batch's records are dead letters and the partition goes on."""
    topic, group = kenv.topic(), _group()
    good = [kenv.episode(i, "chat") for i in range(10)]
    # Eight valid episodes of 200 KB each that compress to almost nothing: 1.6 MB inflated, one batch.
    big = [{**kenv.episode(i, "chat", prefix="big"), "response": "ha " * 66_000} for i in range(8)]
    plain = _producer(kenv)
    packed = _producer(kenv, compression_type="gzip", batch_size=16 * 2**20, linger_ms=500)
    try:
        first = list(_send(plain, topic, good[:5], 0))
        bombs = list(_send(packed, topic, big, 0))
        after = list(_send(plain, topic, good[5:], 0))
    finally:
        plain.close()
        packed.close()
    assert first[-1] + 1 == bombs[0] and bombs == list(range(bombs[0], bombs[0] + 8))
    ends = {0: after[-1] + 1}
    settings = kenv.settings(topic, group, sqlite_url, f"kafka.max_batch_bytes={2**20}")
    source = kenv.source_name(group, topic)
    stats = kenv.run_until(settings, lambda store: kenv.offsets_reached(sqlite_url, source, ends), timeout_s=60)
    assert stats.records == 18 and dict(stats.dead_letters) == {"undecodable": 8}
    kenv.assert_exactly_once(sqlite_url, settings, good)
    letters = _letters(kenv, topic, 8)
    assert [o for _, o, _, _ in letters] == bombs
    assert all("inflates past kafka.max_batch_bytes (1048576 bytes)" in d for _, _, _, d in letters)
    from monitor.config import KafkaConfig
    from monitor.sources import codecs

    codecs.install(KafkaConfig().max_batch_bytes)  # process-wide: back to the default
