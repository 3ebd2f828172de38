"""Episode schema v1 and validation of raw records.

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
    metadata    object, optional
    schema_version  1, optional

Unknown top-level fields are rejected (put extras in ``metadata``), so a
misspelt field is caught instead of silently ignored.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

SCHEMA_VERSION = 1
DEFAULT_STREAM = "default"
MAX_ID_CHARS = 128
MAX_STREAM_CHARS = 128
MAX_MODEL_CHARS = 256

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
)

_FIELDS = frozenset({"episode_id", "timestamp", "stream", "model", "prompt", "response", "metadata", "schema_version"})


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

    def to_json(self) -> dict[str, Any]:
        return {
            "episode_id": self.episode_id,
            "timestamp": self.timestamp,
            "stream": self.stream,
            "model": self.model,
            "prompt": self.prompt,
            "response": self.response,
            "metadata": self.metadata,
        }


class InvalidEpisode(Exception):
    """A record that is not a valid v1 episode; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, detail: str, episode_id: str | None = None, stream: str | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.episode_id = episode_id
        self.stream = stream


def parse_timestamp(value: Any) -> float:
    """Epoch seconds from an RFC 3339 string or a number."""
    if isinstance(value, bool):
        raise InvalidEpisode("wrong_type", "timestamp must be an RFC 3339 string or epoch seconds")
    if isinstance(value, int | float):
        t = float(value)
        if not math.isfinite(t) or t < 0 or t > 253402300799:  # 9999-12-31
            raise InvalidEpisode("invalid_value", "timestamp is out of range")
        return t
    if isinstance(value, str):
        s = value.strip()
        if len(s) < 20 or len(s) > 40 or s[4] != "-" or s[10] not in "Tt ":
            raise InvalidEpisode("invalid_value", "timestamp is not RFC 3339 (e.g. 2026-01-01T00:00:00Z)")
        if s[-1] in "Zz":
            s = s[:-1] + "+00:00"
        try:
            dt = datetime.fromisoformat(s)
        except ValueError:
            raise InvalidEpisode("invalid_value", "timestamp is not RFC 3339 (e.g. 2026-01-01T00:00:00Z)") from None
        if dt.tzinfo is None:
            raise InvalidEpisode("invalid_value", "RFC 3339 timestamp needs a UTC offset or Z")
        return dt.timestamp()
    raise InvalidEpisode("wrong_type", "timestamp must be an RFC 3339 string or epoch seconds")


def _contains_nul(obj: Any) -> bool:
    if isinstance(obj, str):
        return "\x00" in obj
    if isinstance(obj, dict):
        return any(_contains_nul(k) or _contains_nul(v) for k, v in obj.items())
    if isinstance(obj, list):
        return any(_contains_nul(v) for v in obj)
    return False


def _has_lone_surrogate(obj: Any) -> bool:
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(obj, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in obj.items())
    if isinstance(obj, list):
        return any(_has_lone_surrogate(v) for v in obj)
    return False


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    # 1e400 parses to inf, which neither JSON nor PostgreSQL's JSONB can hold.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def parse_episode(raw: bytes, max_bytes: int, now: float) -> Episode:
    """Validate one raw record; raise :class:`InvalidEpisode` with a reason."""
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
    try:
        # NaN/Infinity are not JSON; strict=True rejects raw control characters.
        obj = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as e:
        msg = str(e) if not isinstance(e, RecursionError) else "nesting too deep"
        raise InvalidEpisode("invalid_json", msg[:200]) from None
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
    return (
        eid if isinstance(eid, str) and 0 < len(eid) <= MAX_ID_CHARS else None,
        stream if isinstance(stream, str) and 0 < len(stream) <= MAX_STREAM_CHARS else None,
    )


def _validate(obj: Any, size: int, now: float) -> Episode:
    if type(obj) is not dict:
        raise InvalidEpisode("not_object", f"expected a JSON object, got {type(obj).__name__}")
    if not _FIELDS.issuperset(obj):
        names = ", ".join(sorted(repr(k[:40]) for k in obj.keys() - _FIELDS)[:5])
        raise _bad(obj, "unknown_field", f"unknown top-level fields {names} (put extras in metadata)")
    eid = obj.get("episode_id")
    prompt = obj.get("prompt")
    response = obj.get("response")
    stream = obj.get("stream", DEFAULT_STREAM)
    # The common case in one test; the detailed checks below only name the problem.
    if (
        type(eid) is str
        and type(prompt) is str
        and type(response) is str
        and type(stream) is str
        and 0 < len(eid) <= MAX_ID_CHARS
        and 0 < len(stream) <= MAX_STREAM_CHARS
    ):
        pass
    else:
        for name in ("episode_id", "prompt", "response"):
            if name not in obj:
                raise _bad(obj, "missing_field", f"{name} is required")
        if not isinstance(eid, str):
            raise _bad(obj, "wrong_type", "episode_id must be a string")
        if not 0 < len(eid) <= MAX_ID_CHARS:
            raise _bad(obj, "invalid_value", f"episode_id must be 1-{MAX_ID_CHARS} characters")
        if not isinstance(stream, str):
            raise _bad(obj, "wrong_type", "stream must be a string")
        if not 0 < len(stream) <= MAX_STREAM_CHARS:
            raise _bad(obj, "invalid_value", f"stream must be 1-{MAX_STREAM_CHARS} characters")
        if not isinstance(prompt, str):
            raise _bad(obj, "wrong_type", "prompt must be a string")
        raise _bad(obj, "wrong_type", "response must be a string")
    model = obj.get("model")
    if model is not None:
        if type(model) is not str:
            raise _bad(obj, "wrong_type", "model must be a string")
        if len(model) > MAX_MODEL_CHARS:
            raise _bad(obj, "invalid_value", f"model must be at most {MAX_MODEL_CHARS} characters")
    metadata = obj.get("metadata")
    if metadata is not None and type(metadata) is not dict:
        raise _bad(obj, "wrong_type", "metadata must be an object")
    version = obj.get("schema_version")
    if version is not None and (type(version) is not int or version != SCHEMA_VERSION):
        raise _bad(obj, "invalid_value", f"schema_version must be {SCHEMA_VERSION}")
    ts_raw = obj.get("timestamp")
    if ts_raw is None:
        ts = now
    else:
        try:
            ts = parse_timestamp(ts_raw)
        except InvalidEpisode as e:
            raise _bad(obj, e.reason, e.detail) from None
    return Episode(eid, ts, stream, model, prompt, response, metadata, size)


def _bad(obj: dict[str, Any], reason: str, detail: str) -> InvalidEpisode:
    return InvalidEpisode(reason, detail, *_context(obj))
