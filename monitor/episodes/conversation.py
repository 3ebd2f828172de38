"""Schema v2: conversations in the OpenAI chat format, their validation and their flattening.

A v2 record carries ``messages`` instead of v1's ``prompt`` and ``response``::

    {"schema_version": 2, "episode_id": ..., "timestamp": ..., "stream": ..., "model": ...,
     "metadata": {...}, "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"},
                                     {"type": "image_url", "image_url": {"url": "https://..."}}]},
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\\"temp_c\\": 21}"},
        {"role": "assistant", "content": "It is 21 C in Paris."}]}

Messages:

* ``role``: one of ``ROLES``; ``name`` optional (a string); no other keys than ``MESSAGE_KEYS``.
* ``content``: a string, a list of parts, or null (only for an assistant message with tool calls;
  a missing ``content`` is null). A part is an object with a string ``type``: ``text`` parts carry a
  string ``text``; other types (``image_url``, ``input_audio``, ``file``, ...) are kept as they are
  (at most ``MAX_PART_DEPTH`` levels deep) and read as a placeholder (``[image]``, ``[audio]``,
  ``[file]``, else ``[<type>]``) wherever text is needed.
* ``tool_calls`` (assistant only): ``{"id", "type": "function", "function": {"name", "arguments"}}``
  with ``arguments`` a string (JSON as the model wrote it, not parsed here).
* ``tool`` messages carry ``tool_call_id``, which must name a tool call of an earlier assistant
  message (``orphan_tool_result`` otherwise).
* The last message is the assistant's: the turn that is reviewed, scored and watched.

Limits: at most ``MAX_MESSAGES`` messages, ``MAX_PARTS`` content parts and ``MAX_TOOL_CALLS`` tool
calls per message; the record's total size is limited by ``max_episode_bytes`` as in v1.

Flattening (what every consumer of ``Episode.prompt`` / ``Episode.response`` sees, the reward model
included): one block per message, blocks joined by a blank line:

* ``"<role>: <text>"`` for system, developer, user and assistant text, where the text of a list of
  parts is its parts' texts (placeholders for the others) joined by newlines;
* each tool call of an assistant message as a line ``"assistant called <name>(<arguments>)"`` in the
  message's block, after its text if it has any;
* a tool result as ``"tool <name> returned: <text>"``, ``<name>`` being the message's ``name`` or
  else the name of the function it answers.

``prompt`` is the flattening of every message before the final assistant turn; ``response`` is that
turn's text, or, when it holds only tool calls, the flattening of its calls.

Nothing here recurses on the record's structure: every check is a loop of bounded depth, and the
only walk into caller-defined parts (``_depth_exceeds``) is iterative.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

ROLES = ("system", "developer", "user", "assistant", "tool")
MESSAGE_KEYS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id"})
TOOL_CALL_KEYS = frozenset({"id", "type", "function"})
FUNCTION_KEYS = frozenset({"name", "arguments"})
# Far beyond a real agent's episode (hundreds of turns), far below what makes one record cost
# more than its bytes already do.
MAX_MESSAGES = 512
MAX_PARTS = 64
MAX_TOOL_CALLS = 64
# Levels of objects and arrays inside one non-text part, the part itself being level 1
# (an image_url part is 2): kept verbatim, stored as JSON and walked by the review UI and exports.
MAX_PART_DEPTH = 8
MAX_NAME_CHARS = 256
MAX_TOOL_CALL_ID_CHARS = 256
MAX_PART_TYPE_CHARS = 64
PLACEHOLDERS = {"image_url": "[image]", "input_audio": "[audio]", "file": "[file]"}

# Stable dead-letter reasons of v2 (metric label values); validate.REASONS includes them.
CONVERSATION_REASONS: tuple[str, ...] = (
    "invalid_message",
    "too_many_messages",
    "too_many_parts",
    "too_many_tool_calls",
    "orphan_tool_result",
    "mixed_schema",
)

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_ROLE_SET = frozenset(ROLES)
_NO_CALLS: tuple[dict[str, Any], ...] = ()


class ConversationError(Exception):
    """A ``messages`` value that breaks schema v2; ``reason`` is one of ``CONVERSATION_REASONS``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate a v2 ``messages`` value; return it typed, or raise :class:`ConversationError`."""
    if type(messages) is not list:
        raise ConversationError("invalid_message", "messages must be an array")
    if not messages:
        raise ConversationError("invalid_message", "messages must not be empty")
    if len(messages) > MAX_MESSAGES:
        raise ConversationError("too_many_messages", f"{len(messages)} messages, limit is {MAX_MESSAGES}")
    calls: dict[str, str] = {}  # tool call id -> function name, of the calls made so far
    for i, msg in enumerate(messages):
        _check_message(i, msg, calls)
    last = messages[-1]
    if last["role"] != "assistant":
        raise ConversationError(
            "invalid_message",
            f"the last message must be the assistant's, messages[{len(messages) - 1}] is {last['role']!r}",
        )
    return messages


def _check_message(i: int, msg: Any, calls: dict[str, str]) -> None:
    where = f"messages[{i}]"
    if type(msg) is not dict:
        raise ConversationError("invalid_message", f"{where} must be an object")
    if not MESSAGE_KEYS.issuperset(msg):
        names = ", ".join(sorted(repr(k[:40]) for k in msg.keys() - MESSAGE_KEYS)[:5])
        raise ConversationError("invalid_message", f"{where} has unknown keys {names}")
    role = msg.get("role")
    if role is None:
        raise ConversationError("invalid_message", f"{where}.role is required")
    if type(role) is not str or role not in _ROLE_SET:
        shown = repr(role[:40]) if type(role) is str else type(role).__name__
        raise ConversationError("invalid_message", f"{where}.role {shown} is not one of {', '.join(ROLES)}")
    if "name" in msg:
        _check_label(f"{where}.name", msg["name"], MAX_NAME_CHARS)
    tool_calls = msg.get("tool_calls")
    if tool_calls is not None:
        if role != "assistant":
            raise ConversationError("invalid_message", f"{where}.tool_calls is only allowed on assistant messages")
        _check_tool_calls(where, tool_calls, calls)
    if role == "tool":
        _check_tool_result(where, msg, calls)
    elif "tool_call_id" in msg:
        raise ConversationError("invalid_message", f"{where}.tool_call_id is only allowed on tool messages")
    _check_content(where, msg.get("content"), nullable=role == "assistant" and bool(tool_calls))


def _check_label(where: str, value: Any, limit: int) -> str:
    """A short identifier (a name, an id): shown in the review UI and in flattened text, so bounded
    and free of control characters."""
    if type(value) is not str:
        raise ConversationError("invalid_message", f"{where} must be a string")
    if not 0 < len(value) <= limit:
        raise ConversationError("invalid_message", f"{where} must be 1-{limit} characters")
    m = _CONTROL.search(value)
    if m is not None:
        raise ConversationError(
            "invalid_message",
            f"{where} must not contain control characters (U+{ord(m.group()):04X} at index {m.start()})",
        )
    return value


def _check_content(where: str, content: Any, *, nullable: bool) -> None:
    if type(content) is str:
        return
    if content is None:
        if not nullable:
            raise ConversationError(
                "invalid_message", f"{where}.content is required (null only on an assistant message with tool calls)"
            )
        return
    if type(content) is not list:
        raise ConversationError("invalid_message", f"{where}.content must be a string, an array of parts or null")
    if len(content) > MAX_PARTS:
        raise ConversationError("too_many_parts", f"{where}.content has {len(content)} parts, limit is {MAX_PARTS}")
    for j, part in enumerate(content):
        _check_part(f"{where}.content[{j}]", part)


def _check_part(where: str, part: Any) -> None:
    if type(part) is not dict:
        raise ConversationError("invalid_message", f"{where} must be an object")
    kind = part.get("type")
    if type(kind) is not str or not 0 < len(kind) <= MAX_PART_TYPE_CHARS or _CONTROL.search(kind):
        raise ConversationError(
            "invalid_message", f"{where}.type must be a string of 1-{MAX_PART_TYPE_CHARS} characters"
        )
    if kind == "text":
        if type(part.get("text")) is not str:
            raise ConversationError("invalid_message", f"{where}.text must be a string")
        if len(part) != 2:
            raise ConversationError("invalid_message", f"{where}: a text part holds only type and text")
    elif _depth_exceeds(part, MAX_PART_DEPTH):
        raise ConversationError("invalid_message", f"{where} nests deeper than {MAX_PART_DEPTH} levels")


def _check_tool_calls(where: str, tool_calls: Any, calls: dict[str, str]) -> None:
    if type(tool_calls) is not list:
        raise ConversationError("invalid_message", f"{where}.tool_calls must be an array")
    if len(tool_calls) > MAX_TOOL_CALLS:
        raise ConversationError(
            "too_many_tool_calls", f"{where} has {len(tool_calls)} tool calls, limit is {MAX_TOOL_CALLS}"
        )
    for k, call in enumerate(tool_calls):
        at = f"{where}.tool_calls[{k}]"
        if type(call) is not dict or not TOOL_CALL_KEYS.issuperset(call):
            raise ConversationError("invalid_message", f"{at} must be an object with keys id, type, function")
        _check_label(f"{at}.id", call.get("id"), MAX_TOOL_CALL_ID_CHARS)
        if call.get("type") != "function":
            raise ConversationError("invalid_message", f"{at}.type must be 'function'")
        fn = call.get("function")
        if type(fn) is not dict or not FUNCTION_KEYS.issuperset(fn):
            raise ConversationError("invalid_message", f"{at}.function must be an object with keys name, arguments")
        _check_label(f"{at}.function.name", fn.get("name"), MAX_NAME_CHARS)
        if type(fn.get("arguments")) is not str:
            raise ConversationError("invalid_message", f"{at}.function.arguments must be a string (JSON text)")
        calls[call["id"]] = fn["name"]


def _check_tool_result(where: str, msg: dict[str, Any], calls: Mapping[str, str]) -> None:
    call_id = _check_label(f"{where}.tool_call_id", msg.get("tool_call_id"), MAX_TOOL_CALL_ID_CHARS)
    if call_id not in calls:
        raise ConversationError(
            "orphan_tool_result", f"{where} answers tool call {call_id[:40]!r}, which no earlier assistant message made"
        )


def _depth_exceeds(root: dict[str, Any], limit: int) -> bool:
    """True if ``root`` nests objects and arrays more than ``limit`` levels; level by level, no recursion."""
    level: list[Any] = [root]
    depth = 1
    while True:
        deeper = [
            v for node in level for v in (node.values() if type(node) is dict else node) if type(v) in (dict, list)
        ]
        if not deeper:
            return False
        depth += 1
        if depth > limit:
            return True
        level = deeper


# Flattening: run on validated messages only.


def content_text(content: str | Sequence[Mapping[str, Any]] | None) -> str:
    """The text of a message's content: a string as it is; parts' texts (placeholders for other
    parts) joined by newlines; null as the empty string."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(
        p["text"] if p["type"] == "text" else PLACEHOLDERS.get(p["type"], f"[{p['type']}]") for p in content
    )


def tool_call_lines(msg: Mapping[str, Any]) -> list[str]:
    """``assistant called <name>(<arguments>)``, one per tool call of an assistant message."""
    return [
        f"assistant called {c['function']['name']}({c['function']['arguments']})"
        for c in msg.get("tool_calls") or _NO_CALLS
    ]


def _block(msg: Mapping[str, Any], calls: Mapping[str, str]) -> str:
    role = msg["role"]
    text = content_text(msg.get("content"))
    if role == "tool":
        name = msg.get("name") or calls.get(msg["tool_call_id"], msg["tool_call_id"])
        return f"tool {name} returned: {text}"
    lines = [f"{role}: {text}"] if text or not msg.get("tool_calls") else []
    return "\n".join(lines + tool_call_lines(msg))


def flatten(messages: Sequence[Mapping[str, Any]]) -> str:
    """The documented flattening of a list of validated messages (see the module docstring)."""
    calls: dict[str, str] = {}
    blocks = []
    for msg in messages:
        for c in msg.get("tool_calls") or _NO_CALLS:
            calls[c["id"]] = c["function"]["name"]
        blocks.append(_block(msg, calls))
    return "\n\n".join(blocks)


def prompt_and_response(messages: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    """``(prompt, response)`` of a validated conversation: everything before the final assistant
    turn flattened, and that turn's text (its tool calls' lines when it has no text)."""
    final = messages[-1]
    response = content_text(final.get("content"))
    if not response and final.get("tool_calls"):
        response = "\n".join(tool_call_lines(final))
    return flatten(messages[:-1]), response
