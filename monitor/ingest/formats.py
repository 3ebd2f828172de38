"""Files exported by common tools -> schema-v2 episode records (``oversight import``).

One input line is one episode:

* ``openai-chat``: OpenAI chat JSONL, ``{"messages": [...]}`` per line (the fine-tuning and
  evals format), with optional ``id``, ``model``, ``metadata``, ``timestamp`` and ``stream``;
  other keys (``tools``, ...) are ignored. A message's fine-tuning metadata (``weight``,
  :data:`FINE_TUNING_KEYS`) is dropped; its other keys go to the schema as they came. Without
  ``id`` the episode id is a hash of the line and its position, so importing the same file again
  gives the same ids.
* ``langfuse``: one Langfuse trace per line as the public API returns it
  (``GET /api/public/traces/{id}``: ``id``, ``timestamp``, ``name``, ``input``, ``output``,
  ``sessionId``, ``userId``, ``tags``, ``metadata`` and ``observations``, full observation
  objects). The conversation is the input of the trace's last ``GENERATION`` observation (by
  ``startTime``; OpenAI messages, a ``{"messages": [...]}`` object or a string) followed by its
  output (a message, a list of messages, ``{"choices": [{"message": ...}]}`` or a string); a trace
  without generations uses its own ``input`` and ``output``. The episode id is the trace id.
  ``tests/data/langfuse_traces.jsonl`` is a sample.
* ``auto``: decided line by line: ``prompt``, ``schema_version`` or ``episode_id`` -> an episode
  already (a native v2 record needs no ``schema_version``); ``messages`` -> openai-chat (an evals
  line may carry ``input`` too); ``observations``, ``input`` or ``output`` -> langfuse.

A line that is not JSON at all, or that JSON cannot hold as it is (invalid UTF-8, a NUL, a lone
surrogate, a number no double holds, nesting past the parser's limit), goes to validation as it
came, which names what is wrong with it as it does for any other input (``invalid_utf8``, ...);
a leading byte-order mark is ignored, as validation ignores it.

A line that cannot be converted becomes a dead letter (reason ``unconvertible``) with its raw
bytes; a converted record then takes the pipeline's validation like any other, so a conversation
the schema refuses is dead-lettered with the schema's reason.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import orjson

from monitor.episodes.conversation import MESSAGE_KEYS
from monitor.episodes.deadletter import DeadLetter, DeadLetterSink
from monitor.episodes.validate import InvalidEpisode, parse_timestamp
from monitor.ingest.body import encode_record
from monitor.sources.base import Rebalance, Record, Source

FORMATS = ("auto", "openai-chat", "langfuse")
UNCONVERTIBLE = "unconvertible"  # the dead-letter reason of a line no converter understands


class ConversionError(Exception):
    """The line is not the format it was said (or guessed) to be; the message says why."""


Converter = Callable[[dict[str, Any], Record], dict[str, Any]]


def _position_id(prefix: str, rec: Record) -> str:
    digest = hashlib.sha256(rec.value).hexdigest()[:24]
    return f"{prefix}-{digest}-{rec.offset}"


# Keys of an OpenAI fine-tuning message that are training metadata, not conversation: ``weight``
# (0 or 1 on an assistant message: whether the fine-tune learns that turn). The schema refuses
# keys it does not know, which dead-lettered every such line (invalid_message); these are dropped,
# never a key the schema knows. Any other key stays, for validation to refuse: it may carry
# content (a legacy ``function_call``) that the episode would silently lose.
FINE_TUNING_KEYS = frozenset({"weight"}) - MESSAGE_KEYS


def _without_fine_tuning_keys(messages: list[Any]) -> list[Any]:
    """The messages less their fine-tuning metadata; anything that is not a message is left for
    validation to refuse by its own reason."""
    return [{k: v for k, v in m.items() if k not in FINE_TUNING_KEYS} if isinstance(m, dict) else m for m in messages]


def from_openai_chat(obj: dict[str, Any], rec: Record) -> dict[str, Any]:
    messages = obj.get("messages")
    if not isinstance(messages, list):
        raise ConversionError("openai-chat: messages must be an array")
    out: dict[str, Any] = {"schema_version": 2, "messages": _without_fine_tuning_keys(messages)}
    eid = obj.get("id")
    if eid is not None and not (isinstance(eid, str) and eid):
        # Replaced by a generated id, the user's own would be lost without a word.
        raise ConversionError("openai-chat: id must be a non-empty string (or absent: an id is then generated)")
    out["episode_id"] = eid if eid is not None else _position_id("chat", rec)
    for key in ("model", "metadata", "timestamp", "stream"):
        if obj.get(key) is not None:
            out[key] = obj[key]
    return out


def from_langfuse(obj: dict[str, Any], rec: Record) -> dict[str, Any]:
    trace_id = obj.get("id")
    if not isinstance(trace_id, str) or not trace_id:
        raise ConversionError("langfuse: a trace needs a string id")
    observations = obj.get("observations") or []
    if not isinstance(observations, list):
        raise ConversionError("langfuse: observations must be an array")
    generations = [o for o in observations if isinstance(o, dict) and o.get("type") == "GENERATION"]
    generations.sort(key=lambda o: _started(o.get("startTime")))
    source = generations[-1] if generations else obj
    messages = _langfuse_input(source.get("input")) + _langfuse_output(source.get("output"))
    if not messages:
        raise ConversionError("langfuse: the trace has no input or output messages")
    out: dict[str, Any] = {"schema_version": 2, "episode_id": trace_id, "messages": messages}
    if obj.get("timestamp") is not None:
        out["timestamp"] = obj["timestamp"]
    model = source.get("model")
    if isinstance(model, str) and model:
        out["model"] = model
    meta: dict[str, Any] = {"source": "langfuse"}
    for key, name in (("name", "trace_name"), ("sessionId", "session_id"), ("userId", "user_id"),
                      ("tags", "tags"), ("release", "release"), ("metadata", "langfuse_metadata")):  # fmt: skip
        if obj.get(key) not in (None, "", [], {}):
            meta[name] = obj[key]
    out["metadata"] = meta
    return out


def _started(value: Any) -> float:
    """An observation's ``startTime`` as epoch seconds, read as validation reads a timestamp, for
    ordering (-inf when missing or unreadable). Compared as text, "…:00.500Z" came before "…:00Z"
    and offsets were ignored, so an earlier generation could be imported as the last one."""
    try:
        return parse_timestamp(value)
    except InvalidEpisode:
        return -math.inf


def _langfuse_input(value: Any) -> list[Any]:
    if isinstance(value, dict) and isinstance(value.get("messages"), list):
        return list(value["messages"])
    if isinstance(value, list):
        return list(value)
    if isinstance(value, str) and value:
        return [{"role": "user", "content": value}]
    if value is None:
        return []
    raise ConversionError("langfuse: input must be messages, {messages: [...]} or a string")


def _langfuse_output(value: Any) -> list[Any]:
    if isinstance(value, dict) and isinstance(value.get("choices"), list) and value["choices"]:
        value = value["choices"][0].get("message") if isinstance(value["choices"][0], dict) else None
    if isinstance(value, dict) and "role" in value:
        return [value]
    if isinstance(value, dict) and "content" in value:
        return [{"role": "assistant", **value}]
    if isinstance(value, list):
        return list(value)
    if isinstance(value, str) and value:
        return [{"role": "assistant", "content": value}]
    if value is None:
        return []
    raise ConversionError("langfuse: output must be a message, messages, {choices: [...]} or a string")


def _as_is(obj: dict[str, Any], rec: Record) -> dict[str, Any]:
    return obj


def guess(obj: dict[str, Any]) -> Converter:
    if "prompt" in obj or "schema_version" in obj or "episode_id" in obj:
        return _as_is
    if "messages" in obj and "observations" not in obj:
        return from_openai_chat
    if "observations" in obj or "input" in obj or "output" in obj:
        return from_langfuse
    raise ConversionError("auto: neither OpenAI chat (messages) nor a Langfuse trace (input, output, observations)")


CONVERTERS: dict[str, Converter] = {"openai-chat": from_openai_chat, "langfuse": from_langfuse}


def convert_line(rec: Record, fmt: str, stream: str | None = None) -> bytes:
    """One input line -> one schema-v2 record (bytes); :class:`ConversionError` with the reason."""
    raw = rec.value.removeprefix(b"\xef\xbb\xbf")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        # Validation's own parse names the cause (invalid_utf8, nul_character, invalid_unicode,
        # number_out_of_range, too_deep, invalid_json) as it does for a file replayed: orjson's
        # message ("not JSON: number is infinity when parsed as double") named none of them.
        return raw
    if not isinstance(obj, dict):
        raise ConversionError("a line must be a JSON object")
    converter = guess(obj) if fmt == "auto" else CONVERTERS[fmt]
    out = converter(obj, rec)
    if stream is not None and "stream" not in out:
        out["stream"] = stream
    return encode_record(out)  # a record nested too deeply to encode is validation's to refuse


class ConvertingSource:
    """A source whose records are converted on the way in (``oversight import``).

    Lines that cannot be converted go to the dead-letter sink here, flushed before the poll
    returns (so before the batch that follows them commits: never lost), and are counted in
    ``unconvertible``; everything else is delegated to the wrapped source."""

    def __init__(self, inner: Source, fmt: str, dead_letters: DeadLetterSink, stream: str | None = None):
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
        self.inner = inner
        self.name = inner.name
        self.fmt = fmt
        self.stream = stream
        self.dead_letters = dead_letters
        self.unconvertible = 0

    def open(self, rebalance: Rebalance) -> None:
        self.inner.open(rebalance)

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        kept: list[Record] = []
        for rec in self.inner.poll(max_records, timeout_s):
            if rec.full_size is None:  # an oversize line is left to the pipeline's own dead letter
                try:
                    rec.value = convert_line(rec, self.fmt, self.stream)
                except ConversionError as e:
                    self._letter(rec, str(e))
                    if kept:  # the batch's offset still moves past it
                        kept[-1].next_offset = rec.next_offset
                    continue
            kept.append(rec)
        self.dead_letters.flush()
        return kept

    def _letter(self, rec: Record, detail: str) -> None:
        self.unconvertible += 1
        self.dead_letters.send(
            DeadLetter(
                UNCONVERTIBLE, detail, rec.value, self.name, rec.partition, rec.offset, time.time(), len(rec.value)
            )
        )

    @property
    def exhausted(self) -> bool:
        return self.inner.exhausted

    def commit(self, offsets: Mapping[int, int]) -> None:
        self.inner.commit(offsets)

    def guard(self, records: list[Record]) -> AbstractContextManager[bool]:
        return self.inner.guard(records)

    def rewind(self) -> None:
        self.inner.rewind()

    def lag(self) -> dict[int, int]:
        return self.inner.lag()

    def failures(self) -> Mapping[str, int]:
        return self.inner.failures()

    def ready(self) -> bool:
        return self.inner.ready()

    def close(self) -> None:
        self.inner.close()
