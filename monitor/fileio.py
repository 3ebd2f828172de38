"""Reading episode and pair files that may be gzip-compressed, whatever their name says.

One place sniffs the gzip magic (``1f 8b``), so every reader agrees on what a file is: a
``.jsonl`` that is really gzip, or a ``.gz`` that is really plain, reads the same everywhere.
Stdlib only: imported by the CLI before any command runs.
"""

from __future__ import annotations

import gzip
import os
from typing import IO, Any, cast

GZIP_MAGIC = b"\x1f\x8b"


def is_gzip(path: str | os.PathLike[str]) -> bool:
    with open(path, "rb") as probe:
        return probe.read(2) == GZIP_MAGIC


def open_maybe_gzip(path: str | os.PathLike[str], *, text: bool = False) -> IO[Any]:
    """Open a plain or gzip file for reading, binary (default) or UTF-8 text."""
    if is_gzip(path):
        # GzipFile is a binary stream that typeshed does not count as IO[bytes].
        return gzip.open(path, "rt", encoding="utf-8") if text else cast(IO[bytes], gzip.open(path, "rb"))
    return open(path, encoding="utf-8") if text else open(path, "rb")


def count_lines(path: str) -> int | None:
    """Non-blank lines (records) of a plain or gzip file; None for stdin ('-'), which cannot be read twice."""
    if path == "-":
        return None
    with open_maybe_gzip(path) as fh:
        return sum(1 for line in fh if line.strip())
