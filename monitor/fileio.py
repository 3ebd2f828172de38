"""Reading episode and pair files that may be gzip-compressed, whatever their name says.

One place sniffs the gzip magic (``1f 8b``), so every reader agrees on what a file is: a
``.jsonl`` that is really gzip, or a ``.gz`` that is really plain, reads the same everywhere.
Stdlib only: imported by the CLI before any command runs.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import io
import os
import zlib
from collections.abc import Iterator
from typing import IO, Any, cast

GZIP_MAGIC = b"\x1f\x8b"
# What reading a damaged gzip raises: EOFError (cut short), BadGzipFile (an OSError: a CRC or length
# that does not match), zlib.error (invalid compressed data); with OSError, any read error.
READ_ERRORS = (OSError, EOFError, zlib.error)


class DamagedFile(OSError):
    """A compressed file that cannot be read to its end: an OSError naming the file, so that a command
    says which file and why in one line, where a bare EOFError named neither."""

    def __init__(self, path: str, cause: BaseException):
        super().__init__(errno.EIO, f"damaged gzip file: {cause}", path)


class _GzipReader(gzip.GzipFile):
    """Reads like GzipFile; its damage is a :class:`DamagedFile` (through every way of reading:
    ``read``, ``read1`` for a text wrapper, ``readline`` for iteration)."""

    @contextlib.contextmanager
    def _named_damage(self) -> Iterator[None]:
        try:
            yield
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise DamagedFile(str(self.name), e) from None

    def read(self, size: int | None = -1) -> bytes:
        with self._named_damage():
            return super().read(size)

    def read1(self, size: int = -1) -> bytes:
        with self._named_damage():
            return super().read1(size)

    def readline(self, size: int | None = -1) -> bytes:
        with self._named_damage():
            return super().readline(size)


def is_gzip(path: str | os.PathLike[str]) -> bool:
    with open(path, "rb") as probe:
        return probe.read(2) == GZIP_MAGIC


def open_maybe_gzip(path: str | os.PathLike[str], *, text: bool = False) -> IO[Any]:
    """Open a plain or gzip file for reading, binary (default) or UTF-8 text."""
    if is_gzip(path):
        # GzipFile is a binary stream that typeshed does not count as IO[bytes].
        reader = _GzipReader(os.fspath(path), "rb")
        return io.TextIOWrapper(reader, encoding="utf-8") if text else cast(IO[bytes], reader)
    return open(path, encoding="utf-8") if text else open(path, "rb")


# A configuration or a kind's file is a few KB; more is not one (``--config /dev/zero`` was read
# until the machine ran out of memory).
MAX_CONFIG_BYTES = 4 << 20


class FileTooLarge(ValueError):
    """A file read whole was larger than its limit."""


def read_text_limited(path: str | os.PathLike[str], limit: int = MAX_CONFIG_BYTES) -> str:
    """A UTF-8 text file read whole, at most ``limit`` bytes (else :class:`FileTooLarge`); ``OSError``
    and ``UnicodeDecodeError`` as ``Path.read_text`` raises them."""
    with open(path, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise FileTooLarge(f"{os.fspath(path)} is larger than {limit} bytes")
    return data.decode("utf-8")


def count_lines(path: str) -> int | None:
    """Non-blank lines (records) of a plain or gzip file; None for stdin ('-'), which cannot be read twice.

    Read in blocks, not lines: one line of 2 GB (a 2 MB gzip) was held whole, twice over, only to be
    counted, where replaying the same file without ``--progress`` held a record at a time."""
    if path == "-":
        return None
    n = 0
    blank = True  # the line read so far holds nothing but whitespace
    with open_maybe_gzip(path) as fh:
        try:
            # read1: one read of the file a block, so the lines before damage are counted (a whole
            # read(n) lost the block the damage ended, a gzip's CRC error at its end among them).
            reader = cast(io.BufferedIOBase, fh)  # a GzipFile or a BufferedReader: both have read1
            for block in iter(lambda: reader.read1(1 << 16), b""):
                pieces = block.split(b"\n")
                for i, piece in enumerate(pieces):
                    if i:  # a newline ended the line before this piece
                        n += not blank
                        blank = True
                    blank = blank and not piece.strip()
        except READ_ERRORS:
            pass  # the lines before the damage: what the reader of the input will get
    return n + (not blank)
