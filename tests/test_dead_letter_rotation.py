"""The dead-letter file is bounded: rotated before it would pass ``dead_letter.max_bytes``, the
oldest file beyond ``dead_letter.keep`` deleted and its letters counted, every line whole, and
processes that share the file (``oversight import`` beside ``oversight run``) neither cut each
other's lines nor lose letters to each other's rotations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from monitor.episodes.deadletter import DeadLetter, JsonlDeadLetterSink


def letter(n: int, size: int = 200) -> DeadLetter:
    raw = b"x" * size
    return DeadLetter("invalid_json", "cut off", raw, "mem", 0, n, 0.0, len(raw))


def files(path: Path) -> list[Path]:
    """``path`` and its rotated files, newest first."""
    return sorted(path.parent.glob(path.name + "*"), key=lambda p: int(p.name[len(path.name) + 1 :] or 0))


def offsets(path: Path) -> list[int]:
    """The offsets of the letters in ``path`` and its rotated files, oldest first (every line parses)."""
    got: list[int] = []
    for f in reversed(files(path)):
        got += [json.loads(line)["offset"] for line in f.read_bytes().splitlines()]
    return got


def test_the_file_is_rotated_and_bounded(tmp_path: Path) -> None:
    """Many flushes past the limit: at most ``keep`` rotated files and the current one, none past
    ``max_bytes``, the newest letters kept in order, and every deleted letter counted."""
    path = tmp_path / "dlq.jsonl"
    discarded: list[int] = []
    sink = JsonlDeadLetterSink(str(path), 1000, fsync=False, max_bytes=4096, keep=2, on_rotate=discarded.append)
    for n in range(300):
        sink.send(letter(n))
        if n % 7 == 6:
            sink.flush()
    sink.close()
    got = files(path)
    assert [p.name for p in got] == ["dlq.jsonl", "dlq.jsonl.1", "dlq.jsonl.2"]
    assert all(p.stat().st_size <= 4096 for p in got)
    kept = offsets(path)
    assert kept == list(range(300 - len(kept), 300)), "the newest letters, in order, with no gap"
    assert sum(discarded) + len(kept) == 300
    # A rotated file is full: it holds as many letters as fit, so a rotation per file's worth.
    lines = got[1].read_bytes().splitlines(keepends=True)
    assert got[1].stat().st_size > 4096 - max(map(len, lines))
    assert len(discarded) >= 300 // len(lines) - 1


def test_a_line_longer_than_the_limit_goes_alone_into_a_file(tmp_path: Path) -> None:
    path = tmp_path / "dlq.jsonl"
    sink = JsonlDeadLetterSink(str(path), 100_000, fsync=False, max_bytes=2048, keep=5)
    sink.send(letter(0, 10))
    sink.send(letter(1, 5000))
    sink.send(letter(2, 10))
    sink.close()
    per_file = [[json.loads(x)["offset"] for x in f.read_bytes().splitlines()] for f in reversed(files(path))]
    assert per_file == [[0], [1], [2]]


def test_keep_zero_deletes_the_full_file(tmp_path: Path) -> None:
    path = tmp_path / "dlq.jsonl"
    discarded: list[int] = []
    sink = JsonlDeadLetterSink(str(path), 1000, fsync=False, max_bytes=1024, keep=0, on_rotate=discarded.append)
    for n in range(40):
        sink.send(letter(n))
        sink.flush()
    sink.close()
    assert [p.name for p in files(path)] == ["dlq.jsonl"]
    assert sum(discarded) + len(offsets(path)) == 40
    assert offsets(path)[-1] == 39


def test_without_a_limit_the_file_only_grows(tmp_path: Path) -> None:
    path = tmp_path / "dlq.jsonl"
    sink = JsonlDeadLetterSink(str(path), 1000, fsync=False, max_bytes=None)
    for n in range(100):
        sink.send(letter(n))
    sink.close()
    assert [p.name for p in files(path)] == ["dlq.jsonl"] and offsets(path) == list(range(100))


def test_a_file_moved_away_is_reopened(tmp_path: Path) -> None:
    """An external logrotate (or another process) renamed the file: the next flush writes to a new
    ``path`` instead of into the moved file forever."""
    path = tmp_path / "dlq.jsonl"
    sink = JsonlDeadLetterSink(str(path), 1000, fsync=False)
    sink.send(letter(0))
    sink.flush()
    path.rename(tmp_path / "moved.jsonl")
    sink.send(letter(1))
    sink.close()
    assert offsets(path) == [1]
    assert [json.loads(x)["offset"] for x in (tmp_path / "moved.jsonl").read_bytes().splitlines()] == [0]


def test_a_failed_append_after_a_rotation_cuts_back_only_its_own_file(tmp_path: Path) -> None:
    """The write into the new file fails (a file-size limit stands in for a full disk): that file
    is cut back to empty, the rotated one keeps the letters written before the failure, and the
    retry (the pipeline sends the batch's letters again) leaves every line whole."""
    script = textwrap.dedent(
        f"""
        import resource, signal
        from monitor.episodes.deadletter import DeadLetter, JsonlDeadLetterSink
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write() instead of a signal
        def letter(n, size):
            raw = b"x" * size
            return DeadLetter("invalid_json", "cut off", raw, "mem", 0, n, 0.0, len(raw))
        sink = JsonlDeadLetterSink({str(tmp_path / "dlq.jsonl")!r}, 100_000, max_bytes=3000, keep=10)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2500, hard))
        batch = [letter(0, 1000), letter(1, 1000), letter(2, 3000)]
        for x in batch:
            sink.send(x)
        try:
            sink.flush()
        except OSError as e:
            print("failed", e.errno)
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        for x in batch:
            sink.send(x)
        sink.close()
        """
    )
    res = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("failed 27"), res.stdout  # EFBIG
    # Each letter fills a file of its own. The first attempt wrote 0 and 1 whole and failed
    # part-way through 2, whose file was cut back to empty; the retry repeats all three
    # (idempotency keys tell the copies apart), and no line is torn.
    assert offsets(tmp_path / "dlq.jsonl") == [0, 1, 0, 1, 2]


WRITER = """
import sys
from monitor.episodes.deadletter import DeadLetter, JsonlDeadLetterSink
path, who, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sink = JsonlDeadLetterSink(path, 1000, fsync=False, max_bytes=20_000, keep=4,
                           on_rotate=lambda d: print(d, flush=True))
for i in range(n):
    raw = b"y" * (50 + i % 300)
    sink.send(DeadLetter("invalid_json", "cut off", raw, f"writer{who}", who, i, 0.0, len(raw)))
    if i % 5 == 4:
        sink.flush()
sink.close()
"""


def test_processes_sharing_the_file_lose_nothing_to_each_other(tmp_path: Path) -> None:
    """Three processes append to one file and rotate it under each other: no line is torn or
    cut, no file passes the limit, and every letter is either in a file or counted as deleted
    by exactly one of them."""
    path = tmp_path / "dlq.jsonl"
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(w), "2000"], stdout=subprocess.PIPE, text=True)
        for w in range(3)
    ]
    discarded = 0
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        discarded += sum(int(x) for x in out.split())
    got = files(path)
    assert len(got) <= 5 and all(f.stat().st_size <= 20_000 for f in got)
    kept: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for f in reversed(got):
        for line in f.read_bytes().splitlines():
            x = json.loads(line)
            kept[x["partition"]].append(x["offset"])
    assert discarded + sum(len(v) for v in kept.values()) == 6000
    for offs in kept.values():
        assert offs == list(range(2000 - len(offs), 2000)), "each writer's newest letters, in order"


@pytest.mark.parametrize("bad", ["dead_letter.max_bytes=1000", "dead_letter.keep=-1"])
def test_limits_are_checked(bad: str) -> None:
    from monitor.config import ConfigError, load_settings

    with pytest.raises(ConfigError):
        load_settings(None, ["dev=true", bad])
    assert load_settings(None, ["dev=true", "dead_letter.max_bytes=null"]).dead_letter.max_bytes is None


def test_the_service_counts_its_rotations(tmp_path: Path) -> None:
    """The service's pipeline over 60 invalid records of 100 KB (8 MB of letters) with a 1 MiB file
    and one rotated file kept: the rotations and the deleted letters are in the metrics, and the
    letters kept plus those counted as deleted are every invalid record."""
    from prometheus_client import CollectorRegistry

    from monitor.config import load_settings
    from monitor.service import build_service
    from monitor.sources.memory import MemorySource

    path = tmp_path / "dlq.jsonl"
    s = load_settings(
        None,
        [
            "dev=true",
            f"database.url=sqlite:///{tmp_path / 'db.sqlite'}",
            f"dead_letter.path={path}",
            "dead_letter.max_bytes=1048576",
            "dead_letter.keep=1",
            "drift.enabled=false",
            "pipeline.batch_size=20",
        ],
    )
    good = [json.dumps({"episode_id": f"g{i}", "prompt": "p", "response": "r"}).encode() for i in range(40)]
    bad = [b'{"episode_id": "b' + str(i).encode() + b'", "prompt": "' + b"z" * 100_000 for i in range(60)]
    values: list[bytes] = [v for pair in zip(good, bad, strict=False) for v in pair] + bad[40:]
    registry = CollectorRegistry()
    with build_service(s, source=MemorySource(values, "mem"), serve=False, registry=registry) as svc:
        svc.run()

    def value(name: str) -> Any:
        return registry.get_sample_value(name)

    kept = offsets(path)
    assert len(files(path)) == 2
    assert value("oversight_dead_letter_rotations_total") >= 6
    assert value("oversight_dead_letters_discarded_total") + len(kept) == 60
    assert registry.get_sample_value("oversight_dead_letters_total", {"reason": "invalid_json"}) == 60
    assert os.path.getsize(path) <= 1048576


@pytest.mark.parametrize("torn_bytes", [1, 150, 200_000])
@pytest.mark.parametrize("whole_before", [0, 3])
def test_a_line_torn_by_a_killed_process_is_cut_before_the_next_append(
    tmp_path: Path, torn_bytes: int, whole_before: int
) -> None:
    """kill -9 in the middle of an append leaves part of a line. The restarted service appended the
    redelivered letter to it, and neither could be read. The torn part is cut back to the last
    whole line first (also when it is longer than one read back), and the letters before stay."""
    path = tmp_path / "dlq.jsonl"
    first = JsonlDeadLetterSink(str(path), 1 << 20)
    for n in range(whole_before):
        first.send(letter(n))
    first.flush()
    first.close()
    big = letter(99, size=torn_bytes)
    line = json.dumps({"offset": 99, "raw_b64": "x" * (torn_bytes * 2)}).encode()
    assert len(line) > torn_bytes
    del big
    with path.open("ab") as fh:
        fh.write(line[:torn_bytes])  # what the killed process had written of its letter
    restarted = JsonlDeadLetterSink(str(path), 1 << 20)
    restarted.send(letter(99))
    restarted.flush()
    restarted.close()
    assert offsets(path) == [*range(whole_before), 99]
