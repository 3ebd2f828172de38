"""JSONL episodes from a file (plain or gzip), a pipe, or stdin.

The position of a record is the byte offset of its line in the
(decompressed) stream, so a regular-file source resumes where the store says
it stopped. Blank (whitespace-only) lines are not records, and a UTF-8 BOM
at the start of the stream is skipped. Lines longer than the episode limit
are not read into memory whole: the first bytes are kept for the dead letter
and the rest is skipped. Pipes (stdin, FIFOs) are read by a thread, so a
batch is committed after ``timeout`` even while the writer is quiet.

A damaged input (a gzip file cut short or failing its CRC, a read error) ends where the damage
starts, for a file as for a pipe: the lines read before it are processed and committed, the error
is logged once and kept in :attr:`FileSource.input_error` (``file_input_error``), which the
commands report (the replay's report, exit code 1). It used to end a file's replay with the
batch in progress lost and its offset stored, so the replay could be neither finished nor run again.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import queue
import stat
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any, BinaryIO, cast

from monitor.fileio import READ_ERRORS
from monitor.sources.base import Rebalance, Record, Source

log = logging.getLogger(__name__)

_EOF = object()
READ_AHEAD = 500  # lines a pipe's reader thread takes ahead of the pipeline (what a stop still processes)


_BOM = b"\xef\xbb\xbf"


def _lines(
    fh: BinaryIO, limit: int, start: int, *, hold_partial: bool = False, name: str = ""
) -> Iterator[tuple[bytes, int, int, int | None]]:
    """(value, start, next_offset, full_size if truncated) for every non-blank line.

    Whitespace-only lines are blank whatever their length (an oversize one is skipped in
    chunks, never read whole). A UTF-8 byte-order mark at offset 0 (editors on Windows write
    one) is not part of the first record, which starts at offset 3: offsets stay byte offsets
    of the stream, so a resume seeks past it.

    ``hold_partial`` (a regular file, which a later run resumes): a last line without its newline
    that is not a whole JSON value is a line its writer has not finished. It is left for the next
    run, its offset not passed: read now, it was a dead letter, and the next run, starting where it
    ended, made the rest of the line another one; the episode was lost. A whole last line without
    a newline (a file that simply ends so) is read as before."""
    pos = start
    while True:
        begin = pos
        size = limit + 2 + (len(_BOM) if begin == 0 else 0)
        line = fh.readline(size)
        if not line:
            return
        pos += len(line)
        if begin == 0 and line.startswith(_BOM):
            line, begin = line[len(_BOM) :], len(_BOM)
        if not line.endswith(b"\n") and len(line) > limit:
            blank, ended = line.isspace(), False
            while True:
                chunk = fh.readline(1 << 20)
                if not chunk:
                    break
                pos += len(chunk)
                blank = blank and chunk.isspace()
                if chunk.endswith(b"\n"):
                    ended = True
                    break
            if hold_partial and not ended and not blank:
                _held(name, begin, pos - begin)
                return
            if not blank:
                yield line, begin, pos, pos - begin
            continue
        value = line.rstrip(b"\r\n")
        if hold_partial and not line.endswith(b"\n") and value.strip() and not _whole_json(value):
            _held(name, begin, len(line))
            return
        if value.strip():
            yield value, begin, pos, None


def _replaced(name: str, start: int, why: str) -> Exception:
    from monitor.config import ConfigError

    return ConfigError(
        f"the database holds {name} up to byte {start}, but {why}: it was replaced or cut since."
        " Read a new file into a fresh database (--db), or under another name (the progress is kept"
        " per file name)"
    )


def _whole_json(value: bytes) -> bool:
    """Whether ``value`` parses as JSON: no proper prefix of a JSON object does."""
    try:
        json.loads(value)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return False
    return True


def _held(name: str, begin: int, size: int) -> None:
    log.warning(
        "%s: the last line (byte %d, %d bytes) has no newline and is not whole yet: left for the next run",
        name,
        begin,
        size,
    )


class FileSource:
    def __init__(self, path: str | None, max_line_bytes: int, *, resume: bool = True):
        """``path`` None or ``-`` reads stdin; pipes are never resumed.

        ``resume=False`` (a replay) reads from the first record, into a database that does not
        hold this input yet: :meth:`open` refuses one that does (a replay cannot resume, and
        reading it again would count its traffic twice)."""
        self._stdin = path in (None, "-")
        self.path = None if self._stdin else os.path.abspath(str(path))
        self.name = "stdin" if self._stdin else f"file:{self.path}"
        self._pipe = self._stdin or not stat.S_ISREG(os.stat(str(self.path)).st_mode)
        self._limit = max_line_bytes
        self._resume = resume and not self._pipe
        self._fresh_only = not resume
        # A run that a later one continues leaves an unfinished last line to it; a replay, read
        # once, has no later run: its last line is a record (or a dead letter) as it stands.
        self._hold_partial = self._resume
        self._fh: BinaryIO | None = None
        self._it: Iterator[tuple[bytes, int, int, int | None]] | None = None
        self._queue: queue.Queue[object] | None = None
        self._stop_reading = threading.Event()
        self._eof = False
        self._rebalance: Rebalance | None = None
        # Where the last record read ends, and why the input ended early (None: it did not).
        self._pos = 0
        self.input_error: str | None = None

    def _open_stream(self) -> BinaryIO:
        if self._pipe:
            raw: Any = _stdin_reader() if self._stdin else open(str(self.path), "rb")  # noqa: SIM115
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
        # Always asked, also when not resuming: the pipeline's compare-and-set of the offset
        # must expect what the store holds, or every batch would be rolled back as stale.
        stored = rebalance.assigned([0]).get(0)
        if self._fresh_only and stored is not None:
            from monitor.config import ConfigError

            if self.name.startswith("import:"):  # `oversight import` names its source import:PATH
                # Not `oversight run`: it reads episodes, so it dead-lettered an export's every line.
                raise ConfigError(
                    f"the database already holds {self.name} (up to byte {stored}): an import reads its"
                    " input from the start and cannot resume. Import it into a fresh database (--db)"
                )
            raise ConfigError(
                f"the database already holds {self.name} (up to byte {stored}): a replay reads its input"
                " from the start and cannot resume. Replay into a fresh database (--db), or continue a"
                " file where it stopped with `oversight run --input FILE`"
            )
        # From here on the stored offset is this run's own progress: a rewind resumes from it.
        self._fresh_only = False
        self._resume = not self._pipe
        if self._pipe:
            self._start_reader()
            return
        self._fh = self._open_stream()
        start = self._pos = int(stored or 0) if self._resume else 0
        try:
            if start:
                self._fh.seek(start)  # a gzip decompresses up to there: its damage may show now
                self._check_holds(start)
        except READ_ERRORS as e:
            self._read_failed(e)
            self._eof = True
        self._it = _lines(self._fh, self._limit, start, hold_partial=self._hold_partial, name=self.name)

    def _check_holds(self, start: int) -> None:
        """Refuse to resume past the end of the input: the file was replaced or cut since the stored
        offset was written, and a seek there read nothing, so a new file's records were skipped
        silently ("stopped after 0 records", status 0)."""
        fh: Any = self._fh
        # A gzip's seek stops at its end; a plain file's may go past it.
        end = fh.tell() if isinstance(fh, gzip.GzipFile) else os.fstat(fh.fileno()).st_size
        if end < start:
            raise _replaced(self.name, start, f"the file now ends at byte {end}")
        if start > len(_BOM) and not self._line_ends_before(start):
            raise _replaced(self.name, start, "no line ends there now")

    def _line_ends_before(self, start: int) -> bool:
        """Whether a line ends at ``start``, as it does where a stored offset was written: the byte
        before is a newline, or (the last record had no newline when it was read) the byte there is
        one, or the end. A file replaced by a longer one at the same path was read from the old
        offset, mid-line, its first records skipped without a word; a replacement rarely has a line
        end at just that byte (one per line's length of bytes)."""
        fh: Any = self._fh
        if isinstance(fh, gzip.GzipFile):
            fh.seek(start - 1)  # backwards: the gzip decompresses from its start again, once
            around = fh.read(2)
        else:
            around = os.pread(fh.fileno(), 2, start - 1)
        fh.seek(start)
        return around[:1] == b"\n" or around[1:] in (b"", b"\n", b"\r")

    def _read_failed(self, e: BaseException) -> None:
        """The input ends here: said once, kept for the command's report."""
        # Not monitor.retry.first_line: importing it here closes an import cycle (through monitor.metrics).
        detail = (str(e).splitlines() or [type(e).__name__])[0][:300]
        self.input_error = f"reading {self.name} failed after byte {self._pos}: {detail}"
        log.error("%s; treating it as the end of the input", self.input_error)

    def _start_reader(self) -> None:
        """A pipe is read by a thread: everything that can block (opening a FIFO waits for its
        writer, the gzip check waits for the first bytes, every read waits for the next line)
        happens there, so the pipeline's loop keeps seeing its stop. A pipe is a new input every
        time: it is read from its start (its positions restart at 0)."""
        q: queue.Queue[object] = queue.Queue(maxsize=READ_AHEAD)
        self._queue = q
        stop_reading = self._stop_reading
        limit = self._limit

        def pump() -> None:
            try:
                fh = self._fh = self._open_stream()
                for item in _lines(fh, limit, 0):
                    q.put(item)
                    self._pos = item[2]
                    if stop_reading.is_set():
                        return  # a stop: what was read is processed, nothing more is taken
            except READ_ERRORS as e:  # a broken or corrupt stream ends the input, said once
                self._read_failed(e)
            finally:
                q.put(_EOF)

        threading.Thread(target=pump, name="file-source-reader", daemon=True).start()

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        if self._eof or (self._it is None and self._queue is None):
            return []
        now = time.time()
        out: list[Record] = []
        if self._queue is None:
            assert self._it is not None
            try:
                for value, begin, end, full in self._it:
                    out.append(Record(value, 0, begin, end, now, full_size=full))
                    self._pos = end
                    if len(out) >= max_records:
                        return out
            except READ_ERRORS as e:  # the lines before the damage are this batch, and the last
                self._read_failed(e)
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

    def take_read_ahead(self, max_records: int) -> list[Record]:
        """On a stop: the lines a pipe's reader already took, without waiting (see ReadAhead)."""
        self._stop_reading.set()
        if self._queue is None:
            return []  # a regular file: nothing is lost, a restart resumes from the store
        return self.poll(max_records, 0.0)

    def rewind(self) -> None:
        assert self._rebalance is not None
        if self._pipe:
            # A pipe cannot be re-read (the store's CAS refused the batch): only learn the
            # stored offset again, so that the next batch's compare-and-set can succeed.
            self._rebalance.assigned([0])
            return
        self.close()
        self._eof = False
        self.open(self._rebalance)

    def lag(self) -> dict[int, int]:
        return {}

    def failures(self) -> Mapping[str, int]:
        return {}  # nothing is retried: a broken stream ends the input (said once)

    def ready(self) -> bool:
        # A pipe waiting for its writer, or for its next line, is a live source with nothing to say.
        return self._fh is not None or self._queue is not None

    def close(self) -> None:
        # A pipe's reader thread may be blocked in readline holding the buffer's lock; closing
        # would wait for the writer. It dies with us (see _stdin_reader).
        if self._fh is not None and not self._pipe:
            self._fh.close()
        self._fh = None
        self._it = None
        self._queue = None


def file_input_error(source: Source) -> str | None:
    """Why ``source``'s input ended early (a damaged file), or None: it did not, or it is not a file."""
    return source.input_error if isinstance(source, FileSource) else None


def _stdin_reader() -> io.BufferedReader:
    """A reader of our own on a duplicate of file descriptor 0, not ``sys.stdin.buffer``: the
    reader thread may be blocked in a read when the interpreter exits (a SIGTERM while the
    writer is quiet), and a thread holding the interpreter's own stdin buffer then aborts the
    exit ("Fatal Python error: _enter_buffered_busy", exit 134)."""
    try:
        fd = os.dup(sys.stdin.fileno())
    except (AttributeError, OSError, ValueError):  # no real stdin (embedded, closed): use what there is
        return cast(io.BufferedReader, sys.stdin.buffer)
    return io.BufferedReader(io.FileIO(fd, "rb"))
