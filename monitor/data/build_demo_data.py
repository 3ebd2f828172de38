"""Build the bundled demo traffic from ../shared/data (run by hand; output is committed).

python -m monitor.data.build_demo_data ../shared/data/alpaca_eval monitor/data/demo-traffic.jsonl.gz
"""

from __future__ import annotations

import gzip
import json
import random
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

START = datetime(2026, 1, 5, tzinfo=UTC)


def _rows(folder: Path, model: str, seed: int) -> list[dict[str, object]]:
    """The model's 805 answers in a seeded random order: the source files are sorted by prompt
    source (``dataset``), which would put a prompt-source shift into every stream."""
    with gzip.open(folder / f"{model}.jsonl.gz", "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    for i, r in enumerate(rows):
        r["_i"] = i
    random.Random(seed).shuffle(rows)
    return rows


def build(folder: Path, out: Path) -> None:
    timeline: list[tuple[datetime, dict[str, object]]] = []
    # Stream "chat": a policy swap (gpt-3.5-turbo-1106 -> alpaca-7b) half way through.
    chat = [("gpt-3.5-turbo-1106", r) for r in _rows(folder, "gpt-3.5-turbo-1106", 1)]
    chat += [("alpaca-7b", r) for r in _rows(folder, "alpaca-7b", 2)]
    for i, (model, r) in enumerate(chat):
        timeline.append((START + timedelta(seconds=4 * i), _episode("chat", model, int(r["_i"]), r)))  # type: ignore[call-overload]
    # Stream "assistant": one steady policy.
    for i, r in enumerate(_rows(folder, "claude-2", 3)):
        timeline.append((START + timedelta(seconds=2 + 8 * i), _episode("assistant", "claude-2", int(r["_i"]), r)))  # type: ignore[call-overload]
    timeline.sort(key=lambda x: (x[0], str(x[1]["episode_id"])))
    lines = []
    for ts, ep in timeline:
        ep["timestamp"] = ts.strftime("%Y-%m-%dT%H:%M:%SZ")
        lines.append(json.dumps(ep, ensure_ascii=False).encode("utf-8"))
    # A few malformed records, as real producers send, to show the dead-letter path.
    bad = [
        b'{"episode_id": "broken-1", "prompt": "truncated',
        b'["not", "an", "object"]',
        b'{"episode_id": 42, "prompt": "p", "response": "r"}',
        b'{"episode_id": "no-response", "prompt": "p"}',
        b'{"episode_id": "bad-utf8", "prompt": "\xff\xfe", "response": "r"}',
    ]
    for j, b in enumerate(bad):
        lines.insert(300 + 400 * j, b)
    with gzip.GzipFile(out, "wb", mtime=0) as fh:
        fh.write(b"\n".join(lines) + b"\n")


def _episode(stream: str, model: str, i: int, r: dict[str, object]) -> dict[str, object]:
    return {
        "episode_id": f"{stream}-{model}-{i:04d}",
        "stream": stream,
        "model": model,
        "prompt": r["instruction"],
        "response": r["output"],
        "metadata": {"dataset": r["dataset"], "judge_pref": r.get("judge_pref"), "corpus": "alpaca_eval"},
    }


if __name__ == "__main__":
    build(Path(sys.argv[1]), Path(sys.argv[2]))
