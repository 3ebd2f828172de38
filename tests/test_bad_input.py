"""The bad-input corpus through the real replay path: every bad record is dead-lettered with a
reason, nothing crashes, counts match, blank lines are not records."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

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
]


def test_bad_input_corpus_through_replay(tmp_path: Path) -> None:
    lines: list[bytes] = []
    for i, good in enumerate(GOOD):
        lines.append(good)
        if i < len(CORPUS):
            lines.append(CORPUS[i][0])
        if i % 10 == 0:
            lines += [b"", b"   ", b"\t"]  # blank lines are not records
    data = tmp_path / "corpus.jsonl"
    data.write_bytes(b"\n".join(lines) + b"\n")
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
