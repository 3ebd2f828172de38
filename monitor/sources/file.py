"""JSONL episodes from a file (plain or gzip) or stdin.

The position of a record is the byte offset of its line in the
(decompressed) stream, so a file source resumes where the store says it
stopped. Blank lines are not records. Lines longer than the episode limit are
not read into memory whole: the first bytes are kept for the dead letter and
the rest is skipped.
"""

from __future__ import annotations

import gzip
import io
import os
import sys
import time
from collections.abc import Mapping
from typing import BinaryIO

from monitor.sources.base import Rebalance, Record


class FileSource:
    def __init__(self, path: str | None, max_line_bytes: int, *, resume: bool = True):
        """``path`` None or ``-`` reads stdin (never resumed)."""
        self._stdin = path in (None, "-")
        self.path = None if self._stdin else os.path.abspath(str(path))
        self.name = "stdin" if self._stdin else f"file:{self.path}"
        self._limit = max_line_bytes
        self._resume = resume and not self._stdin
        self._fh: BinaryIO | None = None
        self._pos = 0
        self._eof = False
        self._rebalance: Rebalance | None = None

    def _open_stream(self) -> BinaryIO:
        if self._stdin:
            raw: BinaryIO = sys.stdin.buffer
            peek = raw.peek(2)[:2] if isinstance(raw, io.BufferedReader) else b""
            if peek == b"\x1f\x8b":
                return gzip.GzipFile(fileobj=raw)  # type: ignore[return-value]
            return raw
        assert self.path is not None
        with open(self.path, "rb") as probe:
            magic = probe.read(2)
        if magic == b"\x1f\x8b":
            return gzip.open(self.path, "rb")  # type: ignore[return-value]
        return open(self.path, "rb", buffering=1 << 20)

    def open(self, rebalance: Rebalance) -> None:
        self._rebalance = rebalance
        self._fh = self._open_stream()
        start = int(rebalance.assigned([0]).get(0, 0)) if self._resume else 0
        if start:
            self._fh.seek(start)
        self._pos = start

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        fh = self._fh
        if fh is None or self._eof:
            return []
        out: list[Record] = []
        now = time.time()
        limit = self._limit
        while len(out) < max_records:
            start = self._pos
            line = fh.readline(limit + 2)
            if not line:
                self._eof = True
                break
            self._pos += len(line)
            if not line.endswith(b"\n") and len(line) > limit:
                # Oversize: keep what we read, skip the rest of the line.
                while True:
                    chunk = fh.readline(1 << 20)
                    if not chunk:
                        break
                    self._pos += len(chunk)
                    if chunk.endswith(b"\n"):
                        break
                out.append(Record(line, 0, start, self._pos, now, full_size=self._pos - start))
                continue
            value = line.rstrip(b"\r\n")
            if not value.strip():
                continue
            out.append(Record(value, 0, start, self._pos, now))
        return out

    @property
    def exhausted(self) -> bool:
        return self._eof

    def commit(self, offsets: Mapping[int, int]) -> None:
        """Nothing to do: the store holds the file position."""

    def rewind(self) -> None:
        assert self._rebalance is not None
        self.close()
        self._eof = False
        self.open(self._rebalance)

    def lag(self) -> dict[int, int]:
        return {}

    def ready(self) -> bool:
        return self._fh is not None

    def close(self) -> None:
        if self._fh is not None and not self._stdin:
            self._fh.close()
        self._fh = None
