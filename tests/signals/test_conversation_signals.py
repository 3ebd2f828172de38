"""Conversation-level signals (issue 15): turns, tool calls, tool errors and the share of tool output,
on validated v2 conversations and on v1 episodes; and the drift monitor accepts them by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from monitor.config import ConfigError, load_settings
from monitor.episodes import parse_episode
from monitor.service import build_service
from monitor.signals import CONVERSATION_SIGNALS, conversation_stats
from monitor.signals.conversation import looks_like_error
from monitor.sources.memory import MemorySource


def conversation(*messages: dict[str, Any]) -> list[dict[str, Any]]:
    """Messages as validation hands them on (so the signals only ever see valid conversations)."""
    ep = parse_episode(json.dumps({"episode_id": "e", "messages": list(messages)}).encode(), 1 << 20, 0.0)
    assert ep.messages is not None
    return ep.messages


def call(cid: str) -> dict[str, Any]:
    return {"id": cid, "type": "function", "function": {"name": "f", "arguments": "{}"}}


def test_every_declared_signal_is_computed() -> None:
    assert set(conversation_stats(None)) == set(CONVERSATION_SIGNALS)
    msgs = conversation({"role": "user", "content": "q"}, {"role": "assistant", "content": "a"})
    assert set(conversation_stats(msgs)) == set(CONVERSATION_SIGNALS)


def test_v1_is_one_exchange_without_tools() -> None:
    assert conversation_stats(None) == {"turns": 2.0, "tool_calls": 0.0, "tool_errors": 0.0, "tool_output_share": 0.0}


def test_an_agent_episode() -> None:
    msgs = conversation(
        {"role": "system", "content": "S" * 1000},  # configuration: neither turns nor counted text
        {"role": "user", "content": "12345"},
        {"role": "assistant", "content": None, "tool_calls": [call("a"), call("b")]},
        {"role": "tool", "tool_call_id": "a", "content": '{"error": {"code": 404}}'},
        {"role": "tool", "tool_call_id": "b", "content": [{"type": "text", "text": "fine"}]},
        {"role": "assistant", "content": "ok", "tool_calls": [call("c")]},
        {"role": "tool", "tool_call_id": "c", "content": "Traceback (most recent call last):"},
        {"role": "assistant", "content": "0123456789"},
    )
    s = conversation_stats(msgs)
    assert s["turns"] == 4.0  # one user, three assistant messages
    assert s["tool_calls"] == 3.0
    assert s["tool_errors"] == 2.0
    tool = len('{"error": {"code": 404}}') + len("fine") + len("Traceback (most recent call last):")
    assert s["tool_output_share"] == pytest.approx(tool / (tool + len("12345") + len("ok") + len("0123456789")))


def test_image_parts_are_not_characters() -> None:
    msgs = conversation(
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x"}}]},
        {"role": "assistant", "tool_calls": [call("a")]},
        {"role": "tool", "tool_call_id": "a", "content": "abc"},
        {"role": "assistant", "content": ""},
    )
    assert conversation_stats(msgs)["tool_output_share"] == 1.0


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("Error: city not found", True),
        ("  error 500", True),
        ("ERROR", True),
        ("Traceback (most recent call last):\n  File ...", True),
        ("Exception in thread main", True),
        ('{"error": "rate limited"}', True),
        ('{"error": {"message": "bad"}}', True),
        ('{"isError": true, "content": []}', True),
        ('{"error": null, "result": 3}', False),
        ('{"error": false}', False),
        ('{"error": ""}', False),
        ('{"isError": false}', False),
        ('["error"]', False),
        ("{not json", False),
        ("Errors are rare in this dataset.", False),
        ("No error occurred.", False),
        ("The result is 42.", False),
        ("", False),
    ],
)
def test_tool_error_rule(text: str, error: bool) -> None:
    assert looks_like_error(text) is error


def test_huge_json_tool_output_is_not_parsed() -> None:
    big = '{"pad": "' + "x" * 70_000 + '", "error": "late"}'
    assert looks_like_error(big) is False  # over MAX_JSON_CHARS: the opening rule only


def test_drift_accepts_the_conversation_signals_by_name(tmp_path: Path) -> None:
    base = ["dev=true", f"database.url=sqlite:///{tmp_path / 'db.sqlite'}", f"dead_letter.path={tmp_path / 'd.jsonl'}"]
    ok = load_settings(None, [*base, "drift.signals={tool_errors: [cusum], turns: [cusum]}"])
    with build_service(ok, source=MemorySource([]), serve=False, registry=CollectorRegistry()):
        pass
    with pytest.raises(ConfigError, match="tool_errors"):  # the message lists the known signals
        load_settings(None, [*base, "drift.signals={tool_mistakes: [cusum]}"])
