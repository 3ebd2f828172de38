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
