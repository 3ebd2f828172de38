"""JSONL episodes from a file (plain or gzip), a pipe, or stdin.

The position of a record is the byte offset of its line in the
(decompressed) stream, so a regular-file source resumes where the store says
it stopped. Blank lines are not records. Lines longer than the episode limit
are not read into memory whole: the first bytes are kept for the dead letter
and the rest is skipped. Pipes (stdin, FIFOs) are read by a thread, so a
batch is committed after ``timeout`` even while the writer is quiet.
"""

from __future__ import annotations

import gzip
import io
import os
import queue
import stat
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any, BinaryIO, cast

from monitor.sources.base import Rebalance, Record

_EOF = object()


def _lines(fh: BinaryIO, limit: int, start: int) -> Iterator[tuple[bytes, int, int, int | None]]:
    """(value, start, next_offset, full_size if truncated) for every non-blank line."""
    pos = start
    while True:
        begin = pos
        line = fh.readline(limit + 2)
        if not line:
            return
        pos += len(line)
        if not line.endswith(b"\n") and len(line) > limit:
            while True:
                chunk = fh.readline(1 << 20)
                if not chunk:
                    break
                pos += len(chunk)
                if chunk.endswith(b"\n"):
                    break
            yield line, begin, pos, pos - begin
            continue
        value = line.rstrip(b"\r\n")
        if value.strip():
            yield value, begin, pos, None


class FileSource:
    def __init__(self, path: str | None, max_line_bytes: int, *, resume: bool = True):
        """``path`` None or ``-`` reads stdin; pipes are never resumed."""
        self._stdin = path in (None, "-")
        self.path = None if self._stdin else os.path.abspath(str(path))
        self.name = "stdin" if self._stdin else f"file:{self.path}"
        self._pipe = self._stdin or not stat.S_ISREG(os.stat(str(self.path)).st_mode)
        self._limit = max_line_bytes
        self._resume = resume and not self._pipe
        self._fh: BinaryIO | None = None
        self._it: Iterator[tuple[bytes, int, int, int | None]] | None = None
        self._queue: queue.Queue[object] | None = None
        self._eof = False
        self._rebalance: Rebalance | None = None

    def _open_stream(self) -> BinaryIO:
        if self._pipe:
            raw: Any = sys.stdin.buffer if self._stdin else open(str(self.path), "rb")  # noqa: SIM115
            if not isinstance(raw, io.BufferedReader):
                raw = io.BufferedReader(raw)
            if raw.peek(2)[:2] == b"\x1f\x8b":
                return gzip.GzipFile(fileobj=raw)  # type: ignore[return-value]
            return cast(BinaryIO, raw)
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
        self._it = _lines(self._fh, self._limit, start)
        if self._pipe:
            q: queue.Queue[object] = queue.Queue(maxsize=10000)
            self._queue = q
            it = self._it

            def pump() -> None:
                try:
                    for item in it:
                        q.put(item)
                finally:
                    q.put(_EOF)

            threading.Thread(target=pump, name="file-source-reader", daemon=True).start()

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        if self._eof or self._it is None:
            return []
        now = time.time()
        out: list[Record] = []
        if self._queue is None:
            for value, begin, end, full in self._it:
                out.append(Record(value, 0, begin, end, now, full_size=full))
                if len(out) >= max_records:
                    return out
            self._eof = True
            return out
        deadline = time.monotonic() + timeout_s
        while len(out) < max_records:
            try:
                item = (
                    self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                    if not out
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if item is _EOF:
                self._eof = True
                break
            value, begin, end, full = item  # type: ignore[misc]
            out.append(Record(value, 0, begin, end, time.time(), full_size=full))
        return out

    @property
    def exhausted(self) -> bool:
        return self._eof

    def commit(self, offsets: Mapping[int, int]) -> None:
        """Nothing to do: the store holds the file position."""

    def guard(self, records: list[Record]) -> AbstractContextManager[bool]:
        return nullcontext(True)

    def rewind(self) -> None:
        assert self._rebalance is not None
        if self._pipe:
            return  # a pipe cannot be re-read; the store's CAS already refused the batch
        self.close()
        self._eof = False
        self.open(self._rebalance)

    def lag(self) -> dict[int, int]:
        return {}

    def ready(self) -> bool:
        return self._fh is not None

    def close(self) -> None:
        # A pipe's reader thread may be blocked in readline holding the
        # buffer's lock; closing would wait for the writer. It dies with us.
        if self._fh is not None and not self._pipe:
            self._fh.close()
        self._fh = None
        self._it = None
