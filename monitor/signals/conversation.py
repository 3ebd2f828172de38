"""Conversation-level signals of schema-v2 episodes (chat and tool-call conversations).

Computed from an episode's validated ``messages`` (``monitor.episodes.conversation``); a v1 episode
(``messages`` None) is one user turn and one assistant turn without tools: ``turns`` 2, the others 0.

* ``turns``: user and assistant messages (system, developer and tool messages are not turns).
* ``tool_calls``: tool calls made by all assistant messages of the episode.
* ``tool_errors``: tool results whose text looks like an error. The rule: after leading whitespace
  the text starts with ``error``, ``traceback`` or ``exception`` (any case: ``Error: not found``,
  ``Traceback (most recent call last)``, ``ERROR 500``, ``Exception in thread``), or it is a JSON
  object with an ``error`` key whose value is not null, false or empty, or with ``"isError": true``
  (MCP's tool-result flag). Only the first ``MAX_JSON_CHARS`` characters are parsed.
* ``tool_output_share``: characters of tool results over the characters of the conversation's
  user, assistant and tool text (system and developer prompts left out: they are configuration,
  not traffic); 0 when there is no such text.

Response-side text statistics (``monitor.signals.textstats``) need nothing new: a v2 episode's
``response`` is its final assistant turn.

None of these are in the default ``drift.signals``: adding detectors splits a stream's false-alarm
budget further and would move every calibrated default. Name them in ``drift.signals`` to watch
them (``tool_errors: [cusum]``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from monitor.signals.textstats import SignalSpec

# A tool result longer than this is not parsed as JSON (its opening still counts for the text rule).
MAX_JSON_CHARS = 65536
_ERROR_OPENING = re.compile(r"\s*(?:error|traceback|exception)\b", re.IGNORECASE)
_TURN_ROLES = frozenset({"user", "assistant"})
_COUNTED_ROLES = frozenset({"user", "assistant", "tool"})

CONVERSATION_SIGNALS: dict[str, SignalSpec] = {
    s.name: s
    for s in (
        SignalSpec("turns", "continuous", "user and assistant messages in the conversation (2 for a v1 episode)"),
        SignalSpec("tool_calls", "continuous", "tool calls the assistant made in the episode"),
        SignalSpec(
            "tool_errors",
            "continuous",
            "tool results that look like errors (text opening with Error/Traceback/Exception, or a JSON"
            " object with an error key or isError true)",
        ),
        SignalSpec(
            "tool_output_share",
            "continuous",
            "share of the user, assistant and tool text's characters that are tool output",
        ),
    )
}

_V1 = {"turns": 2.0, "tool_calls": 0.0, "tool_errors": 0.0, "tool_output_share": 0.0}


def _text(content: Any) -> str:
    # The text parts only (monitor.episodes.conversation.content_text, which this layer may not
    # import, adds placeholders for images and such, which are not characters of the conversation).
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(p["text"] for p in content if p.get("type") == "text")


def looks_like_error(text: str) -> bool:
    """The ``tool_errors`` rule (module docstring) for one tool result's text."""
    if _ERROR_OPENING.match(text):
        return True
    body = text.strip()
    if not body.startswith("{") or len(body) > MAX_JSON_CHARS:
        return False
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return type(doc) is dict and (doc.get("error") not in (None, False, "", {}, []) or doc.get("isError") is True)


def conversation_stats(messages: Sequence[Mapping[str, Any]] | None) -> dict[str, float]:
    """Every conversation signal of one episode (its validated messages, or None for v1)."""
    if messages is None:
        return dict(_V1)
    turns = calls = errors = 0
    tool_chars = counted_chars = 0
    for msg in messages:
        role = msg["role"]
        if role in _TURN_ROLES:
            turns += 1
        calls += len(msg.get("tool_calls") or ())
        if role not in _COUNTED_ROLES:
            continue
        text = _text(msg.get("content"))
        counted_chars += len(text)
        if role == "tool":
            tool_chars += len(text)
            errors += looks_like_error(text)
    return {
        "turns": float(turns),
        "tool_calls": float(calls),
        "tool_errors": float(errors),
        "tool_output_share": tool_chars / counted_chars if counted_chars else 0.0,
    }
