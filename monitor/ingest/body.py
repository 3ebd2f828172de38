"""A request body of ``POST /v1/episodes``: read within its limit, un-gzipped within the same
limit, and split into one raw record per episode.

Records are validated one by one afterwards (``monitor.episodes.parse_episode``), so splitting
keeps each record's bytes faithful enough for validation to name what is wrong with it: an NDJSON
line is passed as is; an element of a JSON array is serialised again, with invalid UTF-8 bytes
restored (surrogateescape) and lone surrogates kept as ``\\uXXXX`` escapes.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import secrets
import zlib
from collections.abc import AsyncIterator
from typing import Any

import orjson

NDJSON_TYPES = ("application/x-ndjson", "application/ndjson", "application/jsonl", "application/json-lines")
JSON_TYPES = ("application/json",)


class BodyError(Exception):
    """The request as a whole is refused: ``status`` (400, 408, 413, 415) with a ``reason`` and a detail."""

    def __init__(self, status: int, reason: str, detail: str):
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail


def body_timeout_detail(seconds: float) -> str:
    return f"the request body did not arrive within {seconds:g} s (ingest.body_timeout_s)"


def too_large(what: str, limit: int) -> BodyError:
    return BodyError(413, "too_large", f"{what} exceeds the limit of {limit} bytes")


async def read_limited(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """The whole body, or 413 as soon as more than ``limit`` bytes came (a client that sends more
    than its Content-Length said, or streams without one, is cut off there)."""
    buf = bytearray()
    async for chunk in chunks:
        buf += chunk
        if len(buf) > limit:
            raise too_large("request body", limit)
    return bytes(buf)


class GzipError(ValueError):
    """The body is not gzip, or ends inside a member."""


class GzipTooLarge(ValueError):
    """The body decompresses to more than the limit."""


# Gzip members in one body: an exporter compressing per batch writes a few, one per record a
# few thousand; an empty member is 20 bytes, and millions of them (4 MiB) took minutes.
MAX_GZIP_MEMBERS = 10_000
# Input is fed in slices of this size: when a member ends, zlib copies the rest of the input it
# was given (``unused_data``), so feeding the whole body made each member's end cost the body.
_GZIP_SLICE = 1 << 16


class Gunzip:
    """Streaming gzip decompression, never more than ``limit`` bytes out (a small bomb must not fill
    the memory), of **every** member: a body may be several gzip members one after the other
    (``cat a.gz b.gz``, an exporter compressing per batch), and reading only the first dropped the
    records of the others without a word. Bytes after a member that do not start another are an
    error, not ignored, and so are more than ``MAX_GZIP_MEMBERS`` members.

    >>> import gzip
    >>> g = Gunzip(100)
    >>> g.feed(gzip.compress(b"one\\n") + gzip.compress(b"two\\n")); g.close()
    b'one\\ntwo\\n'
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.members = 1
        self.member = zlib.decompressobj(wbits=31)

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        view = memoryview(data)
        for start in range(0, len(view), _GZIP_SLICE):
            piece: bytes | memoryview = view[start : start + _GZIP_SLICE]
            while piece:
                if self.member.eof:  # the previous member ended: these bytes start the next one
                    self.members += 1
                    if self.members > MAX_GZIP_MEMBERS:
                        raise GzipError(f"more than {MAX_GZIP_MEMBERS} gzip members")
                    self.member = zlib.decompressobj(wbits=31)
                try:
                    chunk = self.member.decompress(piece, self.limit + 1 - self.size)
                except zlib.error as e:
                    raise GzipError(f"not gzip: {e}") from None
                self.size += len(chunk)
                if self.size > self.limit:
                    raise GzipTooLarge(f"decompressed body over {self.limit} bytes")
                out += chunk
                piece = self.member.unused_data if self.member.eof else b""
        return bytes(out)

    def close(self) -> None:
        """The body ended: it must end at the end of a member."""
        if not self.member.eof:
            raise GzipError("truncated gzip body")


def gunzip_limited(data: bytes, limit: int) -> bytes:
    """Decompress a whole gzip body (every member), at most ``limit`` bytes out."""
    g = Gunzip(limit)
    try:
        out = g.feed(data)
        g.close()
    except GzipTooLarge:
        raise too_large("decompressed request body", limit) from None
    except GzipError as e:
        raise BodyError(400, "invalid_gzip", f"Content-Encoding gzip, but {e}") from None
    return out


def split_ndjson(body: bytes, max_records: int) -> list[bytes]:
    """One record per non-blank line (``\\n`` or ``\\r\\n``)."""
    out = []
    for line in body.split(b"\n"):
        value = line.rstrip(b"\r")
        if value.strip():
            out.append(value)
            if len(out) > max_records:
                raise BodyError(413, "too_many_records", f"more than {max_records} records in one request")
    return out


def split_json_array(body: bytes, max_records: int) -> list[bytes]:
    """The elements of a JSON array, each as the bytes of one record."""
    try:
        doc: Any = orjson.loads(body)
        strict = True
    except orjson.JSONDecodeError:
        doc, strict = _lenient_loads(body), False
    if not isinstance(doc, list):
        raise BodyError(400, "not_array", "an application/json body must be a JSON array of records")
    if len(doc) > max_records:
        raise BodyError(413, "too_many_records", f"{len(doc)} records in one request; the limit is {max_records}")
    if strict:
        return [encode_record(x) for x in doc]
    restore = restores_raw_bytes(body)
    return [reencode(x, restore_bytes=restore) for x in doc]


# An escaped low surrogate in the range ``surrogateescape`` maps raw bytes to (U+DC80-U+DCFF).
_ESCAPED_BYTE_SURROGATE = re.compile(rb"\\u[dD][cC][89a-fA-F][0-9a-fA-F]")


def restores_raw_bytes(body: bytes) -> bool:
    """Whether the lone surrogates of a body's lenient parse may be written back as the raw bytes
    they stand for: only when the body holds invalid UTF-8 (the bytes ``surrogateescape`` turned
    into U+DC80-U+DCFF) and no *escape* of such a surrogate. Otherwise a record could spell valid
    UTF-8 in escapes (``"\\udcc3\\udca9"``) and have it written back as the bytes of "é": a record
    refused on an NDJSON line (``invalid_unicode``) was accepted with content it did not hold, a
    right-to-left override among them. When in doubt every lone surrogate stays escaped and
    validation names it ``invalid_unicode``."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return _ESCAPED_BYTE_SURROGATE.search(body) is None
    return False


def encode_record(value: Any) -> bytes:
    """A parsed record as bytes again, whatever it holds. orjson parses 1,024 levels of nesting but
    serialises only 254: a record between the two (deep metadata) falls back to :func:`reencode`,
    so that validation names it (too deep) instead of the whole request or import failing."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return reencode(value)


class Unrepresentable:
    """A number of a body orjson refused that no double holds (``1e400``, an integer of 5,000
    digits), kept as its text: :func:`reencode` writes it back as it came, so that validation
    refuses the one record holding it (``number_out_of_range``) and the request's other records
    go through. Python's own parse made it ``inf`` (a record then refused as holding
    ``Infinity``, which it did not) or, past 4,300 digits, refused the whole body with the
    interpreter's advice to call ``sys.set_int_max_str_digits()``."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def lenient_float(text: str) -> float | Unrepresentable:
    value = float(text)
    return value if math.isfinite(value) else Unrepresentable(text)


def lenient_int(text: str) -> int | float | Unrepresentable:
    # As validation and orjson read them: 64-bit sizes exact, longer ones as doubles; never int()
    # of a long digit string (capped at 4,300 digits, and quadratic below that).
    return int(text) if len(text) <= 21 else lenient_float(text)


def _lenient_loads(body: bytes) -> Any:
    """Parse a body orjson refused (invalid UTF-8 or lone surrogates in some record, a number out
    of the double range) so that the other records still go through; a body that is not JSON at
    all is a 400."""
    text = body.decode("utf-8", "surrogateescape")
    try:
        return json.loads(text, parse_float=lenient_float, parse_int=lenient_int)
    except RecursionError:
        raise BodyError(400, "too_deep", "the body nests too deeply") from None
    except ValueError as e:
        raise BodyError(400, "invalid_json", f"the body is not JSON: {str(e)[:200]}") from None


def reencode(value: Any, *, restore_bytes: bool = False) -> bytes:
    """A value parsed by the lenient parser as bytes again, faithful enough for validation to name
    what is wrong with it; ``restore_bytes`` (see :func:`restores_raw_bytes`): lone surrogates
    U+DC80-U+DCFF written back as the invalid bytes they stood for, else all kept escaped."""
    numbers = RawNumbers()
    try:
        if restore_bytes:
            # Restores invalid UTF-8 bytes as they came: validation reports them as invalid_utf8.
            text = json.dumps(value, ensure_ascii=False, allow_nan=True, default=numbers.placeholder)
            with contextlib.suppress(UnicodeEncodeError):  # a lone surrogate no byte stands for (\ud800)
                return numbers.restore(text).encode("utf-8", "surrogateescape")
        # Every lone surrogate kept as its escape: validation names it (invalid_unicode).
        text = json.dumps(value, ensure_ascii=True, allow_nan=True, default=numbers.placeholder)
        return numbers.restore(text).encode("ascii")
    except RecursionError:
        return b"[" * 2000  # validation reports it as too deep


class RawNumbers:
    """Writes :class:`Unrepresentable` numbers back as their text. ``json.dumps`` can only write a
    JSON value for an object it does not know, so each becomes a string placeholder, then the
    placeholder's quoted form is replaced by the number's text. The placeholders carry a random
    nonce: a string of the body cannot spell one."""

    def __init__(self) -> None:
        self.nonce = secrets.token_hex(16)
        self.texts: list[str] = []

    def placeholder(self, o: object) -> str:
        if not isinstance(o, Unrepresentable):
            raise TypeError(f"{type(o).__name__} is not JSON")
        self.texts.append(o.text)
        return f"{self.nonce}:{len(self.texts) - 1}"

    def restore(self, text: str) -> str:
        if not self.texts:
            return text
        # One pass, whatever the count: a record of 50,000 such numbers must not cost 50,000 scans.
        return re.sub(f'"{self.nonce}:([0-9]+)"', lambda m: self.texts[int(m.group(1))], text)


def split_records(body: bytes, content_type: str, max_records: int) -> list[bytes]:
    media = content_type.split(";", 1)[0].strip().lower()
    # A byte-order mark, as Windows tools write one (RFC 8259 lets a parser ignore it): without
    # this the body, or its first line, was refused with Python's "Unexpected UTF-8 BOM".
    body = body.removeprefix(b"\xef\xbb\xbf")
    if media in NDJSON_TYPES:
        return split_ndjson(body, max_records)
    if media in JSON_TYPES or media.endswith("+json"):
        return split_json_array(body, max_records)
    raise BodyError(
        415, "unsupported_media_type", "Content-Type must be application/json (an array) or application/x-ndjson"
    )
