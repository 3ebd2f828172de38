"""The OTLP/HTTP traces receiver: the real opentelemetry-sdk exporter sending to it in uvicorn, the
JSON encoding, and hostile requests (each a 4xx or a per-span reason, never a 500).

The app here is the router alone with a ``submit`` that validates each record as the pipeline does
(``parse_episode``) and keeps the valid ones; ``test_ingest_*`` go through the ingest app itself.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI, Request
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import CollectorRegistry

from monitor.config import Settings, load_settings
from monitor.episodes import MAX_MESSAGES, InvalidEpisode, parse_episode
from monitor.ingest.otlp import OtlpLimits, Span, convert, episode_id
from monitor.ingest.otlp_route import JSON, OtlpMetrics, otlp_router
from monitor.ingest.server import IngestServer
from monitor.ingest.tokens import add_token
from monitor.pipeline import LoopHooks
from monitor.review.server import BackgroundServer
from monitor.service import build_service
from monitor.store import Store

LIMITS = OtlpLimits(max_body_bytes=1 << 20, max_spans=200, max_value_chars=64_000, max_depth=8)


class Receiver:
    """Valid records by episode id, and every reason given, as the ingest app's validation would."""

    def __init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}
        self.reasons: list[str] = []
        self.lock = threading.Lock()

    def submit(self, request: Request, raws: list[bytes]) -> Sequence[str | None]:
        out: list[str | None] = []
        for raw in raws:
            try:
                ep = parse_episode(raw, 1 << 20, time.time())
            except InvalidEpisode as e:
                out.append(f"{e.reason}: {e.detail}")
                continue
            with self.lock:
                self.records[ep.episode_id] = json.loads(raw)
            out.append(None)
        self.reasons.extend(r for r in out if r)
        return out


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, Receiver, CollectorRegistry]]:
    receiver = Receiver()
    registry = CollectorRegistry()
    app = FastAPI()
    app.include_router(otlp_router(receiver.submit, limits=LIMITS, metrics=OtlpMetrics(registry)))
    srv = BackgroundServer(app, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{srv.port}", receiver, registry
    finally:
        srv.stop()


def spans_metric(registry: CollectorRegistry, outcome: str) -> float:
    return registry.get_sample_value("oversight_otlp_spans_total", {"outcome": outcome}) or 0.0


def _messages(*msgs: tuple[str, list[dict[str, Any]]]) -> str:
    return json.dumps([{"role": role, "parts": parts} for role, parts in msgs])


def _text(s: str) -> dict[str, Any]:
    return {"type": "text", "content": s}


# --- the real SDK and its OTLP/HTTP protobuf exporter ---------------------------------------


def _emit_with_sdk(url: str, headers: dict[str, str] | None = None) -> tuple[str, str]:
    """A chat span, an agent with an LLM call, a tool call and a final LLM call, and a non-GenAI
    span, exported by the SDK's BatchSpanProcessor (one flush: one request)."""
    provider = TracerProvider(resource=Resource.create({"service.name": "shop-assistant"}))
    exporter = OTLPSpanExporter(endpoint=f"{url}/v1/traces", headers=headers)
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=60_000))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("GET /healthz"):
        pass
    with tracer.start_as_current_span("chat gpt-4o") as chat:
        chat.set_attribute("gen_ai.operation.name", "chat")
        chat.set_attribute("gen_ai.request.model", "gpt-4o")
        chat.set_attribute("gen_ai.response.model", "gpt-4o-2024-08-06")
        chat.set_attribute("gen_ai.system_instructions", json.dumps([_text("Be brief.")]))
        chat.set_attribute("gen_ai.input.messages", _messages(("user", [_text("Capital of France?")])))
        chat.set_attribute("gen_ai.output.messages", _messages(("assistant", [_text("Paris.")])))
        chat_ctx = chat.get_span_context()
    with tracer.start_as_current_span("invoke_agent shopper") as agent:
        agent.set_attribute("gen_ai.operation.name", "invoke_agent")
        agent.set_attribute("gen_ai.agent.name", "shopper")
        agent.set_attribute("oversight.stream", "agents")
        agent.set_attribute("gen_ai.input.messages", _messages(("user", [_text("Is the red mug in stock?")])))
        agent_ctx = agent.get_span_context()
        call = {"type": "tool_call", "id": "call_7", "name": "stock", "arguments": {"sku": "mug-red"}}
        with tracer.start_as_current_span("chat small") as llm:
            llm.set_attribute("gen_ai.operation.name", "chat")
            llm.set_attribute("gen_ai.request.model", "small-1")
            llm.set_attribute("gen_ai.input.messages", _messages(("user", [_text("Is the red mug in stock?")])))
            llm.set_attribute("gen_ai.output.messages", _messages(("assistant", [call])))
        with tracer.start_as_current_span("execute_tool stock") as tool:
            tool.set_attribute("gen_ai.operation.name", "execute_tool")
            tool.set_attribute("gen_ai.tool.name", "stock")
            tool.set_attribute("gen_ai.tool.call.id", "call_7")
            tool.set_attribute("gen_ai.tool.call.arguments", '{"sku": "mug-red"}')
            tool.set_attribute("gen_ai.tool.call.result", '{"in_stock": 3}')
        with tracer.start_as_current_span("chat small") as llm2:
            llm2.set_attribute("gen_ai.operation.name", "chat")
            llm2.set_attribute("gen_ai.request.model", "small-1")
            llm2.set_attribute(
                "gen_ai.input.messages",
                _messages(
                    ("user", [_text("Is the red mug in stock?")]),
                    ("assistant", [call]),
                    ("tool", [{"type": "tool_call_response", "id": "call_7", "response": '{"in_stock": 3}'}]),
                ),
            )
            llm2.set_attribute("gen_ai.output.messages", _messages(("assistant", [_text("Yes, 3 left.")])))
        agent.set_attribute("gen_ai.output.messages", _messages(("assistant", [_text("Yes, 3 left.")])))
    assert provider.force_flush(30_000)
    provider.shutdown()
    return (
        episode_id(f"{chat_ctx.trace_id:032x}", f"{chat_ctx.span_id:016x}"),
        episode_id(f"{agent_ctx.trace_id:032x}", f"{agent_ctx.span_id:016x}"),
    )


def test_sdk_exporter_round_trip(server: tuple[str, Receiver, CollectorRegistry]) -> None:
    url, receiver, registry = server
    ignored_before = spans_metric(registry, "ignored")
    chat_id, agent_id = _emit_with_sdk(url)

    chat = receiver.records[chat_id]
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    assert chat["model"] == "gpt-4o-2024-08-06"
    assert chat["stream"] == "shop-assistant"  # service.name when no oversight.stream
    assert chat["metadata"]["operation"] == "chat"

    agent = receiver.records[agent_id]
    assert agent["stream"] == "agents"
    assert agent["model"] == "small-1"  # the agent span names none: its last model call's
    assert agent["metadata"]["agent_name"] == "shopper"
    assert agent["messages"] == [
        {"role": "user", "content": "Is the red mug in stock?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_7", "type": "function", "function": {"name": "stock", "arguments": '{"sku":"mug-red"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_7", "content": '{"in_stock": 3}'},
        {"role": "assistant", "content": "Yes, 3 left."},
    ]
    assert spans_metric(registry, "ignored") == ignored_before + 1  # GET /healthz
    assert spans_metric(registry, "episode") >= 5


# --- the JSON encoding --------------------------------------------------------------------------


def _kv(key: str, value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"key": key, "value": {"boolValue": value}}
    if isinstance(value, int):
        return {"key": key, "value": {"intValue": str(value)}}
    return {"key": key, "value": {"stringValue": value}}


def _json_request(spans: list[dict[str, Any]], service: str = "svc") -> dict[str, Any]:
    return {
        "resourceSpans": [
            {
                "resource": {"attributes": [_kv("service.name", service)]},
                "scopeSpans": [{"scope": {"name": "t"}, "spans": spans}],
            }
        ]
    }


def _json_span(span_id: str, attrs: dict[str, Any], parent: str = "", **extra: Any) -> dict[str, Any]:
    return {
        "traceId": "5b8efff798038103d269b633813fc60c",
        "spanId": span_id,
        "parentSpanId": parent,
        "name": "span",
        "startTimeUnixNano": "1767225600000000000",
        "attributes": [_kv(k, v) for k, v in attrs.items()],
        **extra,
    }


def test_json_encoding_with_openllmetry_attributes_and_legacy_events(
    server: tuple[str, Receiver, CollectorRegistry],
) -> None:
    url, receiver, _ = server
    flat = _json_span(
        "eee19b7ec3c1b174",
        {
            "gen_ai.system": "openai",
            "gen_ai.request.model": "gpt-3.5-turbo",
            "gen_ai.prompt.0.role": "user",
            "gen_ai.prompt.0.content": "Say hi",
            "gen_ai.completion.0.role": "assistant",
            "gen_ai.completion.0.content": "hi",
            "gen_ai.usage.input_tokens": 3,
        },
    )
    events = _json_span(
        "eee19b7ec3c1b175",
        {"gen_ai.operation.name": "chat"},
        events=[
            {"name": "gen_ai.system.message", "attributes": [_kv("content", "No jokes.")]},
            {"name": "gen_ai.user.message", "attributes": [_kv("content", "Tell a joke")]},
            {"name": "gen_ai.choice", "attributes": [_kv("message", '{"role":"assistant","content":"No."}')]},
        ],
    )
    r = httpx.post(f"{url}/v1/traces", json=_json_request([flat, events], service="legacy-app"))
    assert r.status_code == 200, r.text
    assert r.json() == {}  # no partial_success: every span made it
    a = receiver.records[episode_id("5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b174")]
    assert a["messages"] == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]
    assert a["model"] == "gpt-3.5-turbo"
    assert a["stream"] == "legacy-app"
    assert a["timestamp"] == 1767225600.0
    assert a["metadata"]["input_tokens"] == 3
    b = receiver.records[episode_id("5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b175")]
    assert b["messages"] == [
        {"role": "system", "content": "No jokes."},
        {"role": "user", "content": "Tell a joke"},
        {"role": "assistant", "content": "No."},
    ]


def test_invalid_episode_is_a_partial_success_with_the_validation_reason(
    server: tuple[str, Receiver, CollectorRegistry],
) -> None:
    url, _, registry = server
    before = spans_metric(registry, "rejected")
    # Its last message is the user's: the v2 validation refuses it, the receiver says which span and why.
    only_input = _json_span("aaa19b7ec3c1b174", {"gen_ai.operation.name": "chat", "gen_ai.prompt.0.content": "hi"})
    r = httpx.post(f"{url}/v1/traces", json=_json_request([only_input]))
    assert r.status_code == 200
    partial = r.json()["partialSuccess"]
    assert partial["rejectedSpans"] == "1"
    assert "aaa19b7ec3c1b174" in partial["errorMessage"]
    assert spans_metric(registry, "rejected") == before + 1


def test_protobuf_gzip_and_partial_success_in_protobuf(server: tuple[str, Receiver, CollectorRegistry]) -> None:
    url, receiver, _ = server
    messages = {
        "gen_ai.input.messages": '[{"role":"user","content":"q"}]',
        "gen_ai.output.messages": '[{"role":"assistant","content":"a"}]',
    }
    ok = _pb_span(b"\x01" * 8, {"gen_ai.operation.name": "chat", **messages})
    empty = _pb_span(b"\x02" * 8, {"gen_ai.operation.name": "chat"})  # no messages at all
    body = gzip.compress(_pb_request([ok, empty]).SerializeToString())
    r = httpx.post(
        f"{url}/v1/traces",
        content=body,
        headers={"content-type": "application/x-protobuf", "content-encoding": "gzip"},
    )
    assert r.status_code == 200
    resp = ExportTraceServiceResponse.FromString(r.content)
    assert resp.partial_success.rejected_spans == 1
    assert "no_messages" in resp.partial_success.error_message
    assert receiver.records[episode_id("ab" * 16, "01" * 8)]["messages"][-1] == {"role": "assistant", "content": "a"}
    # Two gzip members (two serialised requests one after the other read as one, as protobuf
    # concatenates repeated fields): the second member's span counts too.
    later = _pb_span(b"\x04" * 8, {"gen_ai.operation.name": "chat", **messages})
    body = gzip.compress(_pb_request([ok]).SerializeToString()) + gzip.compress(
        _pb_request([later]).SerializeToString()
    )
    headers = {"content-type": "application/x-protobuf", "content-encoding": "gzip"}
    r = httpx.post(f"{url}/v1/traces", content=body, headers=headers)
    assert r.status_code == 200 and not ExportTraceServiceResponse.FromString(r.content).HasField("partial_success")
    assert episode_id("ab" * 16, "04" * 8) in receiver.records
    r = httpx.post(f"{url}/v1/traces", content=body + b"trailing", headers=headers)
    assert r.status_code == 400


def _pb_span(span_id: bytes, attrs: dict[str, Any], parent: bytes = b"") -> PbSpan:
    def value(v: Any) -> AnyValue:
        if isinstance(v, AnyValue):
            return v
        return AnyValue(string_value=v) if isinstance(v, str) else AnyValue(bytes_value=v)

    return PbSpan(
        trace_id=b"\xab" * 16,
        span_id=span_id,
        parent_span_id=parent,
        name="s",
        start_time_unix_nano=1767225600 * 10**9,
        attributes=[KeyValue(key=k, value=value(v)) for k, v in attrs.items()],
    )


def _pb_request(spans: list[PbSpan]) -> ExportTraceServiceRequest:
    return ExportTraceServiceRequest(resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=spans)])])


# --- hostile requests -------------------------------------------------------------------------


def _post(url: str, body: bytes, ctype: str = "application/x-protobuf", **headers: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/traces", content=body, headers={"content-type": ctype, **headers})


@pytest.mark.parametrize(
    ("body", "ctype", "status"),
    [
        (b"\xff\xfe garbage \x00\x01", "application/x-protobuf", 400),
        (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"name": "\xff"}]}]}]}', "application/json", 400),
        (b"[" * 5000 + b"]" * 5000, "application/json", 400),
        (b'{"resourceSpans": "x"}', "application/json", 400),
        (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"spanId": "zz"}]}]}]}', "application/json", 400),
        (b"{}", "text/plain", 415),
        # Past the double range, the body is parsed again (see the doubles test): held to the same rules.
        (b'{"resourceSpans": [], "x": 1e999, "y": "\\ud800"}', "application/json", 400),
        (b'{"resourceSpans": [], "x": 1e999, "y": NaN}', "application/json", 400),
        (b'{"resourceSpans": [], "x": 1e999, "y": "\xff"}', "application/json", 400),
    ],
    ids=[
        "garbage-protobuf",
        "invalid-utf8-json",
        "deep-json-body",
        "wrong-type",
        "bad-span-id",
        "content-type",
        "huge-number-and-lone-surrogate",
        "huge-number-and-nan-literal",
        "huge-number-and-invalid-utf8",
    ],
)
def test_malformed_requests_get_a_4xx(
    server: tuple[str, Receiver, CollectorRegistry], body: bytes, ctype: str, status: int
) -> None:
    r = _post(server[0], body, ctype)
    assert r.status_code == status, r.text
    if ctype == "application/json":
        assert r.json()["message"]


def test_invalid_utf8_in_a_protobuf_string_is_a_400(server: tuple[str, Receiver, CollectorRegistry]) -> None:
    good = _pb_request([_pb_span(b"\x03" * 8, {"k": "\u00e9"})]).SerializeToString()
    bad = good.replace("\u00e9".encode(), b"\xc3\x28")  # same length, invalid UTF-8
    assert bad != good
    r = _post(server[0], bad)
    assert r.status_code == 400


def test_too_many_spans_a_gzip_bomb_and_an_oversize_body_are_413(
    server: tuple[str, Receiver, CollectorRegistry],
) -> None:
    url = server[0]
    many = _pb_request([_pb_span(i.to_bytes(8, "big"), {}) for i in range(1, 202)]).SerializeToString()
    assert _post(url, many).status_code == 413
    bomb = gzip.compress(b"\x00" * (8 << 20))
    assert _post(url, bomb, "application/json", **{"content-encoding": "gzip"}).status_code == 413
    assert _post(url, b" " * (2 << 20), "application/json").status_code == 413
    assert _post(url, b"abc", "application/json", **{"content-encoding": "br"}).status_code == 415
    assert _post(url, b"not gzip", "application/json", **{"content-encoding": "gzip"}).status_code == 400


def test_hostile_attributes_reject_their_span_only(server: tuple[str, Receiver, CollectorRegistry]) -> None:
    url, receiver, _ = server
    ok = {"gen_ai.operation.name": "chat", "gen_ai.prompt": "q", "gen_ai.completion": "a"}
    deep_json = "[" * 50 + "]" * 50
    deep_any = AnyValue(string_value="x")
    for _ in range(20):
        deep_any = AnyValue(array_value=ArrayValue(values=[deep_any]))
    spans = [
        _pb_span(b"\x10" * 8, {**ok, "gen_ai.completion": "x" * 70_000}),  # over max_value_chars
        _pb_span(b"\x11" * 8, {**ok, "gen_ai.input.messages": deep_json}),
        _pb_span(b"\x12" * 8, {**ok, "nested": deep_any}),
        _pb_span(b"\x13" * 8, {**ok, "gen_ai.input.messages": "{not json"}),
        _pb_span(b"\x14" * 8, {**ok, "gen_ai.input.messages": '[{"role":"wizard","content":"x"}]'}),
        _pb_span(b"\x15" * 8, ok),  # the good one
    ]
    r = _post(url, _pb_request(spans).SerializeToString())
    assert r.status_code == 200
    partial = ExportTraceServiceResponse.FromString(r.content).partial_success
    assert partial.rejected_spans == 5
    for reason in ("oversize", "too_deep", "invalid_json"):
        assert reason in partial.error_message
    assert episode_id("ab" * 16, "15" * 8) in receiver.records


def test_integers_beyond_64_bits_reject_their_span_not_the_request(
    server: tuple[str, Receiver, CollectorRegistry],
) -> None:
    """An intValue is a signed 64-bit integer. A larger one (OTLP/JSON writes them as strings of up
    to 20 digits) reached orjson at the hand-off: a 500 that lost every span of the export."""
    url, receiver, registry = server
    ok = {"gen_ai.operation.name": "chat", "gen_ai.prompt": "q", "gen_ai.completion": "a"}
    too_big = [
        {"key": "gen_ai.system_instructions", "value": {"intValue": "99999999999999999999"}},
        {"key": "gen_ai.system_instructions", "value": {"intValue": "-9223372036854775809"}},
        {"key": "gen_ai.system_instructions", "value": {"intValue": 18446744073709551615}},
        {
            "key": "nested",
            "value": {"kvlistValue": {"values": [{"key": "n", "value": {"intValue": "9223372036854775808"}}]}},
        },
    ]
    spans = [_json_span(f"{0x20 + i:016x}", ok) for i in range(len(too_big) + 1)]
    for span, attr in zip(spans, too_big, strict=False):
        span["attributes"].append(attr)
    # The bounds themselves are integers.
    spans[-1]["attributes"] += [_kv("lo", -(1 << 63)), _kv("hi", (1 << 63) - 1)]
    before = spans_metric(registry, "rejected")
    r = _post(url, json.dumps(_json_request(spans)).encode(), "application/json")
    assert r.status_code == 200, r.text
    assert r.json()["partialSuccess"]["rejectedSpans"] == str(len(too_big))
    assert "signed 64-bit" in r.json()["partialSuccess"]["errorMessage"]
    assert spans_metric(registry, "rejected") - before == len(too_big)
    good = receiver.records[episode_id("5b8efff798038103d269b633813fc60c", spans[-1]["spanId"])]
    assert good["metadata"]["span_id"] == spans[-1]["spanId"]
    # A time beyond its fixed64 field: the request is malformed.
    late = _json_span("00000000000000ff", ok, startTimeUnixNano="18446744073709551616")
    r = _post(url, json.dumps(_json_request([late])).encode(), "application/json")
    assert r.status_code == 400 and "startTimeUnixNano" in r.json()["message"]


def test_doubles_past_the_range_or_by_name_keep_the_request_and_their_span(
    server: tuple[str, Receiver, CollectorRegistry],
) -> None:
    """One ``doubleValue`` of 1e999, in any span, made orjson refuse the whole export (a 400 for every
    span); and the names the protobuf JSON mapping gives a double that is not finite ("NaN",
    "Infinity"), which exporters write, refused their span as a wrong type."""
    url, receiver, registry = server
    ok = {"gen_ai.operation.name": "chat", "gen_ai.prompt": "q", "gen_ai.completion": "a"}
    values = ['"NaN"', '"Infinity"', '"-Infinity"', '"2.5"', "1e999", "-1e999", "0.25", "7", '"abc"', "true", '"1e5x"']
    refused = 3  # the last three
    spans = [_json_span(f"{0x40 + i:016x}", ok) for i in range(len(values))]
    for i, span in enumerate(spans):
        span["attributes"].append({"key": "x", "value": {"doubleValue": f"@{i}@"}})
    body = json.dumps(_json_request(spans))
    for i, v in enumerate(values):
        body = body.replace(f'"@{i}@"', v)
    before = spans_metric(registry, "rejected")
    r = _post(url, body.encode(), "application/json")
    assert r.status_code == 200, r.text
    assert r.json()["partialSuccess"]["rejectedSpans"] == str(refused)
    assert "doubleValue must be a number" in r.json()["partialSuccess"]["errorMessage"]
    assert spans_metric(registry, "rejected") - before == refused
    for span in spans[:-refused]:
        assert episode_id("5b8efff798038103d269b633813fc60c", span["spanId"]) in receiver.records


def test_a_double_that_is_not_finite_is_kept_by_its_name_in_both_encodings() -> None:
    """orjson writes a NaN or an infinity as null: an episode would hold a value its span did not."""
    from monitor.ingest.otlp import decode_json, decode_protobuf

    attrs = {"a": "1e999", "b": '"NaN"', "c": "-0.5", "d": "3", "e": "-1e999"}
    span = _json_span("00000000000000a1", {})
    span["attributes"] = [{"key": k, "value": {"doubleValue": f"@{k}@"}} for k in attrs]
    body = json.dumps(_json_request([span]))
    for k, v in attrs.items():
        body = body.replace(f'"@{k}@"', v)
    (got,) = decode_json(body.encode(), OtlpLimits())
    assert got.attrs == {"a": "Infinity", "b": "NaN", "c": -0.5, "d": 3, "e": "-Infinity"}
    assert got.error is None
    doubles = {"a": float("inf"), "b": float("nan"), "c": -0.5, "e": float("-inf")}
    pb = _pb_request([_pb_span(b"\x01" * 8, {k: AnyValue(double_value=v) for k, v in doubles.items()})])
    (got,) = decode_protobuf(pb.SerializeToString(), OtlpLimits())
    assert got.attrs == {"a": "Infinity", "b": "NaN", "c": -0.5, "e": "-Infinity"}


def test_a_conversation_past_the_message_limit_is_refused_while_it_is_built() -> None:
    """An agent span with more turns under it than an episode may hold messages is refused as
    validation would refuse it (too_many_messages), before its conversation grows further; one
    within the limit keeps each repeated message once, in order."""

    def chat(sid: str, parent: str, start: int, inputs: list[tuple[str, str]], answer: str) -> Span:
        attrs = {
            "gen_ai.operation.name": "chat",
            "gen_ai.input.messages": _messages(*[(role, [_text(t)]) for role, t in inputs]),
            "gen_ai.output.messages": _messages(("assistant", [_text(answer)])),
        }
        return Span("t", sid, parent, "chat", start, 0, attrs, [], {})

    def tool(i: int) -> Span:  # a call and its result: two messages each
        attrs = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.call.id": f"t{i}", "gen_ai.tool.name": "f"}
        return Span("t", f"t{i}", "root", "tool", 3 + i, 0, attrs, [], {})

    root = Span("t", "root", "", "agent", 1, 0, {"gen_ai.operation.name": "invoke_agent"}, [], {})
    many = [root, chat("c", "root", 2, [("user", "q")], "a"), *(tool(i) for i in range(MAX_MESSAGES // 2))]
    conv = convert(many, LIMITS)
    assert not conv.records and [(r.reason, r.spans) for r in conv.rejected] == [("too_many_messages", len(many))]
    # Each call repeats the conversation so far; the episode holds it once.
    turns: list[tuple[str, str]] = []
    spans = [root]
    for i in range(3):
        turns.append(("user", f"q{i}"))
        spans.append(chat(f"c{i}", "root", 2 + i, list(turns), f"a{i}"))
        turns.append(("assistant", f"a{i}"))
    (record,) = convert(spans, LIMITS).records
    assert [(m["role"], m["content"]) for m in record["messages"]] == turns


def test_a_body_that_never_arrives_is_a_408() -> None:
    registry = CollectorRegistry()
    app = FastAPI()
    limits = dataclasses.replace(LIMITS, body_timeout_s=0.5)
    app.include_router(otlp_router(Receiver().submit, limits=limits, metrics=OtlpMetrics(registry)))
    srv = BackgroundServer(app, "127.0.0.1", 0).start()
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
            head = (
                "POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
            )
            sock.sendall(head.encode())
            answer = b"".join(iter(lambda: sock.recv(4096), b"")).decode()  # to the server's close
        assert answer.startswith("HTTP/1.1 408") and "connection: close" in answer.lower(), answer
        assert registry.get_sample_value("oversight_otlp_requests_total", {"outcome": "body_timeout"}) == 1.0
    finally:
        srv.stop()


def test_spans_without_ids_or_with_repeated_ids_are_a_400(server: tuple[str, Receiver, CollectorRegistry]) -> None:
    """Episodes are keyed by (trace, span): two spans without ids were merged into one made-up
    conversation, and a later one with other content got 200 and was dropped as a redelivery."""
    url, receiver, _ = server
    chat = {"gen_ai.operation.name": "chat", "gen_ai.prompt": "q", "gen_ai.completion": "a"}
    before = dict(receiver.records)
    for spans in (
        [_pb_span(b"", chat), _pb_span(b"", {**chat, "gen_ai.prompt": "other"})],
        [_pb_span(b"\x00" * 8, chat)],
        [_pb_span(b"\x31" * 8, chat), _pb_span(b"\x31" * 8, {**chat, "gen_ai.prompt": "other"})],
    ):
        r = _post(url, _pb_request(spans).SerializeToString())
        assert r.status_code == 400, r.content
    zero = _json_span("0000000000000000", chat)
    r = _post(url, json.dumps(_json_request([zero])).encode(), "application/json")
    assert r.status_code == 400 and "non-zero" in r.json()["message"]
    assert receiver.records == before


def test_tool_call_ids_of_any_json_type_do_not_break_grouping() -> None:
    """Ids come from the span's own JSON: a list or an object as an id reaches validation (which
    names it) instead of raising while the conversation is grouped (a 500 for the export)."""
    odd = [["x"], {"a": 1}, 7, None]
    msgs = [{"role": "user", "parts": [_text("q")]}]
    for i, call_id in enumerate(odd):
        msgs.append(
            {"role": "assistant", "parts": [{"type": "tool_call", "id": call_id, "name": "f", "arguments": {}}]}
        )
        msgs.append({"role": "tool", "parts": [{"type": "tool_call_response", "id": call_id, "response": f"r{i}"}]})
    attrs = {"gen_ai.operation.name": "chat", "gen_ai.input.messages": json.dumps(msgs)}
    tool = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.call.id": "c1", "gen_ai.tool.name": "f"}
    conv = convert(
        [Span("t", "s1", "", "c", 1, 0, attrs, [], {}), Span("t", "s2", "s1", "t", 2, 0, tool, [], {})], LIMITS
    )
    (record,) = conv.records
    assert [m["role"] for m in record["messages"]] == ["user", *["assistant", "tool"] * (len(odd) + 1)]


def test_parent_cycles_and_orphans_do_not_hang() -> None:
    def span(sid: str, parent: str) -> Span:
        attrs = {"gen_ai.operation.name": "chat", "gen_ai.prompt": "q", "gen_ai.completion": "a"}
        return Span("t", sid, parent, "s", 1, 0, attrs, [], {})

    conv = convert([span("a", "b"), span("b", "a"), span("c", "missing")], LIMITS)
    # The cycle's walk stops where it closes (one episode of both spans); the orphan (its parent in
    # another request, or never sent) is top-level.
    assert sorted(conv.record_spans) == [1, 2]
    assert "c" in {r["metadata"]["span_id"] for r in conv.records}


@pytest.mark.parametrize("field", ["_calls", "tool_calls", "content.x"])
def test_flattened_message_fields_are_the_senders_names_only(field: str) -> None:
    """A field named like the parser's own working key (``gen_ai.prompt.0._calls``) replaced the
    tool calls it collected: a 500 that lost the whole export, the valid spans in it included."""
    attrs = {
        "gen_ai.operation.name": "chat",
        "gen_ai.prompt.0.role": "user",
        "gen_ai.prompt.0.content": "q",
        f"gen_ai.prompt.0.{field}": "x",
        "gen_ai.completion.0.role": "assistant",
        "gen_ai.completion.0.content": "a",
        "gen_ai.completion.0.tool_calls.0.name": "f",
        "gen_ai.completion.0.tool_calls.0.arguments": "{}",
        f"gen_ai.completion.0.{field}": ["not", "calls"],
    }
    ok = {"gen_ai.operation.name": "chat", "gen_ai.prompt": "q", "gen_ai.completion": "a"}
    conv = convert([Span("t", "s1", "", "c", 1, 0, attrs, [], {}), Span("t", "s2", "", "c", 1, 0, ok, [], {})], LIMITS)
    assert sorted(r["metadata"]["span_id"] for r in conv.records) == ["s1", "s2"], conv.rejected
    (flat,) = [r for r in conv.records if r["metadata"]["span_id"] == "s1"]
    assert flat["messages"][-1]["tool_calls"][0]["function"]["name"] == "f"  # the call sent, whatever else is


def test_a_bug_on_one_span_rejects_that_span_not_the_request(monkeypatch: pytest.MonkeyPatch) -> None:
    import monitor.ingest.otlp as otlp

    real = otlp.build_episode

    def flaky(root: Span, members: list[Span], limits: OtlpLimits) -> dict[str, Any]:
        if root.span_id == "bad":
            raise KeyError("a bug")
        return real(root, members, limits)

    monkeypatch.setattr(otlp, "build_episode", flaky)
    attrs = {"gen_ai.operation.name": "chat", "gen_ai.prompt": "q", "gen_ai.completion": "a"}
    conv = convert([Span("t", "bad", "", "c", 1, 0, attrs, [], {}), Span("t", "ok", "", "c", 1, 0, attrs, [], {})])
    assert [r["metadata"]["span_id"] for r in conv.records] == ["ok"]
    assert [(r.span_id, r.reason, r.detail) for r in conv.rejected] == [("bad", "internal_error", "KeyError")]


# --- through the ingest app: exporter -> /v1/traces -> inbox -> pipeline -> review item -----------


def _ingest_app(sqlite_url: str, tmp_path: Path, *extra: str) -> tuple[Settings, Store, str, IngestServer]:
    """The ingest app on a real server and a SQLite store, with one token (``otel``)."""
    settings = load_settings(
        None,
        [
            "dev=true",
            f"database.url={sqlite_url}",
            f"dead_letter.path={tmp_path / 'dlq.jsonl'}",
            "ingest.port=0",
            "ingest.token_refresh_s=0",
            "drift.enabled=false",
            "reward.enabled=false",
            *extra,
        ],
    )
    store = Store(sqlite_url)
    token = add_token(store, "otel", None)
    return settings, store, token, IngestServer(settings, store=store, registry=CollectorRegistry()).start()


def test_sdk_round_trip_through_the_ingest_app_to_a_review_item(sqlite_url: str, tmp_path: Path) -> None:
    # Every episode becomes a review item.
    settings, store, token, server = _ingest_app(sqlite_url, tmp_path, "sampling.human.rate=1.0")
    try:
        url = server.url.rstrip("/")
        # Refused, as OTLP/HTTP answers every failure: a google.rpc.Status in the request's encoding.
        r = httpx.post(f"{url}/v1/traces", content=b"", headers={"content-type": JSON})
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["code"] == 16 and r.json()["message"]  # UNAUTHENTICATED
        r = httpx.post(f"{url}/v1/traces", content=b"", headers={"content-type": "application/x-protobuf"})
        assert r.status_code == 401 and r.headers["content-type"] == "application/x-protobuf"
        assert r.content[:2] == bytes([0x08, 16])  # Status.code = 16
        chat_id, agent_id = _emit_with_sdk(url, headers={"authorization": f"Bearer {token}"})
        s = settings.model_copy(update={"source": settings.source.model_copy(update={"kind": "inbox"})})
        svc = build_service(s, serve=False, store=store, registry=CollectorRegistry())
        svc.pipeline.run(hooks=LoopHooks(when_idle=lambda: True, stage_idle_work=False))
        with store.engine.connect() as c:
            tasks = {r[0]: r[1] for r in c.execute(sa.text("SELECT episode_id, stream FROM review_tasks"))}
            stored: dict[str, Any] = {
                r[0]: r[1] for r in c.execute(sa.text("SELECT episode_id, messages FROM episodes"))
            }
    finally:
        server.stop()
        store.close()
    assert tasks == {chat_id: "shop-assistant", agent_id: "agents"}
    agent_messages = stored[agent_id] if isinstance(stored[agent_id], list) else json.loads(stored[agent_id])
    assert [m["role"] for m in agent_messages] == ["user", "assistant", "tool", "assistant"]


def test_the_ingest_app_holds_a_slot_and_its_body_limit_for_every_export(sqlite_url: str, tmp_path: Path) -> None:
    """The OTLP route took a request slot only to hand its records off, after reading and decoding
    a body of up to 16 MiB (and never for one without GenAI spans), and ignored
    ``ingest.max_request_bytes``; resource and scope spans had no limit at all (millions of empty
    ones, 16 KiB gzipped, cost 15-19 s of CPU each)."""
    _, store, token, server = _ingest_app(
        sqlite_url, tmp_path, "ingest.max_request_bytes=100000", "ingest.max_inflight=2"
    )
    auth = {"authorization": f"Bearer {token}"}
    not_genai = _json_request([_json_span("bbb19b7ec3c1b174", {"http.method": "GET"})])
    try:
        url = server.url.rstrip("/")
        assert _post(url, json.dumps(not_genai).encode(), JSON, **auth).status_code == 200
        with server.ctx.slot(), server.ctx.slot():  # every slot busy: refused before the body is read
            r = _post(url, json.dumps(not_genai).encode(), JSON, **auth)
        assert r.status_code == 429 and "Retry-After" in r.headers and r.json()["code"] == 8
        big = _json_request([_json_span("ccc19b7ec3c1b174", {"gen_ai.operation.name": "chat", "x": "y" * 150_000})])
        assert _post(url, json.dumps(big).encode(), JSON, **auth).status_code == 413
        groups = json.dumps({"resourceSpans": [{}] * 1001}).encode()
        assert _post(url, gzip.compress(groups), JSON, **auth, **{"content-encoding": "gzip"}).status_code == 413
        scopes = json.dumps({"resourceSpans": [{"scopeSpans": [{}] * 1000}]}).encode()
        assert _post(url, scopes, JSON, **auth).status_code == 413
        assert _post(url, b"\x0a\x00" * 1001, "application/x-protobuf", **auth).status_code == 413
        assert _post(url, b"\x0a\x02\x12\x00" * 501, "application/x-protobuf", **auth).status_code == 413
        fine = _pb_request([_pb_span(b"\x01" * 8, {"http.method": "GET"})]).SerializeToString()
        assert _post(url, fine, "application/x-protobuf", **auth).status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
        assert "oversight_ingest_inflight 0.0" in metrics  # every slot given back
    finally:
        server.stop()
        store.close()


def test_spans_counted_on_the_wire_before_the_parse() -> None:
    from monitor.ingest.otlp import OtlpError, check_wire_counts

    limits = OtlpLimits(max_spans=3, max_groups=4)
    three = _pb_request([_pb_span(bytes([i]) * 8, {}) for i in range(1, 4)]).SerializeToString()
    check_wire_counts(three, limits)  # at the limit
    four = _pb_request([_pb_span(bytes([i]) * 8, {}) for i in range(1, 5)]).SerializeToString()
    with pytest.raises(OtlpError, match="more than 3 spans"):
        check_wire_counts(four, limits)
    check_wire_counts(b"\xff\xff garbage", limits)  # malformed: left for the parser to name
