"""``oversight import``: OpenAI chat JSONL and Langfuse trace exports through validation, dead
letters and the pipeline into a real SQLite store (the command as users run it, in process)."""

from __future__ import annotations

import base64
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from monitor.cli.app import main

DATA = Path(__file__).resolve().parent.parent / "data"


def _run(tmp_path: Path, *args: str) -> int:
    return main(
        [
            "import",
            *args,
            "--db",
            f"sqlite:///{tmp_path / 'db.sqlite'}",
            "--dev",
            "--set",
            f"dead_letter.path={tmp_path / 'dlq.jsonl'}",
            # Every episode stored (human sampling at 1), no drift or reward model: the import path only.
            "--set",
            "sampling.human.rate=1.0",
            "--set",
            "drift.enabled=false",
            "--set",
            "reward.enabled=false",
            "--log-level",
            "WARNING",
        ]
    )


def _stored(tmp_path: Path) -> dict[str, dict[str, Any]]:
    with sqlite3.connect(tmp_path / "db.sqlite") as db:
        rows = db.execute("SELECT episode_id, stream, model, messages, metadata FROM episodes").fetchall()
    return {
        r[0]: {"stream": r[1], "model": r[2], "messages": json.loads(r[3]), "metadata": json.loads(r[4] or "null")}
        for r in rows
    }


def _letters(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "dlq.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_openai_chat_jsonl_with_bad_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    calls = [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Oslo"}'}}]
    lines = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {
            "id": "conv-2",
            "model": "gpt-4o",
            "tools": [{"type": "function", "function": {"name": "weather"}}],
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": calls},
                {"role": "tool", "tool_call_id": "c1", "content": "-3 C"},
                {"role": "assistant", "content": "Cold: -3 C."},
            ],
        },
        "not json at all",
        {"unrelated": True},
        {"id": "conv-5", "messages": [{"role": "user", "content": "no answer"}]},  # the schema refuses it
    ]
    src = tmp_path / "chat.jsonl"
    src.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")

    assert _run(tmp_path, "--input", str(src), "--stream", "imported") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["episodes"] == 3 and summary["unconvertible"] == 2 and summary["invalid"] == 1

    stored = _stored(tmp_path)
    assert len(stored) == 2
    assert stored["conv-2"]["stream"] == "imported" and stored["conv-2"]["model"] == "gpt-4o"
    assert stored["conv-2"]["messages"][2]["tool_calls"] == calls
    (generated,) = [k for k in stored if k != "conv-2"]
    assert generated.startswith("chat-")

    letters = _letters(tmp_path)
    assert [x["reason"] for x in letters].count("unconvertible") == 2
    assert {base64.b64decode(x["raw_b64"]) for x in letters if x["reason"] == "unconvertible"} == {
        b"not json at all",
        b'{"unrelated": true}',
    }
    (schema,) = [x for x in letters if x["reason"] != "unconvertible"]
    assert schema["episode_id"] == "conv-5"


def test_importing_the_same_file_again_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}))
    assert _run(tmp_path, "--input", str(src)) == 0
    assert _run(tmp_path, "--input", str(src)) == 2  # like replay: the database already holds this input
    assert "cannot resume" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["openai-chat", "langfuse"])
def test_a_line_nested_too_deeply_to_encode_again_is_a_dead_letter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    """orjson reads 1,024 levels of nesting but writes only 254: a converted line between the two
    (deep metadata) once stopped the whole import with a TypeError. It is validation's to refuse,
    with its reason, and the lines around it are imported."""
    deep = "[" * 300 + "]" * 300
    turn = '[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]'
    if fmt == "openai-chat":
        bad = '{"id": "deep", "messages": ' + turn + ', "metadata": {"a": ' + deep + "}}"
        good = [json.dumps({"id": f"ok{i}", "messages": json.loads(turn)}) for i in range(2)]
    else:
        bad = '{"id": "deep", "input": "hi", "output": "yo", "metadata": {"a": ' + deep + "}}"
        good = [json.dumps({"id": f"ok{i}", "input": "hi", "output": "yo"}) for i in range(2)]
    src = tmp_path / "deep.jsonl"
    src.write_text("\n".join([good[0], bad, good[1]]) + "\n")

    assert _run(tmp_path, "--input", str(src), "--format", fmt) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["episodes"] == 3 and summary["invalid"] == 1 and summary["unconvertible"] == 0
    assert set(_stored(tmp_path)) == {"ok0", "ok1"}
    (letter,) = _letters(tmp_path)
    assert letter["episode_id"] == "deep" and "deep" in letter["detail"], letter


def test_langfuse_traces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(tmp_path, "--input", str(DATA / "langfuse_traces.jsonl"), "--format", "langfuse") == 0
    assert json.loads(capsys.readouterr().out)["invalid"] == 0
    stored = _stored(tmp_path)
    assert set(stored) == {"lf-trace-1", "lf-trace-2"}
    tool_trace = stored["lf-trace-1"]
    assert [m["role"] for m in tool_trace["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert tool_trace["messages"][-1]["content"] == "It is packed and ships tomorrow."
    assert tool_trace["model"] == "gpt-4o-mini"
    assert tool_trace["metadata"]["session_id"] == "sess-9"
    assert stored["lf-trace-2"]["messages"] == [
        {"role": "user", "content": "Summarise: the cat sat on the mat."},
        {"role": "assistant", "content": "A cat sat."},
    ]


def test_a_langfuse_line_in_openai_format_is_a_dead_letter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(tmp_path, "--input", str(DATA / "langfuse_traces.jsonl"), "--format", "openai-chat") == 0
    assert json.loads(capsys.readouterr().out)["unconvertible"] == 2
    assert {x["detail"] for x in _letters(tmp_path)} == {"openai-chat: messages must be an array"}


def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(tmp_path, "--input", str(tmp_path / "missing.jsonl")) == 1
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        _run(tmp_path, "--input", str(DATA / "langfuse_traces.jsonl"), "--format", "phoenix")
    assert e.value.code == 2
