"""Episode schemas v1 and v2 and validation of raw records.

Validation is hand-written rather than a pydantic model: it runs on every
episode of the deployment's traffic and must be cheap, and each failure needs
a stable machine-readable reason for the dead-letter sink and the metrics.

Schema v1 (one JSON object per episode)::

    episode_id  string, required, 1-128 characters
    timestamp   RFC 3339 string or epoch seconds (number); default: ingest time
    stream      string, 1-128 characters; default "default"
    model       string (policy version), optional, at most 256 characters
    prompt      string, required
    response    string, required
    metadata    object, optional, at most MAX_METADATA_DEPTH levels of nesting
    schema_version  1, optional

Schema v2 (``monitor.episodes.conversation``) replaces ``prompt`` and ``response`` with
``messages``, a conversation in the OpenAI chat format, and sets ``schema_version`` 2 (a record
with ``messages`` and no ``schema_version`` is v2 too); ``prompt`` and ``response`` are then derived
from the messages by the documented flattening, so every consumer of them works unchanged. A record
with both ``messages`` and ``prompt``/``response`` is refused (``mixed_schema``).

Unknown top-level fields are rejected (put extras in ``metadata``), so a
misspelt field is caught instead of silently ignored. Ids, streams and model
names hold no control characters. Numbers are IEEE doubles or integers of
at most 64 bits; larger integers are read as doubles, as orjson does.

Every record is an attack payload: nothing here may recurse on its
structure (a 1,000-deep array would hit Python's recursion limit here or in
a JSON encoder later) or build unbounded numbers.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from monitor.episodes.conversation import CONVERSATION_REASONS, ConversationError, check_messages, prompt_and_response

SCHEMA_VERSION = 1
SCHEMA_VERSION_V2 = 2  # records with ``messages``
DEFAULT_STREAM = "default"
MAX_ID_CHARS = 128
MAX_STREAM_CHARS = 128
MAX_MODEL_CHARS = 256
# Levels of objects and arrays in metadata, the metadata object itself being level 1.
# Far beyond any real annotation, far below the recursion limits of the JSON encoders
# and of anything that later walks metadata (SQLAlchemy, exports, the review UI).
MAX_METADATA_DEPTH = 32
# orjson's integer range; larger integers become doubles (on both parse paths).
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1
# C0, DEL and C1 controls: a browser form turns LF into CRLF, so an id holding one
# could never be labelled, and they break log lines and terminal output.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTAINERS = frozenset((dict, list))  # what json.loads and orjson build for objects and arrays

# Stable reasons: they are metric label values and dead-letter fields.
REASONS: tuple[str, ...] = (
    "oversize",
    "invalid_utf8",
    "invalid_json",
    "not_object",
    "missing_field",
    "wrong_type",
    "invalid_value",
    "unknown_field",
    "nul_character",
    "invalid_unicode",
    "too_deep",
    "number_out_of_range",
    "timestamp_in_future",
    *CONVERSATION_REASONS,
)
# Reasons the pipeline gives a record that passed validation: the database refused it, its
# episode_id is another stream's (ids are unique across streams), its stream would take the
# replica past pipeline.max_streams, or processing it raised an exception nobody foresaw (a bug,
# never a crash); and one that never reached validation: the source could not decode it.
PIPELINE_REASONS: tuple[str, ...] = (
    "store_rejected",
    "episode_id_conflict",
    "too_many_streams",
    "internal_error",
    "undecodable",
)
DEAD_LETTER_REASONS: tuple[str, ...] = REASONS + PIPELINE_REASONS

_FIELDS = frozenset(
    {"episode_id", "timestamp", "stream", "model", "prompt", "response", "metadata", "schema_version", "messages"}
)


@dataclass(slots=True)
class Episode:
    episode_id: str
    timestamp: float
    stream: str
    model: str | None
    prompt: str
    response: str
    metadata: dict[str, Any] | None
    size: int
    # Schema v2: the conversation as validated (None for v1); prompt and response are its flattening.
    messages: list[dict[str, Any]] | None = None

    def to_json(self) -> dict[str, Any]:
        """The episode as a record that :func:`parse_episode` accepts: v1 with prompt and response;
        v2 with ``schema_version`` 2 and ``messages`` only (its prompt and response are derived,
        and a record with both is refused)."""
        out: dict[str, Any] = {
            "episode_id": self.episode_id,
            "timestamp": self.timestamp,
            "stream": self.stream,
            "model": self.model,
        }
        if self.messages is None:
            out["prompt"] = self.prompt
            out["response"] = self.response
        else:
            out["schema_version"] = SCHEMA_VERSION_V2
            out["messages"] = self.messages
        out["metadata"] = self.metadata
        return out


class InvalidEpisode(Exception):
    """A record that is not a valid episode; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, detail: str, episode_id: str | None = None, stream: str | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.episode_id = episode_id
        self.stream = stream


MAX_TIMESTAMP = 253402300799  # 9999-12-31T23:59:59Z: the last second a datetime holds


def parse_timestamp(value: Any) -> float:
    """Epoch seconds from an RFC 3339 string or a number."""
    if isinstance(value, bool):
        raise InvalidEpisode("wrong_type", "timestamp must be an RFC 3339 string or epoch seconds")
    if isinstance(value, int | float):
        # Compared before float(): an integer beyond the double range overflows it.
        if not 0 <= value <= MAX_TIMESTAMP:  # NaN fails too
            raise InvalidEpisode("invalid_value", "timestamp is out of range")
        return float(value)
    if isinstance(value, str):
        s = value.strip()
        if len(s) < 20 or len(s) > 40 or s[4] != "-" or s[10] not in "Tt ":
            raise InvalidEpisode("invalid_value", "timestamp is not RFC 3339 (e.g. 2026-01-01T00:00:00Z)")
        if s[-1] in "Zz":
            s = s[:-1] + "+00:00"
        # A leap second (23:59:60, valid RFC 3339) is the next second, as POSIX time counts it:
        # datetime has no second 60, and the record was refused as "not RFC 3339".
        leap = s[16:19] == ":60"
        try:
            dt = datetime.fromisoformat(s[:17] + "59" + s[19:] if leap else s) + timedelta(seconds=leap)
        except ValueError:
            raise InvalidEpisode("invalid_value", "timestamp is not RFC 3339 (e.g. 2026-01-01T00:00:00Z)") from None
        if dt.tzinfo is None:
            raise InvalidEpisode("invalid_value", "RFC 3339 timestamp needs a UTC offset or Z")
        # The same range as a number: an offset moves 9999-12-31T23:59:59-23:59 past year 9999,
        # which no datetime holds (every later use, the future-skew check first, raised).
        ts = dt.timestamp()
        if not 0 <= ts <= MAX_TIMESTAMP:
            raise InvalidEpisode("invalid_value", "timestamp is out of range (1970 to 9999)")
        return ts
    raise InvalidEpisode("wrong_type", "timestamp must be an RFC 3339 string or epoch seconds")


def _strings(obj: Any) -> Iterator[str]:
    """Every string of a parsed document, keys included; iterative, so depth cannot overflow the stack."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if type(item) is str:
            yield item
        elif type(item) is dict:
            stack.extend(item.keys())
            stack.extend(item.values())
        elif type(item) is list:
            stack.extend(item)


def _contains_nul(obj: Any) -> bool:
    return any("\x00" in s for s in _strings(obj))


def _is_lone_surrogate_free(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _has_lone_surrogate(obj: Any) -> bool:
    return not all(_is_lone_surrogate_free(s) for s in _strings(obj))


def _depth_exceeds(root: dict[str, Any] | list[Any], limit: int) -> bool:
    """True if ``root`` nests objects and arrays more than ``limit`` levels (``root`` is level 1).

    Level by level, without recursion; a flat object costs one pass over its values,
    which is all the common case (scalar metadata) pays."""
    level: list[Any] = [root]
    depth = 1
    while True:
        deeper = []
        for node in level:
            for v in node.values() if type(node) is dict else node:
                if type(v) is dict or type(v) is list:
                    deeper.append(v)
        if not deeper:
            return False
        depth += 1
        if depth > limit:
            return True
        level = deeper


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class _NumberOutOfRange(Exception):
    """Raised out of json.loads by the number hooks (not a ValueError: that means malformed JSON)."""


def _finite_float(text: str) -> float:
    # 1e400 parses to inf, which neither JSON nor PostgreSQL's JSONB can hold.
    value = float(text)
    if not math.isfinite(value):
        raise _NumberOutOfRange(f"number {text[:40]} is out of range")
    return value


def _bounded_int(text: str) -> int | float:
    # The same result as orjson's fast path: 64-bit integers stay exact, larger ones become
    # doubles, and beyond the double range the record is refused. Never int() of a long
    # digit string: CPython caps it at 4,300 digits and it is quadratic below that.
    if len(text) <= 21:
        value = int(text)
        if _INT_MIN <= value <= _INT_MAX:
            return value
    return _finite_float(text)


def parse_episode(raw: bytes, max_bytes: int, now: float, max_future_s: float | None = None) -> Episode:
    """Validate one raw record; raise :class:`InvalidEpisode` with a reason.

    ``now`` is the reader's clock: the timestamp of a record without one, and, with
    ``max_future_s``, the time a record's timestamp may not pass by more than that. Event time
    is the stream's clock (the sampler's boosts and review budget, the windowed detectors), and
    it only moves forward: one episode stamped in the year 9999 would end every active boost,
    freeze the review budget and make the next boost last forever.

    >>> parse_episode(b'{"episode_id": "e1", "prompt": "p", "response": "r", "timestamp": 7200}', 1024, 0.0, 3600.0)
    Traceback (most recent call last):
    ...
    monitor.episodes.validate.InvalidEpisode: timestamp_in_future: timestamp 1970-01-01T02:00:00Z is 7200 s ahead \
of this reader's clock (limit: source.max_future_s = 3600 s)
    """
    ep = _parse(raw, max_bytes, now)
    if max_future_s is not None and ep.timestamp > now + max_future_s:
        raise _in_future(ep, now, max_future_s)
    return ep


def _in_future(ep: Episode, now: float, max_future_s: float) -> InvalidEpisode:
    # The timestamp passed parse_timestamp, so it is a year between 1970 and 9999.
    stamp = datetime.fromtimestamp(ep.timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return InvalidEpisode(
        "timestamp_in_future",
        f"timestamp {stamp} is {ep.timestamp - now:.0f} s ahead of this reader's clock"
        f" (limit: source.max_future_s = {max_future_s:g} s)",
        ep.episode_id,
        ep.stream,
    )


def _parse(raw: bytes, max_bytes: int, now: float) -> Episode:
    size = len(raw)
    if size > max_bytes:
        raise InvalidEpisode("oversize", f"record is {size} bytes, limit is {max_bytes}")
    # Fast path: orjson rejects invalid UTF-8, lone surrogates, NaN/Infinity
    # and out-of-range numbers itself. Anything it refuses takes the slow path,
    # which says exactly why.
    if b"\x00" not in raw and b"\\u0000" not in raw:
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
        else:
            return _validate(obj, size, now)
    return _parse_slow(raw, size, now)


def _parse_slow(raw: bytes, size: int, now: float) -> Episode:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidEpisode("invalid_utf8", f"invalid UTF-8 at byte {e.start}") from None
    if "\x00" in text:
        raise InvalidEpisode("nul_character", "raw NUL byte in record")
    # A byte-order mark before the record (the first line of a file a Windows tool wrote): RFC 8259
    # lets a parser ignore it, and orjson's refusal sent it here.
    text = text.removeprefix("\ufeff")
    try:
        # NaN/Infinity are not JSON; strict=True rejects raw control characters.
        obj = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except _NumberOutOfRange as e:
        raise InvalidEpisode("number_out_of_range", f"{e} (numbers must be finite doubles)") from None
    except RecursionError:
        # orjson refuses over 1,024 levels, so deep documents end up here.
        raise InvalidEpisode("too_deep", f"nesting deeper than {MAX_METADATA_DEPTH} levels") from None
    except ValueError as e:
        raise InvalidEpisode("invalid_json", str(e)[:200]) from None
    # Escaped NULs and lone surrogates parse fine but PostgreSQL text and
    # UTF-8 encoders reject them later; catch them here.
    if "\\u" in text:
        low = text.lower()
        if "\\u0000" in low and _contains_nul(obj):
            raise InvalidEpisode("nul_character", "NUL characters are not allowed in episode text", *_context(obj))
        if "\\ud" in low and _has_lone_surrogate(obj):
            raise InvalidEpisode("invalid_unicode", "unpaired UTF-16 surrogate escape", *_context(obj))
    return _validate(obj, size, now)


def _context(obj: Any) -> tuple[str | None, str | None]:
    if not isinstance(obj, dict):
        return None, None
    eid = obj.get("episode_id")
    stream = obj.get("stream", DEFAULT_STREAM)
    # Only values that would have been valid: the context travels into dead-letter
    # fields and metric labels.
    return (
        eid if isinstance(eid, str) and 0 < len(eid) <= MAX_ID_CHARS and not _characters_error("", eid) else None,
        stream if isinstance(stream, str) and stream_name_error(stream) is None else None,
    )


def _validate(obj: Any, size: int, now: float) -> Episode:
    if type(obj) is not dict:
        raise InvalidEpisode("not_object", f"expected a JSON object, got {type(obj).__name__}")
    if not _FIELDS.issuperset(obj):
        names = ", ".join(sorted(repr(k[:40]) for k in obj.keys() - _FIELDS)[:5])
        raise _bad(obj, "unknown_field", f"unknown top-level fields {names} (put extras in metadata)")
    if "messages" in obj:  # one dict lookup is all v1 pays
        return _validate_v2(obj, size, now)
    eid = obj.get("episode_id")
    prompt = obj.get("prompt")
    response = obj.get("response")
    stream = obj.get("stream", DEFAULT_STREAM)
    # The common case in one test; the detailed checks only name the problem.
    # isprintable() is a cheap superset test for control characters.
    if not (
        type(eid) is str
        and type(prompt) is str
        and type(response) is str
        and type(stream) is str
        and 0 < len(eid) <= MAX_ID_CHARS
        and 0 < len(stream) <= MAX_STREAM_CHARS
        # isprintable() is False for every control, format and separator character but the space.
        and (
            (eid.isprintable() and stream.isprintable())
            or not (_characters_error("episode_id", eid) or stream_name_error(stream))
        )
    ):
        raise _required_fields_error(obj, eid, stream, prompt)
    model, metadata = _optional_fields(obj)
    version = obj.get("schema_version")
    if version is not None and (type(version) is not int or version != SCHEMA_VERSION):
        if type(version) is int and version == SCHEMA_VERSION_V2:
            raise _bad(obj, "invalid_value", "schema_version 2 records carry messages, not prompt and response")
        raise _bad(
            obj, "invalid_value", f"schema_version must be {SCHEMA_VERSION} (or {SCHEMA_VERSION_V2} with messages)"
        )
    return Episode(eid, _timestamp(obj, now), stream, model, prompt, response, metadata, size)


def _optional_fields(obj: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    """``model`` and ``metadata``, checked: v1 and v2 share them."""
    model = obj.get("model")
    if model is not None:
        _check_model(obj, model)
    metadata = obj.get("metadata")
    if metadata is not None:
        _check_metadata(obj, metadata)
    return model, metadata


def _timestamp(obj: dict[str, Any], now: float) -> float:
    ts_raw = obj.get("timestamp")
    if ts_raw is None:
        return now
    try:
        return parse_timestamp(ts_raw)
    except InvalidEpisode as e:
        raise _bad(obj, e.reason, e.detail) from None


def _validate_v2(obj: dict[str, Any], size: int, now: float) -> Episode:
    """A record with ``messages``: the same id, stream and optional fields as v1, then the conversation."""
    if "prompt" in obj or "response" in obj:
        raise _bad(obj, "mixed_schema", "a record with messages (schema v2) must not carry prompt or response")
    version = obj.get("schema_version")
    if version is not None and (type(version) is not int or version != SCHEMA_VERSION_V2):
        raise _bad(obj, "invalid_value", f"schema_version must be {SCHEMA_VERSION_V2} with messages")
    eid = obj.get("episode_id")
    stream = obj.get("stream", DEFAULT_STREAM)
    if not (
        type(eid) is str
        and type(stream) is str
        and 0 < len(eid) <= MAX_ID_CHARS
        and 0 < len(stream) <= MAX_STREAM_CHARS
        and not (_characters_error("episode_id", eid) or stream_name_error(stream))
    ):
        # v1's checks name the problem; "" stands in for the prompt and response v2 does not have.
        raise _required_fields_error({**obj, "prompt": "", "response": ""}, eid, stream, "")
    model, metadata = _optional_fields(obj)
    ts = _timestamp(obj, now)
    try:
        messages = check_messages(obj["messages"])
    except ConversationError as e:
        raise _bad(obj, e.reason, e.detail) from None
    prompt, response = prompt_and_response(messages)
    return Episode(eid, ts, stream, model, prompt, response, metadata, size, messages)


def _version_error(obj: dict[str, Any]) -> InvalidEpisode | None:
    """What is wrong with the version of a record that lacks v1's required fields, if anything: a
    v2 record without messages, or a version this build does not know (a newer client's), which is
    named as such, not as a v1 record missing its prompt."""
    version = obj.get("schema_version")
    if type(version) is int and version == SCHEMA_VERSION_V2 and "prompt" not in obj and "response" not in obj:
        return _bad(obj, "missing_field", "messages is required with schema_version 2")
    if version is not None and not (type(version) is int and version in (SCHEMA_VERSION, SCHEMA_VERSION_V2)):
        return _bad(
            obj, "invalid_value", f"schema_version must be {SCHEMA_VERSION} (or {SCHEMA_VERSION_V2} with messages)"
        )
    return None


def _required_fields_error(obj: dict[str, Any], eid: Any, stream: Any, prompt: Any) -> InvalidEpisode:
    """The first problem with the required fields, named, once the one test of the common case
    failed: in the order a reader fixes them (presence, then each field's type, length, characters)."""
    version_error = _version_error(obj)
    if version_error is not None:
        return version_error
    for name in ("episode_id", "prompt", "response"):
        if name not in obj:
            return _bad(obj, "missing_field", f"{name} is required")
    if not isinstance(eid, str):
        return _bad(obj, "wrong_type", "episode_id must be a string")
    if not 0 < len(eid) <= MAX_ID_CHARS:
        return _bad(obj, "invalid_value", f"episode_id must be 1-{MAX_ID_CHARS} characters")
    if (why := _characters_error("episode_id", eid)) is not None:
        return _bad(obj, "invalid_value", why)
    if not isinstance(stream, str):
        return _bad(obj, "wrong_type", "stream must be a string")
    if (why := stream_name_error(stream)) is not None:
        return _bad(obj, "invalid_value", why)
    if not isinstance(prompt, str):
        return _bad(obj, "wrong_type", "prompt must be a string")
    return _bad(obj, "wrong_type", "response must be a string")


def _characters_error(name: str, text: str) -> str | None:
    """Why ``text`` cannot be an id, a stream or a model name for its characters (None: it can).
    Controls break log lines and forms; format and separator characters make one name read as
    another, or turn it around (U+202E), in the review UI, exports, dashboards and log lines."""
    if _CONTROL.search(text):
        return f"{name} must not contain control characters ({_control_at(text)})"
    if not text.isascii() and (i := _invisible_at(text)) is not None:
        return f"{name} must not contain invisible or direction-changing characters (U+{ord(text[i]):04X} at index {i})"
    return None


def stream_name_error(stream: str) -> str | None:
    """Why ``stream`` cannot name a stream (None: it can): 1-128 characters, no control characters.

    >>> stream_name_error("chat"), stream_name_error("a\\x01b")
    (None, 'stream must not contain control characters (U+0001 at index 1)')
    >>> stream_name_error("chat\\u200b")
    'stream must not contain invisible or direction-changing characters (U+200B at index 4)'
    """
    if not 0 < len(stream) <= MAX_STREAM_CHARS:
        return f"stream must be 1-{MAX_STREAM_CHARS} characters"
    return _characters_error("stream", stream)


def _invisible_at(text: str) -> int | None:
    """The index of the first format or separator character (Unicode Cf, Zl, Zp: zero-width
    spaces and joiners, bidi overrides such as U+202E, the BOM): a stream named with one reads as
    another ("chat\u200b" as "chat") in the review UI, dashboards and alerts."""
    for i, ch in enumerate(text):
        if unicodedata.category(ch) in ("Cf", "Zl", "Zp"):
            return i
    return None


def _check_model(obj: dict[str, Any], model: Any) -> None:
    if type(model) is not str:
        raise _bad(obj, "wrong_type", "model must be a string")
    if len(model) > MAX_MODEL_CHARS:
        raise _bad(obj, "invalid_value", f"model must be at most {MAX_MODEL_CHARS} characters")
    if not model.isprintable() and (why := _characters_error("model", model)) is not None:
        raise _bad(obj, "invalid_value", why)


def _check_metadata(obj: dict[str, Any], metadata: Any) -> None:
    if type(metadata) is not dict:
        raise _bad(obj, "wrong_type", "metadata must be an object")
    # The walk only when some value is a container: flat metadata (the common case) costs
    # one pass in C over the value types.
    if not _CONTAINERS.isdisjoint(map(type, metadata.values())) and _depth_exceeds(metadata, MAX_METADATA_DEPTH):
        raise _bad(obj, "too_deep", f"metadata nests deeper than {MAX_METADATA_DEPTH} levels")


def _bad(obj: dict[str, Any], reason: str, detail: str) -> InvalidEpisode:
    return InvalidEpisode(reason, detail, *_context(obj))


def _control_at(s: str) -> str:
    """Names the first control character by code point: the detail must not carry it raw."""
    m = _CONTROL.search(s)
    return "none" if m is None else f"U+{ord(m.group()):04X} at index {m.start()}"
