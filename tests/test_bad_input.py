"""The bad-input corpus through the real replay path: every bad record is dead-lettered with a
reason, nothing crashes, counts match, blank lines are not records."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

GOOD = [json.dumps({"episode_id": f"g{i}", "prompt": "p", "response": "r", "timestamp": i}).encode() for i in range(50)]
CORPUS: list[tuple[bytes, str]] = [
    (b'{"episode_id": "t1", "prompt": "cut of', "invalid_json"),
    (b'{"episode_id": "t2", "prompt": "p", "response": "r"', "invalid_json"),
    (b"[1, 2, 3]", "not_object"),
    (b"42", "not_object"),
    (b'"a string"', "not_object"),
    (b'{"episode_id": 5, "prompt": "p", "response": "r"}', "wrong_type"),
    (b'{"episode_id": "w", "prompt": {"x": 1}, "response": "r"}', "wrong_type"),
    (b'{"episode_id": "w2", "prompt": "p", "response": "r", "metadata": []}', "wrong_type"),
    (b'{"prompt": "p", "response": "r"}', "missing_field"),
    (b'{"episode_id": "m", "response": "r"}', "missing_field"),
    (b'{"episode_id": "big", "prompt": "p", "response": "' + b"A" * (5 * 1024 * 1024) + b'"}', "oversize"),
    (b'{"episode_id": "u", "prompt": "\xc3\x28", "response": "r"}', "invalid_utf8"),
    (b"\xff\xfe\x00{", "invalid_utf8"),
    (b'{"episode_id": "n", "prompt": "a\x00b", "response": "r"}', "nul_character"),
    (b'{"episode_id": "n2", "prompt": "p", "response": "\\u0000"}', "nul_character"),
    (b'{"episode_id": "s", "prompt": "p", "response": "\\udc00"}', "invalid_unicode"),
    (b'{"episode_id": "x", "prompt": "p", "response": "r", "extra": 1}', "unknown_field"),
    (b'{"episode_id": "ts", "prompt": "p", "response": "r", "timestamp": "soon"}', "invalid_value"),
    (b'{"episode_id": "tf", "prompt": "p", "response": "r", "timestamp": 253402300799}', "timestamp_in_future"),
    # Issue 13's poison pills: each of these crashed replay and run, with nothing of the batch committed.
    (b'{"episode_id": "i1", "prompt": "p", "response": "r", "timestamp": 1' + b"0" * 400 + b"}", "number_out_of_range"),
    (
        b'{"episode_id": "d1", "metadata": {"a": ' + b"[" * 1000 + b"]" * 1000 + b'}, "prompt": "p", "response": "r"}',
        "too_deep",
    ),
    (
        b'{"episode_id": "d2", "metadata": {"a": '
        + b"[" * 600
        + b"]" * 600
        + b'}, "prompt": "p", "response": "\\u0000"}',
        "nul_character",
    ),
    (
        b'{"episode_id": "d3", "metadata": {"a": '
        + b"[" * 600
        + b"]" * 600
        + b'}, "prompt": "p", "response": "\\ud800"}',
        "invalid_unicode",
    ),
    # A browser form turns LF into CRLF: such an id could never be labelled.
    (b'{"episode_id": "lf\\nid", "prompt": "p", "response": "r"}', "invalid_value"),
    (b'{"episode_id": "cr\\rid", "prompt": "p", "response": "r"}', "invalid_value"),
]


def test_bad_input_corpus_through_replay(tmp_path: Path) -> None:
    lines: list[bytes] = []
    for i, good in enumerate(GOOD):
        lines.append(good)
        if i < len(CORPUS):
            lines.append(CORPUS[i][0])
        if i % 10 == 0:
            lines += [b"", b"   ", b"\t"]  # blank lines are not records
        if i == 25:
            lines.append(b" \t" * 3 * 1024 * 1024)  # nor is a whitespace-only line over the size limit
    data = tmp_path / "corpus.jsonl"
    # A byte-order mark (Windows editors write one) is not part of the first episode.
    data.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")
    dlq = tmp_path / "dlq.jsonl"
    report_path = tmp_path / "report.json"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "monitor.cli",
            "replay",
            "--input",
            str(data),
            "--report",
            str(report_path),
            "--db",
            f"sqlite:///{tmp_path / 'db.sqlite'}",
            "--set",
            f"dead_letter.path={dlq}",
            "--set",
            "sampling.rm.rate=1",
            "--set",
            "drift.enabled=false",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    report = json.loads(report_path.read_text())
    assert report["episodes"] == len(GOOD) + len(CORPUS)
    assert report["invalid"] == len(CORPUS)
    expected: dict[str, int] = {}
    for _, reason in CORPUS:
        expected[reason] = expected.get(reason, 0) + 1
    assert report["dead_letters"] == dict(sorted(expected.items()))
    assert report["sampled"]["rm"] == len(GOOD)
    letters = [json.loads(line) for line in dlq.read_text().splitlines()]
    assert [d["reason"] for d in letters] == [r for _, r in CORPUS]
    for (raw, _), letter in zip(CORPUS, letters, strict=True):
        kept = base64.b64decode(letter["raw_b64"])
        assert raw.startswith(kept) and letter["detail"]
        if letter["reason"] != "oversize":
            assert kept == raw and not letter["raw_truncated"]
    big = letters[[r for _, r in CORPUS].index("oversize")]
    assert big["size"] == len(CORPUS[10][0]) + 1  # with its newline
    assert big["raw_truncated"] is True
    dlq.read_bytes().decode("ascii")  # the dead-letter file is plain ASCII


# -- records that fail after validation: nothing may stop the batch ----------------------------


def _pipeline(tmp_path: Path, values: list[bytes], observer: Any, db_url: str | None = None) -> Any:
    from prometheus_client import CollectorRegistry

    from monitor.config import load_settings
    from monitor.episodes.deadletter import JsonlDeadLetterSink
    from monitor.metrics import Metrics
    from monitor.pipeline import Pipeline
    from monitor.sources.memory import MemorySource
    from monitor.store import Store

    s = load_settings(
        None,
        [
            "dev=true",
            f"database.url={db_url or 'sqlite:///' + str(tmp_path / 'db.sqlite')}",
            f"dead_letter.path={tmp_path / 'dlq.jsonl'}",
            "pipeline.batch_size=100",
            "drift.enabled=false",
            "sampling.rm.rate=1",  # every episode is stored
        ],
    )
    sink = JsonlDeadLetterSink(s.dead_letter.path, s.dead_letter.max_raw_bytes)
    metrics = Metrics(CollectorRegistry(), s.metrics.max_streams)
    return Pipeline(s, Store(s.database.url), MemorySource(values, "mem"), sink, metrics, observers=[observer])


class BuggyStage:
    """A later stage with a bug that only some episodes trigger (a stand-in for an observer: the
    pipeline's own observers are drift, the reward-model scorer and the disagreement feed)."""

    def __init__(self, fail: Callable[[Any], None]):
        self.fail = fail
        self.seen: list[str] = []

    def prepare(self, episodes: Any) -> None:
        pass

    def observe(self, episode: Any, decision: Any, index: int) -> None:
        self.seen.append(episode.episode_id)
        self.fail(episode)

    def checkpoint(self) -> dict[tuple[str, str], dict[str, Any]]:
        return {}

    def add_rows(self, batch: Any) -> None:
        pass

    def forget(self) -> None:
        pass

    def between_batches(self) -> bool:
        return False

    def outstanding(self) -> bool:
        return False


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no message")


def _episodes(n: int) -> list[bytes]:
    return [
        json.dumps({"episode_id": f"e{i}", "prompt": f"q{i}", "response": "r", "timestamp": 1_767_225_600 + i}).encode()
        for i in range(n)
    ]


def test_unforeseen_exception_dead_letters_the_record_not_the_batch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def fail(ep: Any) -> None:
        if ep.episode_id == "e3":
            raise KeyError("injected\nFAKE LOG LINE")  # attacker text in a message must not forge log lines
        if ep.episode_id in ("e5", "e6"):
            raise Unprintable()

    p = _pipeline(tmp_path, _episodes(10), BuggyStage(fail))
    p.open()
    assert p.metrics.registry.get_sample_value("oversight_dead_letters_total", {"reason": "internal_error"}) == 0
    assert p.process_batch(p.source.poll(100, 0.0))

    letters = [json.loads(line) for line in (tmp_path / "dlq.jsonl").read_text().splitlines()]
    assert [(d["episode_id"], d["reason"]) for d in letters] == [(f"e{i}", "internal_error") for i in (3, 5, 6)]
    assert letters[0]["detail"].startswith("KeyError: ") and letters[1]["detail"] == "Unprintable"
    assert base64.b64decode(letters[0]["raw_b64"]) == _episodes(10)[3]
    # The other episodes of the batch are stored; the failed ones are in no row and no count.
    stored = {r["episode_id"] for r in p.store.sampled("default", "rm")}
    assert stored == {f"e{i}" for i in range(10)} - {"e3", "e5", "e6"}
    assert p.store.traffic_count("default") == 7
    assert (p.stats.records, p.stats.invalid, p.stats.streams["default"].episodes) == (10, 3, 7)
    r = p.metrics.registry
    assert r.get_sample_value("oversight_dead_letters_total", {"reason": "internal_error"}) == 3
    assert r.get_sample_value("oversight_episodes_total", {"stream": "default", "outcome": "sampled"}) == 7
    # Logged at ERROR: the traceback once per exception class, then one line; never the raw message.
    errors = [rec for rec in caplog.records if rec.levelname == "ERROR"]
    assert len(errors) == 3 and "Traceback" not in caplog.text
    assert sum("fail" in rec.getMessage() for rec in errors) == 2  # frames name the function
    assert "\nFAKE LOG LINE" not in caplog.text


def test_outage_inside_a_stage_is_not_dead_lettered(tmp_path: Path) -> None:
    import sqlalchemy as sa

    def fail(ep: Any) -> None:
        if ep.episode_id == "e2":
            raise sa.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection"))

    p = _pipeline(tmp_path, _episodes(5), BuggyStage(fail))
    p.open()
    # The batch is not committed (it is redone after the outage); a good record is never a dead letter.
    with pytest.raises(sa.exc.OperationalError):
        p.process_batch(p.source.poll(100, 0.0))
    assert not (tmp_path / "dlq.jsonl").exists() or not (tmp_path / "dlq.jsonl").read_text()
    assert p.store.traffic_count("default") == 0


def test_row_the_store_cannot_encode_is_dead_lettered_as_store_rejected(tmp_path: Path, db_url: str) -> None:
    # Validation caps metadata depth, so a value the store's JSON encoder cannot take has to come
    # from a stage after validation: this one nests one episode's metadata 5,000 deep in place.
    def corrupt(ep: Any) -> None:
        if ep.episode_id == "e4":
            deep: list[Any] = []
            for _ in range(5000):
                deep = [deep]
            ep.metadata["deep"] = deep

    values = [
        json.dumps(
            {"episode_id": f"e{i}", "prompt": "q", "response": "r", "timestamp": i, "metadata": {"i": i}}
        ).encode()
        for i in range(8)
    ]
    p = _pipeline(tmp_path, values, BuggyStage(corrupt), db_url)
    p.open()
    assert p.process_batch(p.source.poll(100, 0.0))
    letters = [json.loads(line) for line in (tmp_path / "dlq.jsonl").read_text().splitlines()]
    assert [(d["episode_id"], d["reason"]) for d in letters] == [("e4", "store_rejected")]
    assert "recursion" in letters[0]["detail"].lower()
    assert json.loads(base64.b64decode(letters[0]["raw_b64"]))["episode_id"] == "e4"
    assert {r["episode_id"] for r in p.store.sampled("default", "rm")} == {f"e{i}" for i in range(8)} - {"e4"}
    assert p.store.traffic_count("default") == 7
    assert (p.stats.records, p.stats.invalid, p.stats.streams["default"].episodes) == (8, 1, 7)
    r = p.metrics.registry
    assert r.get_sample_value("oversight_episodes_total", {"stream": "default", "outcome": "sampled"}) == 7
    assert r.get_sample_value("oversight_dead_letters_total", {"reason": "store_rejected"}) == 1
