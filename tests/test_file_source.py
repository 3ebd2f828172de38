"""The JSONL file source: plain and gzip, blank lines, oversize lines, byte-offset resume."""

from __future__ import annotations

import gzip
import os
import threading
from collections.abc import Mapping
from pathlib import Path

import pytest

from monitor.config import ConfigError
from monitor.sources.base import Record
from monitor.sources.file import FileSource


class Positions:
    def __init__(self, stored: dict[int, int] | None = None):
        self.stored = stored or {}

    def assigned(self, partitions: list[int]) -> Mapping[int, int]:
        return self.stored

    def revoked(self, partitions: list[int]) -> None:
        pass


def drain_records(src: FileSource, n: int = 3) -> list[Record]:
    """Every record until the source is exhausted."""
    out: list[Record] = []
    while not src.exhausted:
        out += src.poll(n, 0.0)
    return out


def drain(src: FileSource, n: int = 3) -> list[bytes]:
    return [r.value for r in drain_records(src, n)]


def test_plain_and_gzip_with_blank_lines(tmp_path: Path) -> None:
    content = b'{"a":1}\n\n   \n{"b":2}\r\n{"c":3}'
    plain = tmp_path / "x.jsonl"
    plain.write_bytes(content)
    gz = tmp_path / "x.jsonl.gz"
    gz.write_bytes(gzip.compress(content))
    for path in (plain, gz):
        src = FileSource(str(path), 1000)
        src.open(Positions())
        assert drain(src) == [b'{"a":1}', b'{"b":2}', b'{"c":3}']
        src.close()


def test_resume_from_byte_offset(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl.gz"
    path.write_bytes(gzip.compress(b"".join(b'{"i":%d}\n' % i for i in range(10))))
    src = FileSource(str(path), 1000)
    src.open(Positions())
    first = src.poll(4, 0.0)
    src.close()
    resumed = FileSource(str(path), 1000)
    resumed.open(Positions({0: first[-1].next_offset}))
    assert drain(resumed)[0] == b'{"i":4}'
    # A replay (resume=False) reads from the start, into a store that does not hold this input:
    # one that does is refused at once (reading it again would count it twice).
    fresh = FileSource(str(path), 1000, resume=False)
    fresh.open(Positions())
    assert len(drain(fresh)) == 10
    with pytest.raises(ConfigError, match="already holds"):
        FileSource(str(path), 1000, resume=False).open(Positions({0: first[-1].next_offset}))


@pytest.mark.parametrize("gz", [False, True])
def test_resuming_past_the_end_of_a_replaced_file_is_refused(tmp_path: Path, gz: bool) -> None:
    """A file replaced by a shorter one was sought past its end and read as empty: its records were
    skipped with status 0. At its end exactly (a finished file) there is simply nothing more."""
    path = tmp_path / ("x.jsonl.gz" if gz else "x.jsonl")
    content = b"".join(b'{"i":%d}\n' % i for i in range(30))
    path.write_bytes(gzip.compress(content) if gz else content)
    done = FileSource(str(path), 1000)
    done.open(Positions({0: len(content)}))
    assert drain(done) == []
    done.close()
    path.write_bytes(gzip.compress(content[:40]) if gz else content[:40])
    with pytest.raises(ConfigError, match=f"up to byte {len(content)}, but the file now ends at byte 40"):
        FileSource(str(path), 1000).open(Positions({0: len(content)}))


@pytest.mark.parametrize("gz", [False, True])
def test_resuming_a_file_replaced_by_a_longer_one_is_refused(tmp_path: Path, gz: bool) -> None:
    """Rotated (or a symlink retargeted) and already longer than the stored offset: the new file was
    read from the old offset, mid-line, its first records skipped without a word. The stored offset
    always follows a newline; in another file it seldom does."""
    path = tmp_path / ("x.jsonl.gz" if gz else "x.jsonl")
    old = b"".join(b'{"old":%d}\n' % i for i in range(10))
    path.write_bytes(gzip.compress(old) if gz else old)
    new = b"".join(b'{"episode":"new-%d","text":"%s"}\n' % (i, b"x" * (i % 7)) for i in range(40))
    assert b"\n" not in new[len(old) - 1 : len(old) + 1]  # no line ends at the stored offset
    path.write_bytes(gzip.compress(new) if gz else new)
    with pytest.raises(ConfigError, match=f"up to byte {len(old)}, but no line ends there now"):
        FileSource(str(path), 1000).open(Positions({0: len(old)}))
    # The same file grown (appended to) resumes as before.
    path.write_bytes(gzip.compress(old + new) if gz else old + new)
    grown = FileSource(str(path), 1000)
    grown.open(Positions({0: len(old)}))
    assert len(drain(grown)) == 40


@pytest.mark.parametrize("gz", [False, True])
def test_an_unfinished_last_line_is_left_for_the_next_run(tmp_path: Path, gz: bool) -> None:
    """A last line its writer has not finished (no newline, not whole JSON) was read as a dead
    letter, and the next run, starting where it ended, made the rest another: the episode was
    lost. It is left for the next run now; a replay, which has no next run, still reads it."""
    path = tmp_path / ("x.jsonl.gz" if gz else "x.jsonl")
    whole = b'{"a":1}\n{"b":2}\n'
    third = b'{"c":"' + b"z" * 50 + b'"}'
    path.write_bytes(gzip.compress(whole + third[:20]) if gz else whole + third[:20])
    first = FileSource(str(path), 1000)
    first.open(Positions())
    recs = drain_records(first, 10)
    first.close()
    assert [r.value for r in recs] == [b'{"a":1}', b'{"b":2}'] and recs[-1].next_offset == len(whole)
    replay = FileSource(str(path), 1000, resume=False)
    replay.open(Positions())
    assert drain(replay)[-1] == third[:20]
    path.write_bytes(gzip.compress(whole + third + b'\n{"d":4}') if gz else whole + third + b'\n{"d":4}')
    second = FileSource(str(path), 1000)
    second.open(Positions({0: len(whole)}))
    assert drain(second) == [third, b'{"d":4}']  # a whole last line without a newline is read


def test_a_file_whose_whole_last_line_had_no_newline_resumes_when_it_grows(tmp_path: Path) -> None:
    """The stored offset may follow a whole last record read without its newline: the file grown
    since ("\n" and more records after it) is the same file, and resumes."""
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a":1}\n{"b":2}')
    first = FileSource(str(path), 1000)
    first.open(Positions())
    recs = drain_records(first, 10)
    first.close()
    assert [r.value for r in recs] == [b'{"a":1}', b'{"b":2}']
    path.write_bytes(b'{"a":1}\n{"b":2}\n{"c":3}\n')
    grown = FileSource(str(path), 1000)
    grown.open(Positions({0: recs[-1].next_offset}))
    assert drain(grown) == [b'{"c":3}']


def test_an_unfinished_oversize_last_line_is_left_too(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a":1}\n' + b'{"x":"' + b"y" * 5000)
    src = FileSource(str(path), 1000)
    src.open(Positions())
    assert drain(src) == [b'{"a":1}']


def test_oversize_line_is_truncated_and_skipped(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    big = b'{"x":"' + b"y" * (5 * 1024 * 1024) + b'"}'
    path.write_bytes(b'{"a":1}\n' + big + b'\n{"b":2}\n')
    src = FileSource(str(path), 1000)
    src.open(Positions())
    recs = drain_records(src, 10)
    assert [r.value for r in recs][::2] == [b'{"a":1}', b'{"b":2}']
    assert recs[1].full_size == len(big) + 1 and len(recs[1].value) <= 1002
    assert recs[2].offset == 8 + len(big) + 1


def test_whitespace_only_oversize_line_is_blank(tmp_path: Path) -> None:
    # Spaces, tabs and CRs far beyond the limit: not a record (the old reader dead-lettered it as oversize).
    blank = b" \t\r" * 700_000
    content = b'{"a":1}\n' + blank + b"\n" + blank + b'\n{"b":2}\n' + blank
    path = tmp_path / "x.jsonl"
    path.write_bytes(content)
    src = FileSource(str(path), 1000)
    src.open(Positions())
    recs = drain_records(src, 10)
    assert [(r.value, r.full_size) for r in recs] == [(b'{"a":1}', None), (b'{"b":2}', None)]
    assert recs[1].offset == content.index(b'{"b":2}')
    assert recs[1].next_offset == recs[1].offset + len(b'{"b":2}\n')


def test_oversize_line_with_content_after_whitespace_is_still_oversize(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(b" " * 5000 + b'{"x":1}\n{"b":2}\n')
    src = FileSource(str(path), 1000)
    src.open(Positions())
    recs = src.poll(10, 0.0)
    assert [r.full_size for r in recs] == [5008, None] and recs[1].value == b'{"b":2}'


BOM = b"\xef\xbb\xbf"


def test_bom_at_the_start_is_skipped_and_offsets_stay_true(tmp_path: Path) -> None:
    content = BOM + b'{"a":1}\n{"b":2}\n{"c":3}\n'
    plain = tmp_path / "x.jsonl"
    plain.write_bytes(content)
    gz = tmp_path / "x.jsonl.gz"
    gz.write_bytes(gzip.compress(content))
    for path in (plain, gz):
        src = FileSource(str(path), 1000)
        src.open(Positions())
        recs = src.poll(2, 0.0)
        src.close()
        assert [r.value for r in recs] == [b'{"a":1}', b'{"b":2}']
        assert recs[0].offset == 3 and recs[0].next_offset == 3 + 8 == recs[1].offset
        resumed = FileSource(str(path), 1000)
        resumed.open(Positions({0: recs[1].next_offset}))
        assert drain(resumed) == [b'{"c":3}']
        resumed.close()
    # Only at the start: a BOM inside the stream is data (the record is then invalid JSON).
    inner = tmp_path / "inner.jsonl"
    inner.write_bytes(b'{"a":1}\n' + BOM + b'{"b":2}\n')
    src = FileSource(str(inner), 1000)
    src.open(Positions())
    assert drain(src) == [b'{"a":1}', BOM + b'{"b":2}']


def test_bom_alone_or_before_a_long_first_line(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(BOM + b"\n" + b'{"b":2}\n')
    src = FileSource(str(path), 1000)
    src.open(Positions())
    assert drain(src) == [b'{"b":2}']
    # A first line of exactly the limit after the BOM is not oversize (the BOM is not part of it).
    line = b'{"x":"' + b"y" * 992 + b'"}'
    assert len(line) == 1000
    path.write_bytes(BOM + line + b"\n")
    src = FileSource(str(path), 1000)
    src.open(Positions())
    recs = src.poll(10, 0.0)
    assert [(r.value, r.full_size) for r in recs] == [(line, None)]


def through_a_pipe(tmp_path: Path, payload: bytes, batch: int = 10) -> tuple[FileSource, list[bytes]]:
    """``payload`` written into a FIFO by a thread and read by a FileSource to its end: the source
    and the values it gave."""
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_bytes, args=(payload,))
    writer.start()
    src = FileSource(str(fifo), 1000)
    src.open(Positions())
    got = []
    while not src.exhausted:
        got += [r.value for r in src.poll(batch, 1.0)]
    writer.join(5)
    return src, got


def test_bom_on_a_pipe(tmp_path: Path) -> None:
    _, got = through_a_pipe(tmp_path, BOM + b'{"a":1}\n' + b" " * 5000 + b'\n{"b":2}\n')
    assert got == [b'{"a":1}', b'{"b":2}']


def damaged_gzips(tmp_path: Path, lines: int) -> dict[str, Path]:
    """A gzip of ``lines`` JSONL lines cut at half its length, and one whose CRC does not match."""
    data = gzip.compress(b"".join(b'{"i":%d,"pad":"%s"}\n' % (i, b"x" * 200) for i in range(lines)))
    cut, bad_crc = tmp_path / "cut.jsonl.gz", tmp_path / "crc.jsonl.gz"
    cut.write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[-6] ^= 0xFF  # inside the CRC-32 of the trailer
    bad_crc.write_bytes(bytes(flipped))
    return {"cut": cut, "crc": bad_crc}


@pytest.mark.parametrize("damage", ["cut", "crc"])
def test_a_damaged_gzip_ends_the_input_where_the_damage_starts(tmp_path: Path, damage: str) -> None:
    """The lines before the damage are read, in batches as usual; then the input ends and says why
    once (``input_error``), instead of raising out of a poll with the batch in progress."""
    path = damaged_gzips(tmp_path, 2000)[damage]
    src = FileSource(str(path), 1000)
    src.open(Positions())
    got = drain(src, 300)
    assert src.exhausted and src.input_error is not None
    assert f"failed after byte {sum(len(v) + 1 for v in got)}" in src.input_error
    if damage == "crc":  # the CRC is checked at the end: every line was read
        assert len(got) == 2000 and "CRC check failed" in src.input_error
    else:
        assert 500 < len(got) < 2000 and "end-of-stream marker" in src.input_error
    assert got == [b'{"i":%d,"pad":"%s"}' % (i, b"x" * 200) for i in range(len(got))]
    # A restart resumes past what was committed and ends at the same damage, at once.
    resumed = FileSource(str(path), 1000)
    resumed.open(Positions({0: sum(len(v) + 1 for v in got)}))
    assert drain(resumed) == [] and resumed.input_error is not None
    # A whole file says nothing.
    whole = tmp_path / "whole.jsonl.gz"
    whole.write_bytes(gzip.compress(b'{"i":0}\n'))
    ok = FileSource(str(whole), 1000)
    ok.open(Positions())
    assert drain(ok) == [b'{"i":0}'] and ok.input_error is None


def test_a_damaged_gzip_on_a_pipe_says_so_too(tmp_path: Path) -> None:
    src, got = through_a_pipe(tmp_path, damaged_gzips(tmp_path, 2000)["cut"].read_bytes(), batch=500)
    assert 500 < len(got) < 2000 and src.input_error is not None and "end-of-stream marker" in src.input_error
