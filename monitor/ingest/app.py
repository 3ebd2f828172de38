"""The HTTP ingest API: ``POST /v1/episodes`` with ``/healthz``, ``/readyz`` and ``/metrics``.

A request is, in order: authenticated (bearer token of ``ingest_tokens``: 401), checked against
the size limits (413) and backpressure (429 + Retry-After: too many requests in flight, or in
inbox mode an unconsumed inbox backlog above ``ingest.max_backlog``; both shared fairly between
tokens, ``monitor.ingest.fairness``), read and split into records
(a JSON array or NDJSON, optionally gzip), each record validated as the pipeline validates it
(``parse_episode``), and the accepted ones handed off durably (``monitor.ingest.handoff``) before
the answer. The answer lists every record: accepted, duplicate (its episode id was handed off
before, or earlier in the same request) or rejected with the validation reason. Rejected records
are not dead-lettered: the caller has them and the reason now; they are counted in
``oversight_ingest_rejected_total{reason}``. A request whose every record is rejected is 422. A
hand-off outage is 503 + Retry-After: nothing acknowledged that the target does not hold.

Everything a record carries is untrusted: it goes back to the caller only inside JSON.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from monitor.config import IngestConfig, Settings
from monitor.episodes import InvalidEpisode, parse_episode
from monitor.ingest.body import BodyError, body_timeout_detail, gunzip_limited, read_limited, split_records, too_large
from monitor.ingest.fairness import RecentShares, Slots
from monitor.ingest.handoff import Handoff, HandoffUnavailable, InboxHandoff, KafkaHandoff
from monitor.ingest.metrics import IngestMetrics
from monitor.ingest.otlp import OtlpLimits
from monitor.ingest.otlp_route import OtlpMetrics, otlp_router
from monitor.ingest.tokens import Principal, TokenCache
from monitor.store import Store
from monitor.store.ingest import InboxRow

BACKLOG_CACHE_S = 0.5  # the inbox backlog is counted at most this often
HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


class RecordResult(BaseModel):
    index: int
    episode_id: str | None = None
    status: Literal["accepted", "duplicate", "rejected"]
    reason: str | None = None
    detail: str | None = None


class IngestResponse(BaseModel):
    accepted: int
    duplicates: int
    rejected: int
    results: list[RecordResult]


class ErrorResponse(BaseModel):
    error: str
    detail: str


class ApiError(Exception):
    """A whole request refused: its status, a short reason, a detail, and Retry-After if any."""

    def __init__(self, status: int, reason: str, detail: str, retry_after: int | None = None):
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail
        self.retry_after = retry_after


@dataclass
class IngestContext:
    """What the routes share. ``ingest`` is the one path every ingest route takes (the episodes
    API, the OTLP receiver): validation, stream scopes, de-duplication and the hand-off."""

    cfg: IngestConfig
    max_episode_bytes: int
    max_future_s: float | None
    tokens: TokenCache
    handoff: Handoff
    metrics: IngestMetrics
    store: Store | None = None
    _slots: Slots = field(init=False)
    _shares: RecentShares = field(init=False)
    _backlog: tuple[float, int | None] = (float("-inf"), None)

    def __post_init__(self) -> None:
        self._slots = Slots(self.cfg.max_inflight)
        self._shares = RecentShares()

    # -- refusals -----------------------------------------------------------------
    def refuse(self, status: int, why: str, detail: str, retry: bool = False) -> ApiError:
        self.metrics.refused.labels(why).inc()
        return ApiError(status, why, detail, self.cfg.retry_after_s if retry else None)

    def authenticate(self, authorization: str | None) -> Principal:
        scheme, _, token = (authorization or "").partition(" ")
        try:
            principal = self.tokens.authenticate(token.strip()) if scheme.lower() == "bearer" else None
        except Exception:
            raise self.refuse(503, "unavailable", "the token list cannot be read (database down)", True) from None
        if principal is None:
            raise self.refuse(401, "unauthorized", "a valid ingest bearer token is required")
        return principal

    @contextmanager
    def slot(self, principal: Principal | None = None) -> Iterator[None]:
        """One of ``ingest.max_inflight`` request slots, or 429 at once (never queued). A token
        that holds one already cannot take the last free ones (``monitor.ingest.fairness``)."""
        holder = None if principal is None else principal.name
        if not self._slots.take(holder):
            raise self.refuse(429, "inflight", f"more than {self.cfg.max_inflight} requests in flight", True)
        self.metrics.inflight.inc()
        try:
            yield
        finally:
            self.metrics.inflight.dec()
            self._slots.give(holder)

    def check_backlog(self, principal: Principal) -> None:
        """429 when the consumer is behind by more than ``ingest.max_backlog`` records and this
        token sent at least its fair share of the recent ones, or by more than twice that."""
        at, n = self._backlog
        now = time.monotonic()
        limit = self.cfg.max_backlog
        if now - at >= BACKLOG_CACHE_S:
            try:
                n = self.handoff.backlog(2 * limit)
            except HandoffUnavailable as e:
                self.metrics.handoff_failures.inc()
                raise self.refuse(503, "unavailable", f"hand-off target unavailable ({e})", True) from None
            self._backlog = (now, n)
        if n is None or n <= limit:
            return
        if n > 2 * limit:
            raise self.refuse(429, "backlog", f"more than {2 * limit} records wait to be processed", True)
        if self._shares.over_share(principal.name):
            raise self.refuse(
                429,
                "backlog",
                f"more than {limit} records wait to be processed, and this token sent its share of them",
                True,
            )

    # -- the records --------------------------------------------------------------
    def ingest(self, raws: list[bytes], principal: Principal) -> IngestResponse:
        """Validate ``raws`` and hand the accepted ones off; per-record results. Raises
        :class:`ApiError` 503 when the hand-off fails (then nothing was acknowledged)."""
        now = time.time()
        results: list[RecordResult | None] = [None] * len(raws)
        rows: list[InboxRow] = []
        pending: list[tuple[int, tuple[str, str]]] = []
        seen: set[tuple[str, str]] = set()
        for i, raw in enumerate(raws):
            res = self._check(i, raw, principal, now, seen)
            if isinstance(res, RecordResult):
                results[i] = res
                continue
            key = (res.stream, res.episode_id)
            seen.add(key)
            rows.append(res)
            pending.append((i, key))
        new = self._hand_off(rows)
        self._shares.add(principal.name, len(new))
        for i, key in pending:
            results[i] = RecordResult(index=i, episode_id=key[1], status="accepted" if key in new else "duplicate")
        final = [r for r in results if r is not None]
        return self._tally(final)

    def _check(
        self, i: int, raw: bytes, principal: Principal, now: float, seen: set[tuple[str, str]]
    ) -> RecordResult | InboxRow:
        try:
            ep = parse_episode(raw, self.max_episode_bytes, now, self.max_future_s)
        except InvalidEpisode as e:
            return RecordResult(index=i, episode_id=e.episode_id, status="rejected", reason=e.reason, detail=e.detail)
        except Exception as e:  # a bug in validation must not fail the other records
            return RecordResult(index=i, status="rejected", reason="internal_error", detail=type(e).__name__)
        if not principal.allows(ep.stream):
            detail = f"token {principal.name!r} may not write stream {ep.stream!r}"
            return RecordResult(
                index=i, episode_id=ep.episode_id, status="rejected", reason="stream_not_allowed", detail=detail
            )
        if (ep.stream, ep.episode_id) in seen:
            return RecordResult(
                index=i,
                episode_id=ep.episode_id,
                status="duplicate",
                reason="duplicate_in_request",
                detail="the same episode_id and stream came earlier in this request",
            )
        return InboxRow(ep.episode_id, ep.stream, raw, now)

    def _hand_off(self, rows: list[InboxRow]) -> set[tuple[str, str]]:
        if not rows:
            return set()
        t0 = time.perf_counter()
        try:
            new = self.handoff.submit(rows)
        except HandoffUnavailable as e:
            self.metrics.handoff_failures.inc()
            raise self.refuse(503, "unavailable", f"hand-off target unavailable ({e}); retry", True) from None
        self.metrics.handoff_seconds.observe(time.perf_counter() - t0)
        return new

    def _tally(self, results: list[RecordResult]) -> IngestResponse:
        counts = {"accepted": 0, "duplicate": 0, "rejected": 0}
        for r in results:
            counts[r.status] += 1
            if r.status == "rejected" and r.reason is not None:
                self.metrics.reject(r.reason)
        for status, n in counts.items():
            if n:
                self.metrics.records.labels(status).inc(n)
        return IngestResponse(
            accepted=counts["accepted"], duplicates=counts["duplicate"], rejected=counts["rejected"], results=results
        )

    def readiness(self) -> dict[str, bool]:
        return {"handoff": self.handoff.ready(), "tokens": self.tokens.loaded()}

    def close(self) -> None:
        self.handoff.close()
        if self.store is not None:
            self.store.close()


# -- the HTTP layer ---------------------------------------------------------------------


def error_response(ctx: IngestContext, e: ApiError | BodyError) -> JSONResponse:
    headers = dict(HEADERS)
    if isinstance(e, ApiError) and e.retry_after is not None:
        headers["Retry-After"] = str(e.retry_after)
    if e.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="oversight-ingest"'
    if e.status == 408:  # the rest of the body may still come: this connection cannot carry another request
        headers["Connection"] = "close"
    ctx.metrics.request(e.status)
    return JSONResponse({"error": e.reason, "detail": e.detail}, status_code=e.status, headers=headers)


async def read_records(request: Request, ctx: IngestContext) -> list[bytes]:
    """The request's records, within the limits (:class:`BodyError` otherwise)."""
    limit = ctx.cfg.max_request_bytes
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise BodyError(400, "bad_request", "Content-Length is not a number")
        # By its length first: int() of thousands of digits is refused (ValueError, a 500).
        if len(declared.strip()) > 18 or int(declared) > limit:
            ctx.metrics.refused.labels("too_large").inc()
            raise too_large("request body", limit)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip", ""):
        raise BodyError(415, "unsupported_encoding", "Content-Encoding must be gzip or identity")
    try:
        try:
            body = await asyncio.wait_for(read_limited(request.stream(), limit), ctx.cfg.body_timeout_s)
        except ClientDisconnect:
            # Routine (a client's timeout, a deploy): counted, and no traceback in the server's log.
            raise BodyError(499, "client_disconnected", "the client closed the connection mid-body") from None
        except TimeoutError:
            # The request holds a slot while its body comes (see post_episodes): a body that
            # does not come must not keep it.
            raise BodyError(408, "body_timeout", body_timeout_detail(ctx.cfg.body_timeout_s)) from None
        # CPU work in proportion to the body (up to max_request_bytes, and a hostile body's many
        # gzip members or unrepresentable numbers took seconds): on a worker thread, so that the
        # event loop goes on answering /healthz and the other requests meanwhile.
        if encoding == "gzip":
            body = await run_in_threadpool(gunzip_limited, body, limit)
        content_type = request.headers.get("content-type", "")
        raws = await run_in_threadpool(split_records, body, content_type, ctx.cfg.max_records_per_request)
    except BodyError as e:
        if e.status in (408, 413):
            ctx.metrics.refused.labels(e.reason).inc()
        raise
    if not raws:
        raise BodyError(400, "no_records", "the body holds no records")
    return raws


async def post_episodes(request: Request) -> Response:
    ctx: IngestContext = request.app.state.ingest
    try:
        principal = await run_in_threadpool(ctx.authenticate, request.headers.get("authorization"))
        with ctx.slot(principal):
            await run_in_threadpool(ctx.check_backlog, principal)
            raws = await read_records(request, ctx)
            result = await run_in_threadpool(ctx.ingest, raws, principal)
    except (ApiError, BodyError) as e:
        return error_response(ctx, e)
    code = 422 if result.rejected == len(result.results) else 200
    ctx.metrics.request(code)
    return JSONResponse(result.model_dump(mode="json"), status_code=code, headers=HEADERS)


def require_ingest_token(request: Request) -> None:
    """A route dependency (the OTLP receiver's): the bearer token, as ``POST /v1/episodes`` checks
    it; the principal is kept on ``request.state.ingest_principal`` for :func:`submit_records`."""
    ctx: IngestContext = request.app.state.ingest
    try:
        request.state.ingest_principal = ctx.authenticate(request.headers.get("authorization"))
    except ApiError as e:
        raise _http_error(ctx, e) from None


@contextmanager
def hold_ingest_slot(request: Request) -> Iterator[None]:
    """A route's request slot (the OTLP receiver's ``admit``), held from before its body is read
    until its records are handed off, as ``POST /v1/episodes`` holds one: taken only in
    ``submit_records``, after the body was read and decoded, it bounded neither (a request without
    GenAI spans never took one). 429 at once when none is free."""
    ctx: IngestContext = request.app.state.ingest
    with ExitStack() as stack:
        try:
            stack.enter_context(ctx.slot(request.state.ingest_principal))
        except ApiError as e:
            raise _http_error(ctx, e) from None
        yield


def submit_records(request: Request, raws: list[bytes]) -> list[str | None]:
    """What another ingest route (the OTLP receiver) gives its records to, on a worker thread,
    holding the request's slot (``hold_ingest_slot``): the same backpressure, validation, stream
    scopes, idempotency and hand-off as ``POST /v1/episodes``. Per record None (accepted or a
    duplicate) or the reason it was refused."""
    ctx: IngestContext = request.app.state.ingest
    try:
        principal = request.state.ingest_principal
        ctx.check_backlog(principal)
        result = ctx.ingest(raws, principal)
    except ApiError as e:
        raise _http_error(ctx, e) from None
    return [None if r.status != "rejected" else f"{r.reason}: {r.detail}" for r in result.results]


def _http_error(ctx: IngestContext, e: ApiError) -> HTTPException:
    headers = dict(HEADERS)
    if e.retry_after is not None:
        headers["Retry-After"] = str(e.retry_after)
    if e.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="oversight-ingest"'

    ctx.metrics.request(e.status)
    return HTTPException(e.status, e.detail, headers=headers)


def build_context(
    settings: Settings,
    *,
    store: Store | None = None,
    registry: CollectorRegistry | None = None,
    handoff: Handoff | None = None,
) -> IngestContext:
    """The context from the settings: the store (tokens; the inbox), the hand-off, the metrics."""
    own = store is None
    store = store if store is not None else Store.open(settings.database)
    cfg = settings.ingest
    if handoff is None:
        if cfg.handoff == "inbox":
            handoff = InboxHandoff(store, cfg.inbox_timeout_s)
        else:
            handoff = KafkaHandoff(settings.kafka, cfg.kafka_timeout_s)
    return IngestContext(
        cfg=cfg,
        max_episode_bytes=settings.source.max_episode_bytes,
        max_future_s=settings.source.max_future_s,
        tokens=TokenCache(store, cfg.token_refresh_s),
        handoff=handoff,
        metrics=IngestMetrics(registry),
        store=store if own else None,
    )


def create_app(ctx: IngestContext) -> FastAPI:
    app = FastAPI(
        title="oversight ingest", docs_url=None, redoc_url=None, openapi_url=None
    )  # no docs pages: the API is for machines, and the review app's CSP rules need not be repeated here
    app.state.ingest = ctx
    ctx.metrics.ready.set_function(lambda: float(all(ctx.readiness().values())))
    responses: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse} for code in (400, 401, 408, 413, 415, 429, 503)
    }
    responses[422] = {"model": IngestResponse}
    app.add_api_route(
        "/v1/episodes", post_episodes, methods=["POST"], response_model=IngestResponse, responses=responses
    )

    # OTLP/HTTP traces (GenAI spans -> episodes) take the same auth and the same ingest path.
    app.include_router(
        otlp_router(
            submit_records,
            limits=OtlpLimits(max_body_bytes=ctx.cfg.max_request_bytes, body_timeout_s=ctx.cfg.body_timeout_s),
            metrics=OtlpMetrics(ctx.metrics.registry),
            authenticate=require_ingest_token,
            admit=hold_ingest_slot,
        )
    )

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"}, headers=HEADERS)

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        checks = ctx.readiness()
        ok = all(checks.values())
        return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503, headers=HEADERS)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST, headers=HEADERS)

    return app
