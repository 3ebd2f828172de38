"""The bounded decoders of Kafka record batches (monitor/sources/codecs.py), without a broker: each
inflates up to the limit and refuses past it, without inflating the whole payload first."""

from __future__ import annotations

import gzip
import tracemalloc
from collections.abc import Callable

import pytest

from monitor.sources import codecs


def _lz4(data: bytes) -> bytes:
    import lz4.frame

    return bytes(lz4.frame.compress(data))


def _zstd(data: bytes) -> bytes:
    import zstandard

    return bytes(zstandard.ZstdCompressor().compress(data))


@pytest.mark.parametrize(
    ("compress", "decode"),
    [(gzip.compress, codecs.gzip_decode), (_lz4, codecs.lz4_decode), (_zstd, codecs.zstd_decode)],
)
def test_a_payload_inflates_up_to_the_limit_and_no_further(
    compress: Callable[[bytes], bytes], decode: Callable[[bytes, int], bytes]
) -> None:
    data = b"episode " * 50_000  # 400 kB
    assert decode(compress(data), len(data)) == data
    bomb = compress(b"\0" * (64 * 2**20))  # 64 MB of zeros, a few kB compressed
    tracemalloc.start()
    try:
        with pytest.raises(codecs.BatchTooLarge, match=r"inflates past kafka\.max_batch_bytes"):
            decode(bomb, 2**20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, peak  # never the 64 MB


def test_install_puts_the_bounded_decoders_in_both_record_formats() -> None:
    import kafka.record.default_records as v2
    import kafka.record.legacy_records as v0

    from monitor.config import KafkaConfig

    codecs.install(2**20)
    try:
        for module in (v2, v0):
            with pytest.raises(codecs.BatchTooLarge):
                module.gzip_decode(gzip.compress(b"\0" * (2 * 2**20)))
        assert v2.zstd_decode(_zstd(b"ok")) == b"ok"
    finally:
        codecs.install(KafkaConfig().max_batch_bytes)  # process-wide: the default for later tests


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
def test_batches_decode_without_the_lz4_and_zstandard_packages(monkeypatch: pytest.MonkeyPatch, codec: str) -> None:
    """A plain install has neither package (29 MB): kafka-python would refuse such a batch as
    "Libraries for lz4 compression codec not found"; the source's decoders use cramjam."""
    import kafka.codec
    from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

    from monitor.config import KafkaConfig

    kind = DefaultRecordBatch.CODEC_LZ4 if codec == "lz4" else DefaultRecordBatch.CODEC_ZSTD
    builder = DefaultRecordBatchBuilder(2, kind, False, -1, -1, -1, 2**20)
    for i in range(3):
        builder.append(i, timestamp=None, key=None, value=f"episode {i}".encode() * 50, headers=[])
    buf = bytes(builder.build())  # encoded with the package (a producer's side needs it)
    monkeypatch.setattr(kafka.codec, "lz4", None)
    monkeypatch.setattr(kafka.codec, "zstd", None)
    monkeypatch.setattr(kafka.codec, "has_lz4", lambda: False)
    monkeypatch.setattr(kafka.codec, "has_zstd", lambda: False)
    codecs.install(2**20 + 1)  # another limit: installed again
    try:
        assert [r.value for r in DefaultRecordBatch(buf)] == [f"episode {i}".encode() * 50 for i in range(3)]
    finally:
        codecs.install(KafkaConfig().max_batch_bytes)
