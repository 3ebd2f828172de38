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
    # "not json at all" goes to validation as it came, which names it (invalid_json).
    assert summary["episodes"] == 4 and summary["unconvertible"] == 1 and summary["invalid"] == 2

    stored = _stored(tmp_path)
    assert len(stored) == 2
    assert stored["conv-2"]["stream"] == "imported" and stored["conv-2"]["model"] == "gpt-4o"
    assert stored["conv-2"]["messages"][2]["tool_calls"] == calls
    (generated,) = [k for k in stored if k != "conv-2"]
    assert generated.startswith("chat-")

    letters = {x["reason"]: x for x in _letters(tmp_path)}
    assert sorted(letters) == ["invalid_json", "invalid_message", "unconvertible"], sorted(letters)
    assert base64.b64decode(letters["unconvertible"]["raw_b64"]) == b'{"unrelated": true}'
    assert base64.b64decode(letters["invalid_json"]["raw_b64"]) == b"not json at all"
    (schema,) = [x for r, x in letters.items() if r not in ("unconvertible", "invalid_json")]
    assert schema["episode_id"] == "conv-5"


def test_lines_json_cannot_hold_as_they_are_get_validations_reasons(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """orjson's refusal ("not JSON: number is infinity when parsed as double") named no cause, and a
    byte-order mark on a later line lost a good record. Such a line now goes to validation as it
    came, which names it as it would in a replayed file; a native v2 line without schema_version
    keeps its id, and an evals line that also has ``input`` is read by its messages."""
    turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    lines = [
        json.dumps({"episode_id": "native", "messages": turn}).encode(),  # v2 without schema_version
        b"\xef\xbb\xbf" + json.dumps({"id": "bom", "messages": turn}).encode(),  # a mark on a later line
        json.dumps({"id": "evals", "messages": turn, "input": "x"}).encode(),
        json.dumps({"id": ["list"], "messages": turn}).encode(),  # refused, not renamed without a word
        b'{"id": "inf", "messages": [], "metadata": {"x": 1e400}}',
        b'{"id": "raw", "messages": [], "note": "\xff"}',
        b'{"id": "sur", "messages": [], "note": "\\ud800"}',
    ]
    src = tmp_path / "odd.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    assert _run(tmp_path, "--input", str(src)) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["unconvertible"] == 1 and summary["invalid"] == 3, summary
    assert set(_stored(tmp_path)) == {"native", "bom", "evals"}
    letters = _letters(tmp_path)
    assert sorted(x["reason"] for x in letters) == [
        "invalid_unicode",
        "invalid_utf8",
        "number_out_of_range",
        "unconvertible",
    ]
    assert [x["detail"] for x in letters if x["reason"] == "unconvertible"] == [
        "openai-chat: id must be a non-empty string (or absent: an id is then generated)"
    ]


@pytest.mark.parametrize("fmt", ["openai-chat", "auto"])
def test_openai_fine_tuning_weights_are_dropped_and_other_keys_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    """OpenAI's fine-tuning format marks assistant turns with ``weight`` (0 or 1: whether the
    fine-tune learns the turn): every such line was dead-lettered (``invalid_message: messages[2]
    has unknown keys 'weight'``). The weight is dropped and the schema's keys kept (``name``); a
    key that may carry content (a legacy ``function_call``) is still refused, and a native v2
    record stays as strict as before."""
    system = {"role": "system", "content": "Marv is a sarcastic chatbot."}
    user = {"role": "user", "content": "What's the capital of France?"}
    weighted: list[dict[str, Any]] = [
        system,
        user,
        {"role": "assistant", "content": "Paris", "weight": 0},
        {"role": "user", "content": "Can you be more sarcastic?", "name": "alice"},
        {"role": "assistant", "content": "Paris, as if everyone doesn't know that already.", "weight": 1},
    ]
    legacy_call = {"role": "assistant", "content": "", "function_call": {"name": "capital", "arguments": "{}"}}
    lines: list[dict[str, Any]] = [
        {"id": "ft-1", "messages": weighted},
        {"id": "ft-2", "messages": [user, legacy_call]},
    ]
    if fmt == "auto":
        lines.append({"schema_version": 2, "episode_id": "native", "messages": [user, weighted[2]]})
    src = tmp_path / "ft.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))

    assert _run(tmp_path, "--input", str(src), "--format", fmt) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["episodes"] == len(lines) and summary["invalid"] == len(lines) - 1, summary
    stored = _stored(tmp_path)
    assert list(stored) == ["ft-1"]
    assert stored["ft-1"]["messages"] == [{k: v for k, v in m.items() if k != "weight"} for m in weighted]
    assert stored["ft-1"]["messages"][3]["name"] == "alice"
    details = {x["episode_id"]: (x["reason"], x["detail"]) for x in _letters(tmp_path)}
    assert details.pop("ft-2") == ("invalid_message", "messages[1] has unknown keys 'function_call'")
    assert details == (
        {"native": ("invalid_message", "messages[1] has unknown keys 'weight'")} if fmt == "auto" else {}
    )


def test_the_last_langfuse_generation_is_the_last_to_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Compared as text, "…:00.500Z" sorted before "…:00Z" and an offset was ignored."""

    def gen(start: str, answer: str) -> dict[str, Any]:
        return {
            "type": "GENERATION",
            "startTime": start,
            "input": [{"role": "user", "content": "hi"}],
            "output": {"role": "assistant", "content": answer},
        }

    traces = [
        {
            "id": "frac",
            "observations": [gen("2026-01-05T10:00:00.500Z", "later"), gen("2026-01-05T10:00:00Z", "earlier")],
        },
        {
            "id": "offset",
            "observations": [gen("2026-01-05T12:00:00+02:00", "earlier"), gen("2026-01-05T11:00:00Z", "later")],
        },
    ]
    src = tmp_path / "lf.jsonl"
    src.write_text("".join(json.dumps(t) + "\n" for t in traces))
    assert _run(tmp_path, "--input", str(src), "--format", "langfuse") == 0
    stored = _stored(tmp_path)
    assert {k: v["messages"][-1]["content"] for k, v in stored.items()} == {"frac": "later", "offset": "later"}


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
    # A stream no record can carry: refused before a line is read (it dead-lettered every one).
    for stream in ("", "a\tb"):
        assert _run(tmp_path, "--input", str(DATA / "langfuse_traces.jsonl"), "--stream", stream) == 2
        assert "--stream" in capsys.readouterr().err
    assert not _letters(tmp_path)
    with pytest.raises(SystemExit) as e:
        _run(tmp_path, "--input", str(DATA / "langfuse_traces.jsonl"), "--format", "phoenix")
    assert e.value.code == 2
