"""OTLP traces -> schema-v2 episode records: the pure conversion behind ``POST /v1/traces``.

An ``ExportTraceServiceRequest`` (protobuf, or the OTLP/JSON encoding) is decoded into plain
:class:`Span` values, every attribute bounded (size, nesting), then grouped into episodes under the
OpenTelemetry GenAI semantic conventions:

* a span is **GenAI** when it has ``gen_ai.operation.name``, ``gen_ai.system`` or
  ``gen_ai.provider.name``; other spans are ignored (and counted);
* one episode per **top-level** GenAI span (one without a GenAI ancestor in the request): a
  generation or an agent invocation. Its GenAI descendants (LLM calls, tool executions, nested
  agents), also through non-GenAI spans in between, are its turns, in start-time order; of its
  model calls, only those that continue the conversation (``_thread``): a guardrail or classifier
  run on the answer is auxiliary, left out and counted. Of several choices, one is kept;
* messages come from ``gen_ai.input.messages`` / ``gen_ai.output.messages`` /
  ``gen_ai.system_instructions`` (JSON, the current conventions), from the older
  ``gen_ai.*.message`` / ``gen_ai.choice`` / ``gen_ai.content.prompt`` events, or from the
  OpenLLMetry flattening ``gen_ai.prompt.N.role`` / ``.content`` (``gen_ai.completion.N.*``; a
  content that is a JSON list of Anthropic blocks is read as those blocks);
  ``execute_tool`` spans give an assistant tool call and its tool result (the model's own call
  when the span names none).

README "OTLP traces" has the whole attribute mapping. Nothing here validates an episode: the
records go through the same validation as every other path (``monitor.episodes``); a span whose
episode cannot even be built (no messages, an oversize or too deeply nested attribute) gets a
reason here instead. Every span is an attack payload: nothing recurses without a bound, nothing
grows without a limit, and a malformed request raises :class:`OtlpError` (a 4xx), never anything else.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import json
import logging
import math
import re
import traceback
from collections import deque
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import orjson

from monitor.episodes.conversation import MAX_MESSAGES, PLACEHOLDERS

log = logging.getLogger(__name__)
GENAI_OPERATIONS = frozenset(
    {"chat", "text_completion", "generate_content", "execute_tool", "invoke_agent", "create_agent"}
)
# Operations whose spans are one model call (their input messages hold the conversation so far).
LLM_OPERATIONS = frozenset({"chat", "text_completion", "generate_content"})
STREAM_ATTRIBUTE = "oversight.stream"
STATUS_ERROR = 2  # Status.StatusCode.STATUS_CODE_ERROR
REJECT_REASONS = (
    "no_messages",
    "oversize",
    "too_deep",
    "invalid_json",
    "invalid_value",
    "too_many_messages",
    "internal_error",  # a bug met while building one episode: that span's, never the request's
)
_UINT64_MAX = (1 << 64) - 1
_INT64_MAX = (1 << 63) - 1
_HEX_ID = re.compile(r"^[0-9a-fA-F]{1,64}$")
_FLAT = re.compile(r"^gen_ai\.(prompt|completion)\.(\d{1,4})\.(.+)$")
_FLAT_TOOL = re.compile(r"^tool_calls\.(\d{1,3})\.(name|arguments|id)$")


@dataclass(frozen=True, slots=True)
class OtlpLimits:
    """Bounds on one export request; beyond them the request is refused (4xx) or the span rejected."""

    max_body_bytes: int = 16 << 20  # after decompression
    max_spans: int = 10_000
    # resourceSpans plus scopeSpans: a real export has a few; an empty one costs two bytes on the
    # wire, and millions of them (16 KiB gzipped) cost seconds of CPU and hundreds of MB to parse.
    max_groups: int = 1_000
    max_attributes: int = 512  # per span, resource or event
    max_events: int = 512  # per span
    max_value_chars: int = 1 << 20  # one string (or bytes) value
    max_depth: int = 16  # nested arrays / kvlists in one AnyValue, JSON in a messages attribute
    body_timeout_s: float = 30.0  # the whole body must arrive within this (ingest.body_timeout_s), else 408


class OtlpError(Exception):
    """The request as a whole is malformed or too large: ``status`` 400 or 413."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class _Reject(Exception):
    """One span's value is unusable; ``reason`` is one of ``REJECT_REASONS``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(slots=True)
class Span:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    start_ns: int
    status_code: int
    attrs: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    resource: dict[str, Any]
    #: Set when an attribute was refused while decoding (the span's episode is rejected with it).
    error: _Reject | None = None


@dataclass(slots=True)
class Rejected:
    """A top-level span whose episode could not be built, and how many spans it took with it."""

    span_id: str
    spans: int
    reason: str
    detail: str


@dataclass(slots=True)
class Conversion:
    records: list[dict[str, Any]] = field(default_factory=list)
    #: Each record encoded (parallel to ``records``): what is handed to validation.
    raws: list[bytes] = field(default_factory=list)
    #: Spans of each record (parallel to ``records``), for partial_success accounting.
    record_spans: list[int] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    ignored: int = 0  # spans that are not GenAI


# --- decoding --------------------------------------------------------------------------------


def decode_protobuf(body: bytes, limits: OtlpLimits) -> list[Span]:
    from google.protobuf.message import DecodeError
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    check_wire_counts(body, limits)
    try:
        request = ExportTraceServiceRequest.FromString(body)
    except (DecodeError, RecursionError, ValueError) as e:  # upb refuses invalid UTF-8 and deep nesting itself
        raise OtlpError(400, f"not an OTLP ExportTraceServiceRequest: {str(e)[:200]}") from None
    out: list[Span] = []
    for rs in request.resource_spans:
        resource = _proto_attributes(rs.resource.attributes, limits)
        for ss in rs.scope_spans:
            _check_count(len(out) + len(ss.spans), limits)
            out.extend(_proto_span(sp, resource, limits) for sp in ss.spans)
    _check_ids(out)
    return out


def check_wire_counts(body: bytes, limits: OtlpLimits) -> None:
    """The resource spans, scope spans and spans of a protobuf request counted on the wire, before
    the whole message is parsed: the parse builds every one of them first (8 million empty resource
    spans, 16 MiB, took 15 s and 512 MB), and the counts after it came too late. Stops as soon as a
    count is over its limit, so it reads at most ``max_groups + max_spans`` fields of the three
    levels; a malformed body is left for the parser to name.

    >>> check_wire_counts(b"\\x0a\\x00" * 3, OtlpLimits(max_groups=2))
    Traceback (most recent call last):
    ...
    monitor.ingest.otlp.OtlpError: more than 2 resourceSpans and scopeSpans in one request
    """
    groups = spans = 0
    try:
        # ExportTraceServiceRequest.resource_spans = 1; ResourceSpans.scope_spans = 2; ScopeSpans.spans = 2.
        for resource in _wire_messages(body, 0, len(body), 1):
            groups += 1
            for scope in _wire_messages(body, resource[0], resource[1], 2):
                groups += 1
                if groups > limits.max_groups:
                    break
                spans += sum(1 for _ in _wire_messages(body, scope[0], scope[1], 2, limits.max_spans - spans + 1))
                _check_count(spans, limits)
            if groups > limits.max_groups:
                raise OtlpError(413, f"more than {limits.max_groups} resourceSpans and scopeSpans in one request")
    except _WireError:
        return  # not what it claims to be: FromString says so with its own message


class _WireError(Exception):
    pass


def _varint(buf: bytes, i: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= end or shift > 63:
            raise _WireError
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _wire_messages(buf: bytes, start: int, end: int, field_no: int, limit: int = -1) -> Iterator[tuple[int, int]]:
    """(start, end) of each length-delimited field ``field_no`` in ``buf[start:end]``, at most
    ``limit`` of them (-1: all); the other fields skipped by their wire type."""
    i = start
    while i < end and limit != 0:
        key, i = _varint(buf, i, end)
        wire = key & 7
        if wire == 0:
            _, i = _varint(buf, i, end)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n, i = _varint(buf, i, end)
            if i + n > end:
                raise _WireError
            if key >> 3 == field_no:
                limit -= 1
                yield i, i + n
            i += n
        else:
            raise _WireError
    if i > end:
        raise _WireError


def _check_ids(spans: list[Span]) -> None:
    """Every span has a non-zero trace and span id, and no (trace, span) pair comes twice: episodes
    are keyed and grouped by them. Without it two spans without ids (protobuf leaves them empty)
    were merged into one made-up conversation, and every later span without ids had that same
    episode id, so different content was answered 200 and dropped as a redelivery. The JSON
    encoding already refused a missing id; both now refuse the request (400) as malformed."""
    seen: set[Key] = set()
    for s in spans:
        if not s.trace_id.strip("0") or not s.span_id.strip("0"):
            raise OtlpError(400, "a span needs a non-zero traceId and spanId")
        key = (s.trace_id, s.span_id)
        if key in seen:
            raise OtlpError(400, f"span {s.span_id[:64]} of trace {s.trace_id[:64]} appears twice in the request")
        seen.add(key)


def _check_count(n: int, limits: OtlpLimits) -> None:
    if n > limits.max_spans:
        raise OtlpError(413, f"more than {limits.max_spans} spans in one request")


def _proto_span(sp: Any, resource: dict[str, Any], limits: OtlpLimits) -> Span:
    errors: list[_Reject] = []
    span = Span(
        sp.trace_id.hex(), sp.span_id.hex(), sp.parent_span_id.hex(), sp.name[:256], int(sp.start_time_unix_nano),
        int(sp.status.code), _proto_attributes(sp.attributes, limits, errors), [], resource,
    )  # fmt: skip
    if len(sp.events) > limits.max_events:
        errors.append(_Reject("oversize", f"more than {limits.max_events} events"))
    span.events = [(ev.name, _proto_attributes(ev.attributes, limits, errors)) for ev in sp.events[: limits.max_events]]
    span.error = errors[0] if errors else None
    return span


def _proto_attributes(kvs: Any, limits: OtlpLimits, errors: list[_Reject] | None = None) -> dict[str, Any]:
    """Key-values to a dict. A bad value is dropped; with ``errors`` (a span's, not the resource's)
    it is also recorded, and rejects the span's episode, while what was readable still says
    whether the span is GenAI."""
    if len(kvs) > limits.max_attributes:
        _record(errors, _Reject("oversize", f"more than {limits.max_attributes} attributes"))
        kvs = kvs[: limits.max_attributes]
    out: dict[str, Any] = {}
    for kv in kvs:
        try:
            out[kv.key[:256]] = _proto_value(kv.value, limits, 1)
        except _Reject as e:
            _record(errors, e)
    return out


def _record(errors: list[_Reject] | None, e: _Reject) -> None:
    if errors is not None:
        errors.append(e)


def _proto_value(v: Any, limits: OtlpLimits, depth: int) -> Any:
    kind = v.WhichOneof("value")
    if kind in ("string_value", "bytes_value"):
        value = getattr(v, kind)
        if len(value) > limits.max_value_chars:
            raise _Reject("oversize", f"an attribute value of {len(value)} characters")
        return value if kind == "string_value" else value.hex()
    if kind in ("bool_value", "int_value"):
        return getattr(v, kind)
    if kind == "double_value":
        return _finite_or_name(v.double_value)
    if kind is None:
        return None
    if depth >= limits.max_depth:
        raise _Reject("too_deep", f"an attribute nested deeper than {limits.max_depth} levels")
    if kind == "array_value":
        return [_proto_value(x, limits, depth + 1) for x in v.array_value.values]
    return {kv.key[:256]: _proto_value(kv.value, limits, depth + 1) for kv in v.kvlist_value.values}


def decode_json(body: bytes, limits: OtlpLimits) -> list[Span]:
    """The OTLP/JSON encoding: lowerCamelCase fields (snake_case accepted), hex trace and span ids,
    64-bit integers as strings or numbers."""
    doc = _loads(body)
    if not isinstance(doc, dict):
        raise OtlpError(400, "an ExportTraceServiceRequest must be a JSON object")
    out: list[Span] = []
    resources = _list(doc, "resourceSpans")
    groups = len(resources) + sum(len(_list(rs, "scopeSpans")) for rs in resources[: limits.max_groups])
    if groups > limits.max_groups:
        raise OtlpError(413, f"more than {limits.max_groups} resourceSpans and scopeSpans in one request")
    for rs in resources:
        resource = _json_attributes(_obj(rs, "resource").get("attributes"), limits)
        for ss in _list(rs, "scopeSpans"):
            spans = _list(ss, "spans")
            _check_count(len(out) + len(spans), limits)
            out.extend(_json_span(sp, resource, limits) for sp in spans)
    _check_ids(out)
    return out


# orjson's refusal of a number past the double range (``1e999``, ``-1e999``).
_OUT_OF_DOUBLE_RANGE = "number is infinity when parsed as double"


def _loads(body: bytes) -> Any:
    """The request's JSON document. orjson refuses a whole body for one number past the double
    range, which the protobuf JSON mapping reads as an infinite double (a ``doubleValue`` may hold
    one): one such attribute, in any span, made the export a 400. Such a body is parsed again by
    Python's parser, which reads it so, and held to what orjson holds a body to (invalid UTF-8,
    lone surrogates, the ``NaN`` and ``Infinity`` literals, nesting past the parser's depth: 400)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:  # invalid UTF-8, lone surrogates, > 1,024 levels: all end here
        if _OUT_OF_DOUBLE_RANGE not in str(e):
            raise OtlpError(400, f"invalid JSON: {str(e)[:200]}") from None
    try:
        doc = json.loads(body.decode("utf-8"), parse_constant=_no_constant, parse_int=_bounded_int)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise OtlpError(400, f"invalid JSON: {str(e)[:200]}") from None
    _check_strings(doc)
    return doc


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _bounded_int(text: str) -> int | float:
    """An integer as orjson reads it: exact within 64 bits, a double past that (never ``int()`` of
    thousands of digits, which Python refuses past 4,300 and computes in quadratic time below)."""
    return int(text) if len(text) <= 20 else float(text)


def _check_strings(doc: Any) -> None:
    """Every key and string of ``doc`` encodes as UTF-8 (Python's parser lets an escaped lone
    surrogate through; no episode holding one can be written)."""
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise OtlpError(400, "invalid JSON: a string holds a lone surrogate") from None


@functools.cache
def _snake(camel: str) -> str:
    """``traceId`` -> ``trace_id``: the field names are the decoder's own, a few dozen, so cached
    (a regular expression on every lookup was most of a hostile body's decoding time)."""
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), camel)


def _get(obj: dict[str, Any], camel: str) -> Any:
    if camel in obj:
        return obj[camel]
    return obj.get(_snake(camel))


def _obj(parent: Any, key: str) -> dict[str, Any]:
    value = _get(parent, key) if isinstance(parent, dict) else None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise OtlpError(400, f"{key} must be an object")
    return value


def _list(parent: Any, key: str) -> list[Any]:
    if not isinstance(parent, dict):
        raise OtlpError(400, f"expected an object holding {key}")
    value = _get(parent, key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise OtlpError(400, f"{key} must be an array")
    return value


def _json_id(sp: dict[str, Any], key: str, *, required: bool) -> str:
    value = _get(sp, key)
    if value in (None, "") and not required:
        return ""
    if not isinstance(value, str) or not _HEX_ID.match(value):
        raise OtlpError(400, f"span {key} must be a hex string")
    return value.lower()


def _json_int(value: Any, what: str, bound: int = _UINT64_MAX) -> int:
    """A non-negative integer (a JSON number, or digits in a string as OTLP/JSON writes 64-bit
    ones) of at most ``bound``: a field's protobuf type holds no more, and orjson cannot encode a
    larger one into the episode (it raised at the hand-off, a 500 that lost the whole export)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise OtlpError(400, f"{what} must be an integer")
    if isinstance(value, str) and not (value.isascii() and value.isdigit() and len(value) <= 20):
        raise OtlpError(400, f"{what} must be an integer")
    n = int(value)
    if not 0 <= n <= bound:
        raise OtlpError(400, f"{what} must be an integer from 0 to {bound}")
    return n


def _json_span(sp: Any, resource: dict[str, Any], limits: OtlpLimits) -> Span:
    if not isinstance(sp, dict):
        raise OtlpError(400, "a span must be an object")
    errors: list[_Reject] = []
    name = _get(sp, "name")
    start = _get(sp, "startTimeUnixNano")
    span = Span(
        _json_id(sp, "traceId", required=True), _json_id(sp, "spanId", required=True),
        _json_id(sp, "parentSpanId", required=False), name[:256] if isinstance(name, str) else "",
        0 if start is None else _json_int(start, "startTimeUnixNano"),
        _json_int(_obj(sp, "status").get("code", 0), "status.code"),
        _json_attributes(_get(sp, "attributes"), limits, errors), [], resource,
    )  # fmt: skip
    events = _get(sp, "events") or []
    if not isinstance(events, list) or len(events) > limits.max_events:
        errors.append(_Reject("oversize", f"events must be an array of at most {limits.max_events}"))
        events = events[: limits.max_events] if isinstance(events, list) else []
    span.events = [_json_event(ev, limits, errors) for ev in events]
    span.error = errors[0] if errors else None
    return span


def _json_event(ev: Any, limits: OtlpLimits, errors: list[_Reject]) -> tuple[str, dict[str, Any]]:
    if not isinstance(ev, dict):
        errors.append(_Reject("invalid_value", "an event must be an object"))
        return "", {}
    name = ev.get("name")
    return (name if isinstance(name, str) else ""), _json_attributes(ev.get("attributes"), limits, errors)


def _json_attributes(kvs: Any, limits: OtlpLimits, errors: list[_Reject] | None = None) -> dict[str, Any]:
    """As :func:`_proto_attributes`, for the JSON encoding."""
    if kvs is None:
        return {}
    if not isinstance(kvs, list):
        _record(errors, _Reject("invalid_value", "attributes must be an array"))
        return {}
    if len(kvs) > limits.max_attributes:
        _record(errors, _Reject("oversize", f"more than {limits.max_attributes} attributes"))
        kvs = kvs[: limits.max_attributes]
    out: dict[str, Any] = {}
    for kv in kvs:
        if not isinstance(kv, dict) or not isinstance(kv.get("key"), str):
            _record(errors, _Reject("invalid_value", "an attribute must be an object with a string key"))
            continue
        try:
            out[kv["key"][:256]] = _json_value(kv.get("value"), limits, 1)
        except _Reject as e:
            _record(errors, e)
    return out


_JSON_SCALARS: dict[str, type | tuple[type, ...]] = {
    "stringValue": str,
    "boolValue": bool,
    "bytesValue": str,
}
# The strings the protobuf JSON mapping writes for a double that is not a finite number, and a
# number in a string, which the mapping also accepts for a double.
_DOUBLE_NAMES = ("NaN", "Infinity", "-Infinity")
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def _json_value(v: Any, limits: OtlpLimits, depth: int) -> Any:
    if v is None or v == {}:
        return None
    if not isinstance(v, dict) or len(v) != 1:
        raise _Reject("invalid_value", "an AnyValue must be an object with one field")
    (key, value), = v.items()  # fmt: skip
    key = re.sub(r"_([a-z])", lambda m: m.group(1).upper(), key)
    if key in _JSON_SCALARS or key in ("intValue", "doubleValue"):
        return _json_scalar(key, value, limits)
    if depth >= limits.max_depth:
        raise _Reject("too_deep", f"an attribute nested deeper than {limits.max_depth} levels")
    if key == "arrayValue" and isinstance(value, dict):
        return [_json_value(x, limits, depth + 1) for x in _values(value)]
    if key == "kvlistValue" and isinstance(value, dict):
        out: dict[str, Any] = {}
        for kv in _values(value):
            if not isinstance(kv, dict) or not isinstance(kv.get("key"), str):
                raise _Reject("invalid_value", "a kvlist entry needs a string key")
            out[kv["key"][:256]] = _json_value(kv.get("value"), limits, depth + 1)
        return out
    raise _Reject("invalid_value", f"unknown AnyValue field {key[:40]!r}")


def _json_scalar(key: str, value: Any, limits: OtlpLimits) -> Any:
    """The value of a scalar AnyValue field (``key`` in lowerCamelCase)."""
    if key == "intValue":
        return _signed_int(value)
    if key == "doubleValue":
        return _double(value)
    if not isinstance(value, _JSON_SCALARS[key]):
        raise _Reject("invalid_value", f"{key} has the wrong type")
    if isinstance(value, str) and len(value) > limits.max_value_chars:
        raise _Reject("oversize", f"an attribute value of {len(value)} characters")
    return value


def _double(value: Any) -> float | str:
    """A ``doubleValue``: a JSON number, or a string the protobuf JSON mapping allows for a double
    (a number, ``NaN``, ``Infinity``, ``-Infinity``; exporters write the names, since JSON has no
    such numbers, and a span holding one was refused as a wrong type)."""
    if isinstance(value, str) and value in _DOUBLE_NAMES:
        return value
    if isinstance(value, str) and len(value) <= 400 and _JSON_NUMBER.fullmatch(value):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Reject("invalid_value", "doubleValue must be a number, NaN, Infinity or -Infinity")
    return value if isinstance(value, int) else _finite_or_name(value)  # an integer as before: JSON has one number


def _finite_or_name(value: float) -> float | str:
    """A double as an episode can hold it: a finite one as it is, another by the protobuf JSON
    mapping's name for it (orjson would write null in its place, a value the span did not hold)."""
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"


def _signed_int(value: Any) -> int:
    """An ``intValue``: a signed 64-bit integer (a JSON number or a string of digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value < 0:
        value = str(value)
    negative = isinstance(value, str) and value.startswith("-")
    try:
        n = _json_int(value[1:] if negative else value, "intValue", _INT64_MAX + negative)
    except OtlpError:
        raise _Reject("invalid_value", "intValue must be a signed 64-bit integer") from None
    return -n if negative else n


def _values(container: dict[str, Any]) -> list[Any]:
    values = container.get("values") or []
    if not isinstance(values, list):
        raise _Reject("invalid_value", "values must be an array")
    return values


# --- spans -> episodes ------------------------------------------------------------------------

Key = tuple[str, str]


def is_genai(span: Span) -> bool:
    a = span.attrs
    return "gen_ai.operation.name" in a or "gen_ai.system" in a or "gen_ai.provider.name" in a


def convert(spans: list[Span], limits: OtlpLimits | None = None) -> Conversion:
    """Group the request's spans into episodes (see the module docstring); never raises on content."""
    limits = limits or OtlpLimits()
    by_key = {(s.trace_id, s.span_id): s for s in spans}
    tops = _top_genai(spans, by_key)
    out = Conversion()
    groups: dict[Key, list[Span]] = {}
    for s in spans:
        top = tops.get((s.trace_id, s.span_id))
        if top is None:
            out.ignored += 1
        else:
            groups.setdefault(top, []).append(s)
    for key, members in groups.items():
        root = by_key[key]
        try:
            record = build_episode(root, members, limits)
            raw = encode(record)
        except _Reject as e:
            out.rejected.append(Rejected(root.span_id, len(members), e.reason, e.detail))
        except Exception as e:  # a bug met on one span's content must not lose the request's others
            _internal_error(e)
            out.rejected.append(Rejected(root.span_id, len(members), "internal_error", type(e).__name__))
        else:
            out.records.append(record)
            out.raws.append(raw)
            out.record_spans.append(len(members))
    return out


_logged_errors: set[str] = set()


def _internal_error(e: Exception) -> None:
    """The traceback once per exception class (a bug that every request meets must not flood the
    log), one line after that; the message quoted (it may hold a sender's text)."""
    name = type(e).__name__
    frames = "" if name in _logged_errors else "\n" + "".join(traceback.format_tb(e.__traceback__))
    _logged_errors.add(name)
    log.error("OTLP: a span's episode could not be built (internal_error): %s %r%s", name, str(e)[:200], frames)


def encode(record: dict[str, Any]) -> bytes:
    """A built episode as JSON. Decoding bounds what a span holds, so this should not fail; if a
    value still cannot be written, that span's episode is refused, not the request with a 500."""
    try:
        return orjson.dumps(record)
    except orjson.JSONEncodeError as e:
        raise _Reject("invalid_value", f"the episode cannot be encoded as JSON: {str(e)[:200]}") from None


def _top_genai(spans: list[Span], by_key: dict[Key, Span]) -> dict[Key, Key | None]:
    """Each GenAI span's topmost GenAI ancestor-or-self in the request (None for other spans).

    Memoised walks up the parent links: linear in the spans, and a parent cycle (hostile input)
    ends the walk instead of looping."""
    memo: dict[Key, Key | None] = {}
    for s in spans:
        path: list[Key] = []
        on_path: set[Key] = set()
        cur: Key = (s.trace_id, s.span_id)
        while cur not in memo and cur in by_key and cur not in on_path:
            path.append(cur)
            on_path.add(cur)
            parent = by_key[cur].parent_id
            cur = (cur[0], parent) if parent else ("", "")
        base = memo.get(cur)
        for node in reversed(path):
            if base is None and is_genai(by_key[node]):
                base = node
            memo[node] = base
    return {k: (v if is_genai(by_key[k]) else None) for k, v in memo.items()}


def _operation(span: Span) -> str:
    op = span.attrs.get("gen_ai.operation.name")
    return op if isinstance(op, str) else ""


def _is_model_call(span: Span) -> bool:
    """A chat, text completion or generate_content span, or a GenAI span that names no operation
    (OpenLLMetry's model-call spans carry ``gen_ai.system`` and no ``gen_ai.operation.name``)."""
    op = _operation(span)
    return op in LLM_OPERATIONS or not op


def build_episode(root: Span, members: list[Span], limits: OtlpLimits) -> dict[str, Any]:
    """The v2 record of one top-level GenAI span and its GenAI descendants (``members`` holds both)."""
    ordered = sorted(members, key=lambda s: (s is not root, s.start_ns))
    for s in ordered:
        if s.error is not None:
            raise s.error
    top = _Call.of(root, limits)
    calls = [_Call.of(s, limits) for s in ordered[1:] if _operation(s) != "execute_tool"]
    model_calls = [c for c in calls if _is_model_call(c.span)]
    thread = _thread(model_calls, top)
    # Agent spans nested under the root (and other GenAI spans that are not model calls) are
    # merged as before; of the model calls, only those that carry the conversation.
    taken = {(c.span.trace_id, c.span.span_id): c for c in calls if not _is_model_call(c.span)}
    taken.update({(c.span.trace_id, c.span.span_id): c for c in thread})
    messages = _conversation(top, ordered, taken, limits)
    if not messages:
        raise _Reject("no_messages", "no gen_ai messages on the span or its descendants")
    record: dict[str, Any] = {
        "schema_version": 2,
        "episode_id": episode_id(root.trace_id, root.span_id),
        "metadata": _metadata(root, ordered) | _left_out(model_calls, thread, [top, *taken.values()]),
        "messages": messages,
    }
    if root.start_ns > 0:
        record["timestamp"] = root.start_ns / 1e9
    stream = _first_str(root.attrs, root.resource, keys=(STREAM_ATTRIBUTE,)) or _first_str(
        root.resource, keys=("service.name",)
    )
    if stream:
        record["stream"] = stream
    model = _model(root, thread)
    if model:
        record["model"] = model
    return record


def _conversation(top: _Call, ordered: list[Span], taken: dict[Key, _Call], limits: OtlpLimits) -> list[dict[str, Any]]:
    """The messages of the episode: the root's input first, then its descendants in start order
    (tool spans, and the calls in ``taken``), the root's answer last."""
    conv = _Conversation(limits)
    if _operation(top.span) == "execute_tool":  # a tool span whose parent is in another request
        conv.add_tool(top.span)
    else:
        conv.add_call(top, answer=False)
    for s in ordered[1:]:
        if _operation(s) == "execute_tool":
            conv.add_tool(s)
        elif (call := taken.get((s.trace_id, s.span_id))) is not None:
            conv.add_call(call, answer=True)
    # The root's answer ends the episode: what the agent returned, whichever call produced it.
    conv.add_outputs(top.answer, top.span.span_id)
    return conv.finish()


def episode_id(trace_id: str, span_id: str) -> str:
    """Stable across redeliveries of the same span: the ingest path is idempotent by it."""
    return "otlp-" + hashlib.sha256(f"{trace_id}:{span_id}".encode()).hexdigest()[:32]


def _first_str(*maps: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    for m in maps:
        for k in keys:
            v = m.get(k)
            if isinstance(v, str) and v:
                return v
    return None


def _model(root: Span, thread: list[_Call]) -> str | None:
    """The root's model, else that of the last call the conversation went on with (not of an
    auxiliary call after it: a guardrail's model did not answer)."""
    keys = ("gen_ai.response.model", "gen_ai.request.model")
    found = _first_str(root.attrs, keys=keys)
    for call in reversed(thread):
        found = found or _first_str(call.span.attrs, keys=keys)
    return found


def _metadata(root: Span, ordered: list[Span]) -> dict[str, Any]:
    meta: dict[str, Any] = {"source": "otlp", "trace_id": root.trace_id, "span_id": root.span_id}
    for key, attr in (
        ("operation", "gen_ai.operation.name"),
        ("span_name", None),
        ("agent_name", "gen_ai.agent.name"),
        ("conversation_id", "gen_ai.conversation.id"),
        ("provider", "gen_ai.provider.name"),
        ("system", "gen_ai.system"),
    ):
        value = root.name if attr is None else root.attrs.get(attr)
        if isinstance(value, str) and value:
            meta[key] = value[:256]
    meta.update(_usage(root, ordered))
    errors = sum(1 for s in ordered if _operation(s) == "execute_tool" and _failed(s))
    if errors:
        meta["tool_errors"] = errors
    return meta


def _usage(root: Span, ordered: list[Span]) -> dict[str, int]:
    """Tokens of the episode: the root's own counts when it has any (an agent span's are the
    run's totals, so adding its model calls' to them counted every token twice), else the sum
    of its model calls' (the auxiliary ones too: they were spent)."""
    own = _tokens([root])
    return own or _tokens([s for s in ordered[1:] if _is_model_call(s)])


def _tokens(spans: list[Span]) -> dict[str, int]:
    tokens = {"input_tokens": 0, "output_tokens": 0}
    for s in spans:
        for k in tokens:
            v = s.attrs.get(f"gen_ai.usage.{k}")
            if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**40:
                tokens[k] += v
    return {k: v for k, v in tokens.items() if v}


def _left_out(model_calls: list[_Call], thread: list[_Call], taken: list[_Call]) -> dict[str, int]:
    """How much of what the spans hold is not in the conversation: ``auxiliary_calls`` (model
    calls that did not continue it) and ``extra_choices`` (answers beyond the one kept, of calls
    that returned several)."""
    counts = {
        "auxiliary_calls": len(model_calls) - len(thread),
        "extra_choices": sum(len(c.choices) - 1 for c in taken if c.choices),
    }
    return {k: v for k, v in counts.items() if v}


def _failed(span: Span) -> bool:
    return span.status_code == STATUS_ERROR or "error.type" in span.attrs


# --- which model calls carry the conversation ---------------------------------------------------

_INSTRUCTION_ROLES = ("system", "developer")  # a tuple: compared, not hashed (a role may be a list)


@dataclass(eq=False, slots=True)
class _Call:
    """One span's messages, parsed once: what it was sent, and the answers (choices) it returned."""

    span: Span
    system: dict[str, Any] | None
    inputs: list[dict[str, Any]]
    #: Each choice: an assistant message and the non-assistant messages that followed it.
    choices: list[list[dict[str, Any]]]
    #: Keys of the input's messages, parallel to ``inputs``: computed once, also for the merge.
    input_keys: list[Hashable]
    #: Those keys without the instructions' (a handoff changes them): where the call stands.
    sent: list[Hashable]
    #: Keys of each choice's messages, parallel to ``choices``.
    answer_keys: list[list[Hashable]]
    #: Whether every tool call and result it holds has an id (else the merge makes some up).
    has_ids: bool
    kept: int = 0  # the choice the conversation goes on with

    @classmethod
    def of(cls, span: Span, limits: OtlpLimits) -> _Call:
        inputs = _inputs(span, limits)
        choices = _choices(_outputs(span, limits))
        keys = [_key(m) for m in inputs]
        return cls(
            span,
            _system_instructions(span, limits),
            inputs,
            choices,
            keys,
            [k for m, k in zip(inputs, keys, strict=True) if m.get("role") not in _INSTRUCTION_ROLES],
            [[_key(m) for m in choice] for choice in choices],
            not any(_lacks_ids(m) for m in inputs) and not any(_lacks_ids(m) for c in choices for m in c),
        )

    @property
    def answer(self) -> list[dict[str, Any]]:
        return self.choices[self.kept] if self.choices else []


def _choices(outputs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """A call's output messages as choices: each assistant message begins one (an ``n > 1``
    request returns one per choice); anything else belongs to the choice before it."""
    choices: list[list[dict[str, Any]]] = []
    for m in outputs:
        if m.get("role") == "assistant" or not choices:
            choices.append([m])
        else:
            choices[-1].append(m)
    return choices


def _key(m: dict[str, Any]) -> Hashable:
    return _hashable(_message_key(m))


@dataclass(slots=True)
class _Turn:
    """The model calls sent one point of the conversation: usually one; more when a call was
    retried, or when an input check was sent the user's messages as they are."""

    sent: list[Hashable]
    calls: list[_Call] = field(default_factory=list)
    #: Each answer of those calls by its first message's key, for the next call to find the one it
    #: goes on from in one look-up (a later call's answer replaces an earlier one's).
    answers: dict[Hashable, tuple[_Call, int]] = field(default_factory=dict)
    #: Each answer by the key of a result to one of its tool calls (see ``continued_by``).
    results: dict[Hashable, tuple[_Call, int]] = field(default_factory=dict)
    chosen: tuple[_Call, int] | None = None

    def add(self, call: _Call) -> None:
        self.calls.append(call)
        for j, keys in enumerate(call.answer_keys):
            prior = self.answers.get(keys[0]) if keys else None
            if keys and (prior is None or prior[0] is not call):  # of one call's equal choices, the first
                self.answers[keys[0]] = (call, j)
        for j, choice in enumerate(call.choices):
            for c in (c for m in choice for c in m.get("tool_calls") or () if isinstance(c, dict)):
                if c.get("id"):
                    self.results.setdefault(_key({"tool_call_id": c["id"]}), (call, j))

    def continued_by(self, sent: list[Hashable]) -> tuple[_Call, int] | None:
        """The answer ``sent`` goes on from: it begins with this turn's input and that answer, and
        adds to them (a call given the finished conversation to judge it continues nothing)."""
        base = len(self.sent)
        if len(sent) > base and sent[:base] == self.sent and (hit := self.answers.get(sent[base])) is not None:
            answer = hit[0].answer_keys[hit[1]]
            end = base + len(answer)
            if len(sent) > end and sent[base:end] == answer:
                return hit
        # A call to a stateful API (the Responses API's previous_response_id) is sent only what
        # follows the answer: the results of its tool calls.
        return self.results.get(sent[0]) if sent else None

    def settle(self, final: Hashable | None) -> _Call:
        """The call this turn keeps, its ``kept`` choice set: the one the next turn went on from;
        for the last turn, the one whose answer the root returned, else the latest that answered
        (a retry supersedes the try before it)."""
        if self.chosen is None and final is not None:
            self.chosen = self.answers.get(final)
        if self.chosen is None:
            answered = [c for c in self.calls if c.choices] or self.calls
            self.chosen = (answered[-1], 0)
        call, choice = self.chosen
        call.kept = choice
        return call


def _thread(calls: list[_Call], top: _Call) -> list[_Call]:
    """The model calls that carry the conversation, in order, each with the choice it went on
    with; the others (an output guardrail, a classifier, a title or summary call) are auxiliary.

    The first call to carry it is the first whose input begins with the root's (an agent span's
    input is the conversation it was given). Were none to (the root's input written otherwise
    than its calls' inputs), the first call begins it instead: the root's input is not worth the
    whole conversation. Then a call carries it when it continues the last carrying call's input
    and answer (``_Turn.continued_by``), or was sent exactly that last call's input (a retry);
    anything else is left out, so a classifier run on the answer no longer becomes the final turn."""
    if not any(call.sent for call in calls):
        # Spans that record only what each call answered say nothing of what it was sent: nothing
        # to tell a continuation from a guardrail by, so every call carries the conversation (a
        # retry test on their empty inputs kept the first call and dropped the others' answers).
        return calls
    final = top.answer_keys[0][0] if top.answer_keys and top.answer_keys[0] else None
    turns = _turns(calls, top.sent) or (_turns(calls, []) if top.sent else [])
    return [turn.settle(final if turn is turns[-1] else None) for turn in turns]


def _turns(calls: list[_Call], anchor: list[Hashable]) -> list[_Turn]:
    turns: list[_Turn] = []
    for call in calls:
        if not turns:
            if call.sent[: len(anchor)] == anchor:
                turns.append(_Turn(call.sent))
                turns[-1].add(call)
            continue
        last = turns[-1]
        hit = last.continued_by(call.sent)
        if hit is not None:
            last.chosen = hit
            turns.append(_Turn(call.sent))
            turns[-1].add(call)
        elif call.sent and call.sent == last.sent:  # a retry: the same input again
            last.add(call)
    return turns


# --- messages ---------------------------------------------------------------------------------

_ROLE_ALIASES = {"model": "assistant", "human": "user", "ai": "assistant"}  # Gemini, LangChain
# Reasoning written as a message of its own (OpenLLMetry's Anthropic instrumentation writes extended
# thinking as a completion with role ``thinking`` before the answer): not a turn of the conversation.
_REASONING_ROLES = frozenset({"thinking", "reasoning"})
_EVENT_ROLES = {
    "gen_ai.system.message": "system",
    "gen_ai.user.message": "user",
    "gen_ai.assistant.message": "assistant",
    "gen_ai.tool.message": "tool",
}


def _message_key(m: dict[str, Any]) -> tuple[Any, ...]:
    """What makes two renderings of one message the same message: a tool result by its call id,
    an assistant tool call by its call ids, anything else by role and text. Calls sent without
    ids are known by their names and arguments (the ids made up for them differ from span to
    span), results without ids by their text."""
    if m.get("tool_call_id"):
        return ("tool", m["tool_call_id"])
    calls = m.get("tool_calls")
    if calls and _lacks_call_ids(m):
        return (m.get("role"), m.get("content"), tuple(_call_signature(c) for c in calls))
    if calls:
        return (m.get("role"), tuple(c.get("id") for c in calls))
    return (m.get("role"), m.get("content"))


def _lacks_call_ids(m: dict[str, Any]) -> bool:
    return any(c.get("id") in (None, "") for c in m.get("tool_calls") or ())


def _lacks_ids(m: dict[str, Any]) -> bool:
    return _lacks_call_ids(m) or (m.get("role") == "tool" and not m.get("tool_call_id"))


def _call_signature(c: dict[str, Any]) -> tuple[Any, Any]:
    fn = c.get("function") or {}
    return (fn.get("name"), fn.get("arguments"))


class _OpenCalls:
    """Tool calls not answered yet, oldest first, also by function name. An answered call is
    only marked, and dropped when it reaches the front: linear however many calls and results."""

    def __init__(self) -> None:
        self.order: deque[str] = deque()
        self.by_name: dict[str, deque[str]] = {}
        self.answered: set[str] = set()

    def add(self, call: dict[str, Any]) -> None:
        call_id, name = call.get("id"), (call.get("function") or {}).get("name")
        if isinstance(call_id, str) and call_id:
            self.order.append(call_id)
            if isinstance(name, str):
                self.by_name.setdefault(name, deque()).append(call_id)

    def answer(self, call_id: Any) -> None:
        if isinstance(call_id, str):
            self.answered.add(call_id)

    def oldest(self) -> str | None:
        return self._front(self.order)

    def oldest_named(self, name: Any) -> str | None:
        return self._front(self.by_name.get(name)) if isinstance(name, str) else None

    def _front(self, queue: deque[str] | None) -> str | None:
        while queue and queue[0] in self.answered:
            queue.popleft()
        return queue[0] if queue else None


class _Conversation:
    """Messages gathered from the spans of one episode, each message once.

    Linear in what the spans hold: a dict finds where a repeated message sits (one export of
    10,000 model-call spans took 34 s of the event loop with a list searched per span), and a
    conversation past the validation's message limit is refused here, since it would be anyway."""

    def __init__(self, limits: OtlpLimits):
        self.limits = limits
        self.messages: list[dict[str, Any]] = []
        self.positions: dict[Hashable, list[int]] = {}  # message key -> its indices, ascending
        self.call_ids: set[Any] = set()  # tool calls made
        self.result_ids: set[Any] = set()  # tool calls answered
        self.open = _OpenCalls()  # what an execute_tool span without a call id answers
        self.made_up = 0  # ids made up for tool calls sent without one

    def append(self, m: dict[str, Any], key: Hashable | None = None, alias: Hashable | None = None) -> None:
        """``key``: ``m``'s, when known; ``alias``: the key a call message had before ids were made
        up for it, which its other renderings (without ids) still have."""
        if len(self.messages) >= MAX_MESSAGES:
            raise _Reject("too_many_messages", f"more than {MAX_MESSAGES} messages on the span and its descendants")
        key = _key(m) if key is None else key
        for k in [key] if alias is None else [key, alias]:
            self.positions.setdefault(k, []).append(len(self.messages))
        self.messages.append(m)
        # Ids come from the span's own JSON: a list or an object is possible, and must not raise.
        for c in m.get("tool_calls") or ():
            if isinstance(c, dict):
                self.call_ids.add(_hashable(c.get("id")))
                self.open.add(c)
        if m.get("tool_call_id"):
            self.result_ids.add(_hashable(m["tool_call_id"]))
            self.open.answer(m["tool_call_id"])

    def add_call(self, call: _Call, *, answer: bool) -> None:
        span_id = call.span.span_id
        if call.system is not None:
            self.add_inputs([call.system], span_id)
        self.add_inputs(call.inputs, span_id, call.input_keys if call.has_ids else None)
        if answer:
            self.add_outputs(call.answer, span_id)

    def add_inputs(self, inputs: list[dict[str, Any]], span_id: str, keys: list[Hashable] | None = None) -> None:
        """``keys``: the inputs' keys, when no ids are to be made up for them (the inputs of a long
        agent run are most of what its spans hold: their keys are computed once)."""
        # A model call's input repeats the conversation so far: keep what is new, matching the
        # messages already here in order (a repeated "yes" later in the conversation stays).
        pos = 0
        for m, key, alias in self.keyed(inputs, span_id, keys):
            at = self.positions.get(key, [])
            i = bisect.bisect_left(at, pos)
            if i < len(at):
                pos = at[i] + 1
            else:
                self.append(m, key, alias)
                pos = len(self.messages)

    def keyed(
        self, msgs: list[dict[str, Any]], span_id: str, keys: list[Hashable] | None
    ) -> Iterable[tuple[dict[str, Any], Hashable, Hashable | None]]:
        if keys is not None:
            return zip(msgs, keys, itertools.repeat(None))
        return [(m, _key(m), alias) for m, alias in self.with_ids(msgs, span_id, shown_before=True)]

    def add_outputs(self, outputs: list[dict[str, Any]], span_id: str) -> None:
        # An answer is new (the same call made again is another call, with ids of its own) unless
        # it repeats the last message: the root returns what its last model call answered.
        for m, alias in self.with_ids(outputs, span_id, shown_before=False):
            if not self.is_last(_key(m) if alias is None else alias):
                self.append(m, alias=alias)

    def is_last(self, key: Hashable) -> bool:
        at = self.positions.get(key)
        return at is not None and at[-1] == len(self.messages) - 1

    def with_ids(
        self, msgs: list[dict[str, Any]], span_id: str, *, shown_before: bool
    ) -> list[tuple[dict[str, Any], Hashable | None]]:
        """Each message with ids for its tool calls and results that came without one (the GenAI
        conventions make them optional), and the key it had before (see ``append``). With
        ``shown_before`` (an input: the conversation so far), a call message already here takes
        the ids it got then (the k-th such message of ``msgs`` is the k-th here); otherwise, and
        for a new one, ids are made up: ``call_<span id>_<n>``. A result without an id answers a
        call of the latest call message before it in ``msgs``: the first of its name, else the
        first not yet answered there."""
        seen: dict[Hashable, int] = {}
        pending = _OpenCalls()
        out: list[tuple[dict[str, Any], Hashable | None]] = []
        for m in msgs:
            alias = _key(m) if m.get("tool_calls") and _lacks_call_ids(m) else None
            if alias is not None:
                seen[alias] = seen.get(alias, 0) + 1
                filled = self.ided(m, alias, seen[alias] - 1 if shown_before else -1, span_id)
            else:
                filled = _answering(m, pending) if m.get("role") == "tool" else m
            if filled.get("tool_calls"):
                pending = _OpenCalls()  # results answer the latest call message before them
                for c in filled["tool_calls"]:
                    pending.add(c)
            out.append((filled, alias))
        return out

    def ided(self, m: dict[str, Any], alias: Hashable, k: int, span_id: str) -> dict[str, Any]:
        """``m`` with the ids of the k-th call message like it here (-1: none), else made up."""
        at = self.positions.get(alias, [])
        if 0 <= k < len(at):
            return {**m, "tool_calls": self.messages[at[k]]["tool_calls"]}
        return {**m, "tool_calls": [self.made_up_id(c, span_id) for c in m["tool_calls"]]}

    def made_up_id(self, call: dict[str, Any], span_id: str) -> dict[str, Any]:
        if call.get("id") not in (None, ""):
            return call
        self.made_up += 1  # counted over the episode: unique, and the same for the same spans
        return {**call, "id": f"call_{span_id}_{self.made_up}"}

    def add_tool(self, span: Span) -> None:
        a = span.attrs
        name = a.get("gen_ai.tool.name")
        name = name if isinstance(name, str) else span.name
        call_id = self.tool_call_id(span, name)
        if call_id not in self.call_ids:
            call = {
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": _text_of(a.get("gen_ai.tool.call.arguments", ""))},
            }
            self.append({"role": "assistant", "content": None, "tool_calls": [call]})
        if call_id in self.result_ids:
            return
        result = a.get("gen_ai.tool.call.result")
        if result is None and _failed(span):
            result = f"error: {a.get('error.type') or 'tool call failed'}"
        self.append({"role": "tool", "tool_call_id": call_id, "content": _text_of(result or "")})

    def tool_call_id(self, span: Span, name: str) -> str:
        """The call an execute_tool span runs: the one its ``gen_ai.tool.call.id`` names; without
        one, the oldest call of that tool the model made and nothing answered yet (a made-up id
        would show the call, and its result, twice); else a new one, ``call_<span id>``."""
        given = span.attrs.get("gen_ai.tool.call.id")
        if isinstance(given, str) and given:
            return given
        return self.open.oldest_named(name) or f"call_{span.span_id}"

    def finish(self) -> list[dict[str, Any]]:
        # Instructions first whatever span carried them (an agent's may come after the user's turn).
        system = [m for m in self.messages if m.get("role") == "system"]
        return system + [m for m in self.messages if m.get("role") != "system"]


def _answering(m: dict[str, Any], pending: _OpenCalls) -> dict[str, Any]:
    """A tool result, with the call it answers when it came without an id (see ``with_ids``)."""
    if m.get("tool_call_id"):
        pending.answer(m["tool_call_id"])
        return m
    call_id = pending.oldest_named(m.get("name")) or pending.oldest()
    if call_id is None:
        return m  # nothing to answer: validation names it
    pending.answer(call_id)
    return {**m, "tool_call_id": call_id}


def _hashable(value: Any) -> Hashable:
    """A message key or an id as a dict key or set member: itself, or (content given as parts, an
    id that is a list or an object) its JSON."""
    try:
        hash(value)
    except TypeError:
        try:
            return orjson.dumps(value, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
        except orjson.JSONEncodeError:
            return repr(value)
    return cast(Hashable, value)


def _text_of(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
    except orjson.JSONEncodeError as e:
        raise _Reject("invalid_value", f"a value cannot be written as JSON: {str(e)[:200]}") from None


def _json_attr(value: Any, limits: OtlpLimits) -> Any:
    """A messages attribute: a JSON string (how most SDKs record it) or a structured value."""
    if not isinstance(value, str):
        return value
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as e:
        reason = "too_deep" if "recursion" in str(e).lower() else "invalid_json"
        raise _Reject(reason, f"a gen_ai messages attribute is not JSON: {str(e)[:100]}") from None
    if _too_deep(doc, limits.max_depth):
        raise _Reject("too_deep", f"a gen_ai messages attribute nests deeper than {limits.max_depth} levels")
    return doc


def _too_deep(doc: Any, limit: int) -> bool:
    level, depth = [doc], 0
    while level:
        depth += 1
        if depth > limit:
            return True
        level = [
            v
            for node in level
            if isinstance(node, dict | list)
            for v in (node.values() if isinstance(node, dict) else node)
            if isinstance(v, dict | list)
        ]
    return False


def _messages(value: Any, limits: OtlpLimits, default_role: str) -> list[dict[str, Any]]:
    doc = _json_attr(value, limits)
    if isinstance(doc, dict):
        doc = [doc]
    if not isinstance(doc, list):
        raise _Reject("invalid_value", "gen_ai messages must be a JSON array of messages")
    out: list[dict[str, Any]] = []
    for m in doc:
        out.extend(_normalise(m, default_role, limits))
    return out


def _normalise(m: Any, default_role: str, limits: OtlpLimits) -> list[dict[str, Any]]:
    """One GenAI-convention message (``parts``) or OpenAI chat message -> OpenAI chat messages."""
    if isinstance(m, str):
        return [{"role": default_role, "content": m}]
    if not isinstance(m, dict):
        raise _Reject("invalid_value", "a gen_ai message must be an object")
    role = m.get("role") or default_role
    role = _ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
    if isinstance(role, str) and role in _REASONING_ROLES:
        return []
    if isinstance(m.get("parts"), list):
        return _from_parts(role, m["parts"])
    blocks = _anthropic_blocks(role, m.get("content"), limits)
    if blocks is not None:
        return _from_blocks(role, blocks, m.get("tool_calls"))
    msg: dict[str, Any] = {"role": role, "content": _content(m.get("content"))}
    if isinstance(m.get("tool_calls"), list) and m["tool_calls"]:
        msg["tool_calls"] = [_tool_call(c) for c in m["tool_calls"]]
    tool_call_id = m.get("tool_call_id", m.get("id"))
    if role == "tool" and tool_call_id is not None:
        msg["tool_call_id"] = tool_call_id
    return [msg]


def _content(content: Any) -> Any:
    if isinstance(content, list):  # OpenAI parts or GenAI parts: their text, placeholders for media
        texts = [_part_text(p) for p in content]
        return "\n".join(t for t in texts if t is not None)
    if content is None or isinstance(content, str):
        return content
    return _text_of(content)


# Media parts read as schema v2 reads OpenAI's (``PLACEHOLDERS``): the GenAI conventions' blob, uri
# and file parts by their modality (a video, or none named, is a file), Anthropic's blocks by type.
_MEDIA_PARTS = frozenset({"blob", "uri", "file"})
_MODALITY_PLACEHOLDERS = {"image": PLACEHOLDERS["image_url"], "audio": PLACEHOLDERS["input_audio"]}
_BLOCK_PLACEHOLDERS = {**PLACEHOLDERS, "image": PLACEHOLDERS["image_url"], "document": PLACEHOLDERS["file"]}
_REASONING_PARTS = frozenset({"reasoning", "thinking", "redacted_thinking"})


def _part_text(p: Any) -> str | None:
    """A content part as text: a placeholder for media (first: a GenAI blob part's ``content`` is
    its base64 data), else its text; None for reasoning (not what was said) and for a part
    without text."""
    kind = p.get("type") if isinstance(p, dict) else None
    if not isinstance(kind, str) or kind in _REASONING_PARTS:
        return None
    placeholder = _placeholder(kind, p.get("modality"))
    if placeholder is not None:
        return placeholder
    text = p.get("text", p.get("content"))
    return text if isinstance(text, str) else None


def _placeholder(kind: str, modality: Any) -> str | None:
    if kind not in _MEDIA_PARTS:
        return _BLOCK_PLACEHOLDERS.get(kind)
    named = _MODALITY_PLACEHOLDERS.get(modality) if isinstance(modality, str) else None
    return named or PLACEHOLDERS["file"]


def _tool_call(c: Any) -> dict[str, Any]:
    if not isinstance(c, dict):
        raise _Reject("invalid_value", "a tool call must be an object")
    fn: dict[str, Any] = c["function"] if isinstance(c.get("function"), dict) else c
    args = fn.get("arguments", "")
    return {
        "id": c.get("id"),  # None when the sender gave none: _Conversation.with_ids makes one up
        "type": "function",
        "function": {"name": fn.get("name"), "arguments": _text_of(args if args is not None else "")},
    }


def _from_parts(role: Any, parts: list[Any]) -> list[dict[str, Any]]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for p in parts:
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "tool_call":
            calls.append(_tool_call(p))
        elif kind == "tool_call_response":
            results.append({"role": "tool", "tool_call_id": p.get("id"), "content": _text_of(_response(p))})
        elif kind == "text":
            if isinstance(p.get("content"), str):
                texts.append(p["content"])
        elif isinstance(kind, str) and (placeholder := _placeholder(kind, p.get("modality"))) is not None:
            texts.append(placeholder)  # a reasoning part, or one of a type unknown here, is left out
    out: list[dict[str, Any]] = []
    if texts or calls or not results:
        out.append(_message(role, texts, calls))
    return out + results


def _response(part: dict[str, Any]) -> Any:
    """A tool_call_response part's result: ``response`` in the conventions, ``result`` in a draft
    of their JSON schema that instrumentations still write."""
    return part["response"] if "response" in part else part.get("result", "")


def _message(role: Any, texts: list[str], calls: list[dict[str, Any]]) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": role, "content": "\n".join(texts) if texts else None}
    if calls:
        msg["tool_calls"] = calls
    return msg


# --- Anthropic content blocks (OpenLLMetry writes a message's blocks as a JSON string) -----------

_BLOCK_MEDIA = frozenset({"image", "document", "image_url"})
_RESULT_BLOCKS = ("text", "image", "document", "image_url")  # a tuple: compared, not hashed (a type may be a list)


def _anthropic_blocks(role: Any, content: Any, limits: OtlpLimits) -> list[dict[str, Any]] | None:
    """``content`` as a list of Anthropic content blocks, when it is one (or a JSON string of one):
    every block a known type with its fields, tool_use only from the assistant and tool_result
    only from the user, as the Messages API has them. Anything else is None and stays text, and
    so does a list of text blocks only: the instrumentation joins those itself, so such a string
    is text someone wrote."""
    if isinstance(content, str):
        content = _json_list(content, limits)
    if not isinstance(content, list) or not content:
        return None
    if not all(_is_block(b, role) for b in content) or all(b["type"] == "text" for b in content):
        return None
    return content


def _json_list(text: str, limits: OtlpLimits) -> list[Any] | None:
    if not text.lstrip().startswith("["):
        return None
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, list) and not _too_deep(doc, limits.max_depth) else None


def _is_block(b: Any, role: object) -> bool:
    kind = b.get("type") if isinstance(b, dict) else None
    if kind == "text":
        return isinstance(b.get("text"), str)
    if kind == "tool_use":
        return role == "assistant" and _label(b.get("id")) and _label(b.get("name")) and "input" in b
    if kind == "tool_result":
        return (
            role == "user"
            and _label(b.get("tool_use_id"))
            and isinstance(b.get("is_error", False), bool)
            and _is_result_content(b.get("content"))
        )
    if kind in ("thinking", "redacted_thinking"):
        return role == "assistant"
    return isinstance(kind, str) and kind in _BLOCK_MEDIA


def _label(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _is_result_content(content: Any) -> bool:
    if content is None or isinstance(content, str):
        return True
    # Text and media only: a tool_result inside a tool_result is no Messages API shape.
    return isinstance(content, list) and all(
        isinstance(b, dict) and b.get("type") in _RESULT_BLOCKS and _is_block(b, "user") for b in content
    )


def _from_blocks(role: Any, blocks: list[dict[str, Any]], listed: Any) -> list[dict[str, Any]]:
    """Anthropic blocks -> OpenAI chat messages: each tool_result a ``tool`` message (first: they
    answer the calls of the assistant message before; the Messages API puts them first too; an
    ``is_error`` result keeps its text, schema v2 has no flag for it), tool_use blocks the
    assistant's tool calls (after those the span also lists as ``tool_calls``, by id, which they
    repeat), text blocks its text; thinking left out."""
    texts: list[str] = []
    calls = [_tool_call(c) for c in listed] if isinstance(listed, list) else []
    known = {c["id"] for c in calls if isinstance(c["id"], str)}
    results: list[dict[str, Any]] = []
    for b in blocks:
        if b["type"] == "tool_use" and b["id"] not in known:
            calls.append(
                {"id": b["id"], "type": "function", "function": {"name": b["name"], "arguments": _text_of(b["input"])}}
            )
        elif b["type"] == "tool_result":
            results.append(
                {"role": "tool", "tool_call_id": b["tool_use_id"], "content": _result_text(b.get("content"))}
            )
        elif (text := _part_text(b)) is not None:
            texts.append(text)
    return results + ([_message(role, texts, calls)] if texts or calls or not results else [])


def _result_text(content: Any) -> str:
    if isinstance(content, list):
        return "\n".join(t for t in map(_part_text, content) if t is not None)
    return content if isinstance(content, str) else ""


def _system_instructions(span: Span, limits: OtlpLimits) -> dict[str, Any] | None:
    value = span.attrs.get("gen_ai.system_instructions")
    if value is None:
        return None
    is_json = isinstance(value, str) and value.lstrip()[:1] in ("[", "{")
    doc = _json_attr(value, limits) if is_json else value
    if isinstance(doc, dict):  # one part
        doc = [doc]
    return {"role": "system", "content": _content(doc)}


def _inputs(span: Span, limits: OtlpLimits) -> list[dict[str, Any]]:
    a = span.attrs
    if "gen_ai.input.messages" in a:
        return _messages(a["gen_ai.input.messages"], limits, "user")
    out: list[dict[str, Any]] = []
    for name, attrs in span.events:
        if name == "gen_ai.client.inference.operation.details" and "gen_ai.input.messages" in attrs:
            out.extend(_messages(attrs["gen_ai.input.messages"], limits, "user"))
        elif name in _EVENT_ROLES:
            out.extend(_normalise({**attrs, "role": attrs.get("role") or _EVENT_ROLES[name]}, "user", limits))
        elif name == "gen_ai.content.prompt" and "gen_ai.prompt" in attrs:
            out.extend(_legacy(attrs["gen_ai.prompt"], limits, "user"))
    if out:
        return out
    if "gen_ai.prompt" in a:
        return _legacy(a["gen_ai.prompt"], limits, "user")
    return _flattened(a, "prompt", limits)


def _outputs(span: Span, limits: OtlpLimits) -> list[dict[str, Any]]:
    a = span.attrs
    if "gen_ai.output.messages" in a:
        return _messages(a["gen_ai.output.messages"], limits, "assistant")
    out: list[dict[str, Any]] = []
    for name, attrs in span.events:
        if name == "gen_ai.client.inference.operation.details" and "gen_ai.output.messages" in attrs:
            out.extend(_messages(attrs["gen_ai.output.messages"], limits, "assistant"))
        elif name == "gen_ai.choice":
            message = attrs.get("message", {"content": attrs.get("content")})
            out.extend(_messages(message, limits, "assistant"))
        elif name == "gen_ai.content.completion" and "gen_ai.completion" in attrs:
            out.extend(_legacy(attrs["gen_ai.completion"], limits, "assistant"))
    if out:
        return out
    if "gen_ai.completion" in a:
        return _legacy(a["gen_ai.completion"], limits, "assistant")
    return _flattened(a, "completion", limits)


def _legacy(value: Any, limits: OtlpLimits, role: str) -> list[dict[str, Any]]:
    """``gen_ai.prompt`` / ``gen_ai.completion``: JSON messages, or the bare text of one message."""
    if isinstance(value, str) and value.lstrip()[:1] not in ("[", "{"):
        return [{"role": role, "content": value}]
    return _messages(value, limits, role)


def _flattened(attrs: dict[str, Any], kind: str, limits: OtlpLimits) -> list[dict[str, Any]]:
    """OpenLLMetry's ``gen_ai.prompt.0.role`` / ``.content`` / ``.tool_calls.0.name`` ... flattening."""
    found: dict[int, dict[str, Any]] = {}
    # Tool calls apart from the message's fields: those are named by the sender, so a working key
    # among them (an attribute ``gen_ai.prompt.0._calls``) was overwritten by its value, a 500.
    calls: dict[int, dict[int, dict[str, Any]]] = {}
    for key, value in attrs.items():
        m = _FLAT.match(key)
        if m is None or m.group(1) != kind:
            continue
        index = int(m.group(2))
        msg = found.setdefault(index, {})
        rest = m.group(3)
        tool = _FLAT_TOOL.match(rest)
        if tool is not None:
            calls.setdefault(index, {}).setdefault(int(tool.group(1)), {})[tool.group(2)] = value
        else:
            msg[rest] = value
    out: list[dict[str, Any]] = []
    for index, msg in sorted(found.items()):
        if index in calls:
            msg["tool_calls"] = [c for _, c in sorted(calls[index].items())]
        out.extend(_normalise(msg, "user" if kind == "prompt" else "assistant", limits))
    return out


def iter_reasons(conv: Conversion, limit: int = 10) -> Iterator[str]:
    """The first rejects, as short lines for partial_success.error_message."""
    for r in conv.rejected[:limit]:
        yield f"span {r.span_id}: {r.reason}: {r.detail[:200]}"
