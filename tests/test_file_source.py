"""The JSONL file source: plain and gzip, blank lines, oversize lines, byte-offset resume."""

from __future__ import annotations

import gzip
from collections.abc import Mapping
from pathlib import Path

from monitor.sources.file import FileSource


class Positions:
    def __init__(self, stored: dict[int, int] | None = None):
        self.stored = stored or {}

    def assigned(self, partitions: list[int]) -> Mapping[int, int]:
        return self.stored

    def revoked(self, partitions: list[int]) -> None:
        pass


def drain(src: FileSource, n: int = 3) -> list[bytes]:
    out = []
    while not src.exhausted:
        out += [r.value for r in src.poll(n, 0.0)]
    return out


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
    not_resumed = FileSource(str(path), 1000, resume=False)
    not_resumed.open(Positions({0: first[-1].next_offset}))
    assert len(drain(not_resumed)) == 10


def test_oversize_line_is_truncated_and_skipped(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    big = b'{"x":"' + b"y" * (5 * 1024 * 1024) + b'"}'
    path.write_bytes(b'{"a":1}\n' + big + b'\n{"b":2}\n')
    src = FileSource(str(path), 1000)
    src.open(Positions())
    recs = []
    while not src.exhausted:
        recs += src.poll(10, 0.0)
    assert [r.value for r in recs][::2] == [b'{"a":1}', b'{"b":2}']
    assert recs[1].full_size == len(big) + 1 and len(recs[1].value) <= 1002
    assert recs[2].offset == 8 + len(big) + 1
