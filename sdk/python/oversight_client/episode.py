"""Typed shapes of the records the monitor ingests, and helpers that build them.

Schema v1 is one ``prompt`` string and one ``response`` string; schema v2 is a conversation in
the OpenAI chat format (``messages``: system, user, assistant and tool turns; content as a string
or as parts; assistant ``tool_calls``; tool results with ``tool_call_id``). The server validates
every record: these types help an editor and a type checker, they check nothing at run time.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypedDict

Role = Literal["system", "developer", "user", "assistant", "tool"]


class ContentPart(TypedDict, total=False):
    """One part of a message's content, e.g. ``{"type": "text", "text": "..."}``."""

    type: str
    text: str


class FunctionCall(TypedDict):
    name: str
    # A JSON document as a string, as the OpenAI API returns it.
    arguments: str


class ToolCallRequired(TypedDict):
    id: str
    function: FunctionCall


class ToolCall(ToolCallRequired, total=False):
    type: Literal["function"]


class MessageRequired(TypedDict):
    role: Role


class Message(MessageRequired, total=False):
    """One turn: ``content`` is a string or a list of parts (or None on an assistant turn that
    only calls tools); ``tool_calls`` on assistant turns; ``tool_call_id`` on tool results."""

    content: str | list[ContentPart] | None
    name: str
    tool_calls: list[ToolCall]
    tool_call_id: str


class EpisodeCommon(TypedDict, total=False):
    """Fields shared by both schema versions (all optional: the client fills ``episode_id``)."""

    episode_id: str
    # RFC 3339 string or epoch seconds; the server's ingest time when absent.
    timestamp: str | float
    stream: str
    model: str
    metadata: dict[str, Any]


class EpisodeV1Required(TypedDict):
    prompt: str
    response: str


class EpisodeV1(EpisodeV1Required, EpisodeCommon, total=False):
    """Schema v1: one prompt, one response."""

    schema_version: Literal[1]


class EpisodeV2Required(TypedDict):
    messages: list[Message]


class EpisodeV2(EpisodeV2Required, EpisodeCommon, total=False):
    """Schema v2: a conversation (``messages``)."""

    schema_version: Literal[2]


Episode = EpisodeV1 | EpisodeV2


def new_episode_id() -> str:
    """A random id (UUID4, hex): the server de-duplicates by id, so a record keeps its id across retries."""
    return uuid.uuid4().hex


def _common(
    episode_id: str | None,
    stream: str | None,
    model: str | None,
    timestamp: str | float | None,
    metadata: Mapping[str, Any] | None,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "episode_id": episode_id or new_episode_id(),
        "timestamp": time.time() if timestamp is None else timestamp,
    }
    if stream is not None:
        out["stream"] = stream
    if model is not None:
        out["model"] = model
    if metadata is not None:
        out["metadata"] = dict(metadata)
    return out


def text_episode(
    prompt: str,
    response: str,
    *,
    episode_id: str | None = None,
    stream: str | None = None,
    model: str | None = None,
    timestamp: str | float | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> EpisodeV1:
    """A schema-v1 record; ``episode_id`` defaults to a random id and ``timestamp`` to now."""
    out = _common(episode_id, stream, model, timestamp, metadata)
    out.update(prompt=prompt, response=response)
    return out  # type: ignore[return-value]


def chat_episode(
    messages: Iterable[Message],
    *,
    episode_id: str | None = None,
    stream: str | None = None,
    model: str | None = None,
    timestamp: str | float | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> EpisodeV2:
    """A schema-v2 record from chat turns (OpenAI format)."""
    out = _common(episode_id, stream, model, timestamp, metadata)
    out.update(messages=list(messages), schema_version=2)
    return out  # type: ignore[return-value]


def message(role: Role, content: str | list[ContentPart] | None, **extra: Any) -> Message:
    """One chat turn, e.g. ``message("tool", "42", tool_call_id="call_1")``."""
    out: dict[str, Any] = {"role": role, "content": content, **extra}
    return out  # type: ignore[return-value]


def tool_call(call_id: str, name: str, arguments: str) -> ToolCall:
    """An assistant's tool call (``arguments`` is a JSON string, as the OpenAI API gives it)."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
