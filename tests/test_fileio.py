"""Gzip-aware reading (``monitor.fileio``): a damaged file is one error naming the file, in binary and
text mode, and counting lines (a progress bar's total) stops at the damage instead of failing."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import pytest

from monitor.fileio import DamagedFile, count_lines, open_maybe_gzip
from monitor.reward.data import read_pairs
from monitor.simulate.loop import Truth

EPISODE = b'{"episode_id": "e%d", "prompt": "p", "response": "%s"}\n'
PAIR = b'{"prompt": "p%d", "chosen": "%s", "rejected": "b"}\n'


def files(tmp_path: Path, line: bytes = EPISODE) -> dict[str, Path]:
    """2,000 lines gzipped: whole, cut at half its length, and with its CRC flipped."""
    data = gzip.compress(b"".join(line % (i, b"r" * 300) for i in range(2000)))
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = {"whole": tmp_path / "whole.jsonl.gz", "cut": tmp_path / "cut.jsonl.gz", "crc": tmp_path / "crc.jsonl.gz"}
    out["whole"].write_bytes(data)
    out["cut"].write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[-6] ^= 0xFF
    out["crc"].write_bytes(bytes(flipped))
    return out


@pytest.mark.parametrize("text", [False, True])
@pytest.mark.parametrize(("damage", "cause"), [("cut", "end-of-stream marker"), ("crc", "CRC check failed")])
def test_a_damaged_gzip_is_one_oserror_naming_the_file(tmp_path: Path, text: bool, damage: str, cause: str) -> None:
    path = files(tmp_path)[damage]
    with pytest.raises(DamagedFile) as info, open_maybe_gzip(path, text=text) as fh:
        for _ in fh:
            pass
    e = info.value
    assert isinstance(e, OSError) and e.filename == str(path) and cause in str(e.strerror)
    assert str(e.strerror).startswith("damaged gzip file: ")


def test_count_lines_stops_at_the_damage(tmp_path: Path) -> None:
    f = files(tmp_path)
    assert count_lines(str(f["whole"])) == 2000 == count_lines(str(f["crc"]))  # the CRC is read last
    assert 500 < (count_lines(str(f["cut"])) or 0) < 2000


def test_readers_of_whole_files_fail_on_damage_with_the_file_named(tmp_path: Path) -> None:
    """The simulation's ground truth and the pair files are read whole before any work: damage
    fails them at once, as one error naming the file (the CLI prints it in one line, exit 1)."""
    episodes, pairs = files(tmp_path / "episodes"), files(tmp_path / "pairs", PAIR)
    assert len(Truth.load(str(episodes["whole"]), "k", 1 << 20, None).episodes) == 2000
    assert len(read_pairs(pairs["whole"])) == 2000
    with pytest.raises(DamagedFile, match=r"cut\.jsonl\.gz"):
        Truth.load(str(episodes["cut"]), "k", 1 << 20, None)
    with pytest.raises(DamagedFile, match=r"cut\.jsonl\.gz"):
        read_pairs(pairs["cut"])


def test_count_lines_counts_in_blocks_as_it_counted_by_line(tmp_path: Path) -> None:
    """Blocks, not lines: one 2 GB line was held whole only to be counted. The count is the same:
    non-blank lines, a last line without its newline included, across block boundaries."""
    rng = random.Random(7)
    pieces = [b"", b" ", b"\t", b"\r", b"x", b"{}", b" y ", b"z" * (1 << 20)]
    for k in range(30):
        text = b"\n".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        f = tmp_path / f"t{k}.jsonl"
        f.write_bytes(text)
        assert count_lines(str(f)) == sum(1 for line in text.split(b"\n") if line.strip()), text[:80]


def test_config_and_jsonl_files_are_read_within_a_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--config /dev/zero`` was read until the machine ran out of memory; so was a pairs file of one endless line."""
    import monitor.reward.data as data
    from monitor.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="is larger than"):
        load_settings("/dev/zero")
    monkeypatch.setattr(data, "MAX_LINE", 100)
    long = tmp_path / "long.jsonl"
    long.write_text('{"prompt": "' + "p" * 200 + '"}\n')
    with pytest.raises(ValueError, match=r"long\.jsonl:1: a line longer than 100 characters"):
        read_pairs(long)
