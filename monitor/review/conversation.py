"""A schema-v2 conversation as reviewers see it: turns with roles, tool calls and results.

The stored ``episodes.messages`` (OpenAI chat format, validated at ingest by
:mod:`monitor.episodes.conversation`) is read defensively all the same: a row written by
something else, or before a limit existed, must not fail a claim, so anything of an unexpected
shape is shown as text or left out, never raised on. The final assistant turn is the one a
stream rates by default (``review.rate: final_turn``); ``conversation`` rates the whole.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal

from monitor.episodes.conversation import PLACEHOLDERS
from monitor.review.display import invisible_count

Rate = Literal["final_turn", "conversation"]
RATES: tuple[Rate, ...] = ("final_turn", "conversation")
ROLES = ("system", "developer", "user", "assistant", "tool")
# Tool arguments and results shown on the page beyond this many characters are cut, with a
# marker saying how much more there is (the API returns them whole).
MAX_SHOWN = 20_000
MAX_LABEL = 256  # names and ids


@dataclass(frozen=True)
class ToolCall:
    id: str | None
    name: str
    arguments: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "arguments": self.arguments}


@dataclass(frozen=True)
class Turn:
    """One message: ``role`` one of :data:`ROLES` (``unknown`` for anything else), its content
    as text (parts joined by newlines, non-text parts as placeholders), its tool calls, and for a
    tool result the call it answers (``tool_call_id``, and ``tool_name`` when that call is known)."""

    role: str
    name: str | None
    text: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    tool_name: str | None = None
    final: bool = False

    def to_json(self, rate: Rate) -> dict[str, Any]:
        return {
            "role": self.role,
            "name": self.name,
            "content": self.text,
            "tool_calls": [c.to_json() for c in self.tool_calls],
            "tool_call_id": self.tool_call_id,
            "tool_name": self.tool_name,
            "final": self.final,
            "rated": rate == "conversation" or self.final,
        }

    def strings(self) -> Iterable[str | None]:
        yield from (self.name, self.text, self.tool_call_id, self.tool_name)
        for c in self.tool_calls:
            yield from (c.id, c.name, c.arguments)


def _label(v: Any) -> str | None:
    return v[:MAX_LABEL] if isinstance(v, str) and v else None


def content_text(content: Any) -> str:
    """Content as text: a string as it is, parts' texts joined by newlines (placeholders for
    other parts), anything else as nothing."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    out = []
    for p in content:
        if not isinstance(p, dict):
            continue
        kind = p.get("type")
        if kind == "text" and isinstance(p.get("text"), str):
            out.append(p["text"])
        elif isinstance(kind, str):
            out.append(PLACEHOLDERS.get(kind, f"[{kind[:64]}]"))
    return "\n".join(out)


def _tool_calls(raw: Any) -> tuple[ToolCall, ...]:
    if not isinstance(raw, list):
        return ()
    calls = []
    for c in raw:
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict):
            continue
        args = fn.get("arguments")
        text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False, default=str)
        calls.append(ToolCall(_label(c.get("id")), _label(fn.get("name")) or "(unnamed)", text))
    return tuple(calls)


def turns_of(messages: Any) -> tuple[Turn, ...] | None:
    """The turns of stored ``messages``; None when there are none (a v1 episode, or unreadable)."""
    if not isinstance(messages, list) or not messages:
        return None
    names: dict[str, str] = {}
    turns: list[Turn] = []
    for m in messages:
        if not isinstance(m, dict):
            continue
        role = m.get("role") if m.get("role") in ROLES else "unknown"
        calls = _tool_calls(m.get("tool_calls")) if role == "assistant" else ()
        names.update((c.id, c.name) for c in calls if c.id)
        call_id = _label(m.get("tool_call_id")) if role == "tool" else None
        turns.append(
            Turn(
                role=str(role),
                name=_label(m.get("name")),
                text=content_text(m.get("content")),
                tool_calls=calls,
                tool_call_id=call_id,
                tool_name=names.get(call_id) if call_id else None,
            )
        )
    if not turns:
        return None
    last = max((i for i, t in enumerate(turns) if t.role == "assistant"), default=None)
    if last is not None:
        turns[last] = replace(turns[last], final=True)
    return tuple(turns)


def invisible_in(turns: Iterable[Turn]) -> int:
    """Invisible or direction-changing characters in every shown string of ``turns``."""
    return sum(invisible_count(s) for t in turns for s in t.strings())


def shown(text: str) -> str:
    """A tool call's arguments or a tool result for the page: pretty-printed when it is a JSON
    object or array, cut at :data:`MAX_SHOWN` characters with a marker.

    >>> shown('{"city": "Paris", "days": [1, 2]}')
    '{\\n  "city": "Paris",\\n  "days": [\\n    1,\\n    2\\n  ]\\n}'
    """
    stripped = text.strip()
    if stripped[:1] in ("{", "[") and len(stripped) <= 4 * MAX_SHOWN:
        # Not JSON (or nested past the decoder's limit): shown as it was sent.
        with contextlib.suppress(ValueError, RecursionError):
            text = json.dumps(json.loads(stripped), indent=2, ensure_ascii=False)
    if len(text) <= MAX_SHOWN:
        return text
    return text[:MAX_SHOWN] + f"\n…({len(text) - MAX_SHOWN} more characters)"
