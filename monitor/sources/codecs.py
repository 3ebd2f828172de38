"""Bounded decompression of Kafka record batches.

kafka-python inflates a compressed batch whole, however large it comes out. A batch's compressed
size is bounded by the broker (``message.max.bytes``, 1 MB by default; Tansu bounds nothing), but
gzip inflates up to about a thousand times: one batch of a megabyte of zeros made a gigabyte in the
consumer, and a fetch holds many batches. The decoders installed here stop at ``limit`` bytes and
raise :class:`BatchTooLarge` instead, from inside kafka-python's record decoding, so that the Kafka
source treats the batch as one that does not decode: its records become dead letters
(``undecodable``) and the partition goes on (``monitor.sources.kafka``).

gzip inflates incrementally up to the limit; lz4 and zstd (by ``cramjam``, which ``python-snappy``
brings: the ``lz4`` and ``zstandard`` packages kafka-python would use took 29 MB of the default
install) decode into a buffer that grows to the limit and no further; snappy cannot be bounded
(python-snappy decodes a block whole) and its ratio is bounded by the format (at most about 21 to
1 for any input), so its output is checked after.
"""

from __future__ import annotations

import gzip
import io
import threading
from collections.abc import Callable
from typing import Any

_lock = threading.Lock()
_installed: dict[str, Any] = {"limit": None}


class BatchTooLarge(ValueError):
    """A compressed batch inflates past the limit."""


def _too_large(limit: int) -> BatchTooLarge:
    return BatchTooLarge(f"the batch inflates past kafka.max_batch_bytes ({limit} bytes)")


def gzip_decode(payload: Any, limit: int) -> bytes:
    """
    >>> gzip_decode(gzip.compress(b"x" * 100), 100) == b"x" * 100
    True
    >>> gzip_decode(gzip.compress(b"x" * 101), 100)
    Traceback (most recent call last):
    ...
    monitor.sources.codecs.BatchTooLarge: the batch inflates past kafka.max_batch_bytes (100 bytes)
    """
    with gzip.GzipFile(fileobj=io.BytesIO(bytes(payload)), mode="rb") as f:
        out = f.read(limit + 1)
    if len(out) > limit:
        raise _too_large(limit)
    return out


def _into_growing(decode_into: Callable[[Any, Any], int], payload: Any, limit: int) -> bytes:
    """``decode_into(payload, buffer)`` into a buffer that starts at 16 times the payload and grows
    fourfold up to ``limit + 1`` bytes: cramjam refuses to write past a buffer's end ("failed to
    write whole buffer"), so memory is bounded by the buffer, and a batch that fills the last one
    is past the limit."""
    data = bytes(payload)
    size = min(limit + 1, 16 * len(data) + 65536)
    while True:
        buf = bytearray(size)
        try:
            n = int(decode_into(data, buf))
        except Exception as e:  # cramjam.DecompressionError: past the buffer's end, or damaged
            if "whole buffer" not in str(e):
                raise
            if size > limit:
                raise _too_large(limit) from None
            size = min(limit + 1, size * 4)
            continue
        if n > limit:
            raise _too_large(limit)
        return bytes(buf[:n])


def lz4_decode(payload: Any, limit: int) -> bytes:
    """
    >>> import cramjam
    >>> lz4_decode(bytes(cramjam.lz4.compress(b"x" * 100)), 100) == b"x" * 100
    True
    """
    import cramjam

    return _into_growing(cramjam.lz4.decompress_into, payload, limit)


def zstd_decode(payload: Any, limit: int) -> bytes:
    import cramjam

    return _into_growing(cramjam.zstd.decompress_into, payload, limit)


def _checked(decode: Callable[[bytes], bytes], limit: int) -> Callable[[bytes], bytes]:
    def checked(payload: bytes) -> bytes:
        out = decode(payload)
        if len(out) > limit:
            raise _too_large(limit)
        return out

    return checked


def install(limit: int) -> None:
    """Puts the bounded decoders where kafka-python's record batches call them (both record
    formats). Process-wide, as kafka-python's own are; the last limit installed holds."""
    import kafka.codec
    import kafka.record.default_records as v2
    import kafka.record.legacy_records as v0

    with _lock:
        if _installed["limit"] == limit:
            return
        # kafka-python asks whether the lz4 and zstd packages are installed before it decodes; the
        # decoders here need neither (a producer that compresses with them still needs its package).
        kafka.codec.has_lz4 = lambda: True
        kafka.codec.has_zstd = lambda: True
        snappy = _checked(kafka.codec.snappy_decode, limit)
        for module in (v2, v0):
            module.gzip_decode = lambda payload, limit=limit: gzip_decode(payload, limit)
            module.lz4_decode = lambda payload, limit=limit: lz4_decode(payload, limit)
            module.snappy_decode = snappy
        v2.zstd_decode = lambda payload, limit=limit: zstd_decode(payload, limit)
        _installed["limit"] = limit
