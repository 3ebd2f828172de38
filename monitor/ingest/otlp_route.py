"""``POST /v1/traces``: the OTLP/HTTP traces receiver, as an APIRouter to include in the ingest app.

It reads an ``ExportTraceServiceRequest`` (``application/x-protobuf`` or ``application/json``,
optionally gzip), turns its GenAI spans into schema-v2 records (:mod:`monitor.ingest.otlp`) and
gives them to the ingest app's ``submit``: the same validation, idempotency and durable hand-off as
``POST /v1/episodes``. The answer is an ``ExportTraceServiceResponse`` in the request's encoding,
with ``partial_success`` counting the spans whose episodes were refused and why; a request that is
not OTLP at all gets 400 (a ``google.rpc.Status``), one over the limits 413, an unknown content type
or encoding 415. Authentication is the app's: pass its ``authenticate``. Every failure, a refused token
(401) and the ingest path's backpressure (429, 503, with their ``Retry-After``) included, is a
``google.rpc.Status`` in the request's encoding, as OTLP/HTTP requires of every 4xx and 5xx (FastAPI's
``{"detail": ...}`` is no body an exporter reads).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import orjson
from fastapi import APIRouter, HTTPException, Request, Response
from prometheus_client import CollectorRegistry, Counter
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from monitor.ingest.body import Gunzip, GzipError, GzipTooLarge, body_timeout_detail
from monitor.ingest.otlp import Conversion, OtlpError, OtlpLimits, convert, decode_json, decode_protobuf, iter_reasons

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
#: Records (each one episode, encoded as JSON) -> per record None (accepted) or the reason it was not.
Submit = Callable[[Request, list[bytes]], Sequence[str | None]]
SPAN_OUTCOMES = ("episode", "ignored", "rejected")
# client_disconnected: the exporter went away before its body was complete (nothing is answered).
# refused: the token (401) or the ingest path's backpressure (429, 503).
REQUEST_OUTCOMES = (
    "ok",
    "partial",
    "bad_request",
    "too_large",
    "unsupported",
    "client_disconnected",
    "body_timeout",
    "refused",
)
_GRPC_INVALID_ARGUMENT = 3
# google.rpc.Code by HTTP status: DEADLINE_EXCEEDED, UNAUTHENTICATED, RESOURCE_EXHAUSTED, UNAVAILABLE.
_GRPC_CODES = {408: 4, 401: 16, 413: 8, 429: 8, 503: 14}


class OtlpMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = registry if registry is not None else CollectorRegistry()
        self.spans = Counter(
            "otlp_spans",
            "OTLP spans received, by outcome (episode: part of an accepted episode; ignored: not GenAI;"
            " rejected: its episode was refused)",
            ["outcome"],
            namespace="oversight",
            registry=r,
        )
        self.requests = Counter(
            "otlp_requests", "OTLP export requests, by outcome", ["outcome"], namespace="oversight", registry=r
        )
        for o in SPAN_OUTCOMES:
            self.spans.labels(o)
        for o in REQUEST_OUTCOMES:
            self.requests.labels(o)


def otlp_router(
    submit: Submit,
    *,
    limits: OtlpLimits | None = None,
    metrics: OtlpMetrics | None = None,
    authenticate: Callable[[Request], None] | None = None,
    admit: Callable[[Request], AbstractContextManager[None]] | None = None,
) -> APIRouter:
    """``authenticate(request)`` raises an HTTPException to refuse the request (run on a worker
    thread: it may read the database); ``submit`` may raise one too (backpressure). ``admit(request)``,
    after ``authenticate``, is held while the body is read, decoded and submitted (the ingest app's
    request slot: what bounds the memory and CPU of requests at once); entering it may raise an
    HTTPException (429)."""
    limits = limits or OtlpLimits()
    metrics = metrics or OtlpMetrics()
    router = APIRouter()

    @router.post("/v1/traces", include_in_schema=True, summary="OTLP/HTTP traces receiver (GenAI spans -> episodes)")
    async def traces(request: Request) -> Response:
        encoding = _media_type(request.headers.get("content-type"))
        try:
            if authenticate is not None:
                await run_in_threadpool(authenticate, request)
            with admit(request) if admit is not None else nullcontext():
                return await export(request, encoding)
        except HTTPException as e:
            metrics.requests.labels("refused").inc()
            response = _status(encoding if encoding == PROTOBUF else JSON, e.status_code, str(e.detail))
            response.headers.update(e.headers or {})
            return response

    async def export(request: Request, encoding: str) -> Response:
        if encoding not in (PROTOBUF, JSON):
            metrics.requests.labels("unsupported").inc()
            return _status(JSON, 415, f"Content-Type must be {PROTOBUF} or {JSON}")
        try:
            body = await asyncio.wait_for(_read_body(request, limits), limits.body_timeout_s)
            # Decoding and grouping are CPU work in proportion to the body (up to 16 MiB): on a
            # worker thread, so that the event loop goes on answering /healthz and other requests.
            conv = await run_in_threadpool(decode_and_convert, body, encoding, limits)
        except OtlpError as e:
            metrics.requests.labels(_REQUEST_OUTCOME.get(e.status, "bad_request")).inc()
            return _status(encoding, e.status, e.message)
        except ClientDisconnect:  # routine: counted, without a traceback in the server's log
            metrics.requests.labels("client_disconnected").inc()
            return Response(status_code=499)
        except TimeoutError:  # a body that never comes must not hold its connection and memory
            metrics.requests.labels("body_timeout").inc()
            response = _status(encoding, 408, body_timeout_detail(limits.body_timeout_s))
            response.headers["Connection"] = "close"
            return response
        errors = list(await run_in_threadpool(submit, request, conv.raws)) if conv.raws else []
        return _answer(encoding, conv, errors, metrics)

    return router


_REQUEST_OUTCOME = {400: "bad_request", 413: "too_large", 415: "unsupported"}


def decode_and_convert(body: bytes, encoding: str, limits: OtlpLimits) -> Conversion:
    spans = decode_protobuf(body, limits) if encoding == PROTOBUF else decode_json(body, limits)
    return convert(spans, limits)


def _media_type(header: str | None) -> str:
    return (header or "").split(";", 1)[0].strip().lower()


async def _read_body(request: Request, limits: OtlpLimits) -> bytes:
    """The body, decompressed, never more than ``limits.max_body_bytes`` held (a gzip bomb stops there)."""
    coding = (request.headers.get("content-encoding") or "identity").strip().lower()
    if coding not in ("identity", "gzip"):
        raise OtlpError(415, f"Content-Encoding {coding[:20]!r} is not supported (gzip or none)")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and (len(declared) > 18 or int(declared) > limits.max_body_bytes):
        raise OtlpError(413, f"request body over {limits.max_body_bytes} bytes")
    inflate = Gunzip(limits.max_body_bytes) if coding == "gzip" else None
    parts: list[bytes] = []
    size = 0
    try:
        async for received in request.stream():
            chunk = received if inflate is None else inflate.feed(received)
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise OtlpError(413, f"request body over {limits.max_body_bytes} bytes")
            parts.append(chunk)
        if inflate is not None:
            inflate.close()
    except GzipTooLarge:
        raise OtlpError(413, f"request body over {limits.max_body_bytes} bytes (decompressed)") from None
    except GzipError as e:
        raise OtlpError(400, f"invalid gzip body: {e}") from None
    return b"".join(parts)


def _answer(encoding: str, conv: Conversion, errors: list[str | None], metrics: OtlpMetrics) -> Response:
    rejected = sum(r.spans for r in conv.rejected)
    accepted = 0
    lines = list(iter_reasons(conv))
    for n, error, record in zip(conv.record_spans, errors, conv.records, strict=True):
        if error is None:
            accepted += n
            continue
        rejected += n
        if len(lines) < 10:
            lines.append(f"span {record['metadata']['span_id']}: {error[:200]}")
    metrics.spans.labels("episode").inc(accepted)
    metrics.spans.labels("ignored").inc(conv.ignored)
    metrics.spans.labels("rejected").inc(rejected)
    metrics.requests.labels("partial" if rejected else "ok").inc()
    return _export_response(encoding, rejected, "; ".join(lines))


def _export_response(encoding: str, rejected: int, message: str) -> Response:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTracePartialSuccess,
        ExportTraceServiceResponse,
    )

    response = ExportTraceServiceResponse()
    if rejected:
        response.partial_success.CopyFrom(ExportTracePartialSuccess(rejected_spans=rejected, error_message=message))
    if encoding == PROTOBUF:
        return Response(response.SerializeToString(), media_type=PROTOBUF)
    body: dict[str, Any] = {}
    if rejected:
        body["partialSuccess"] = {"rejectedSpans": str(rejected), "errorMessage": message}
    return Response(orjson.dumps(body), media_type=JSON)


def _status(encoding: str, status: int, message: str) -> Response:
    """A ``google.rpc.Status`` body, as OTLP/HTTP asks for failures (encoded by hand: two fields)."""
    code = _GRPC_CODES.get(status, _GRPC_INVALID_ARGUMENT)
    if encoding != PROTOBUF:
        return Response(orjson.dumps({"code": code, "message": message}), status_code=status, media_type=JSON)
    text = message.encode("utf-8", "replace")
    body = bytes([0x08, code, 0x12]) + _varint(len(text)) + text
    return Response(body, status_code=status, media_type=PROTOBUF)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
