"""The review web app: JSON API under /api/v1, server-rendered pages, strict security headers.

Every UI action is also an API call. Clients authenticate with the session
cookie (browsers; unsafe methods then need the ``X-CSRF-Token`` header, or the
form field on pages) or with ``Authorization: Bearer <api token>`` (machines).
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from monitor.config import Settings
from monitor.review import auth, export, queue, stats
from monitor.store import Store

log = logging.getLogger(__name__)

SESSION_COOKIE = "oversight_session"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}
# Outside dev mode the service is meant to be reached over HTTPS only (cookies are Secure).
HSTS = "max-age=31536000; includeSubDomains"
STATIC = Path(__file__).with_name("static")


class SecurityHeaders:
    """Adds the security headers to every HTTP response, a 500 for an unhandled error included.

    A pure ASGI middleware that catches what the app raises: Starlette answers an unhandled
    exception from its outermost middleware, outside any ``@app.middleware``, so such a 500
    used to go out without a single security header. The traceback goes to the log, never
    into the response.
    """

    def __init__(self, app: ASGIApp, headers: dict[str, str]):
        self.app = app
        self.headers = headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = MutableHeaders(scope=message)
                for k, v in self.headers.items():
                    headers.setdefault(k, v)
                if not path.startswith("/static/"):
                    headers.setdefault("Cache-Control", "no-store")
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            log.exception("unhandled error answering %s %s", scope.get("method"), path)
            if started:
                raise  # headers already went out with the response's start
            await JSONResponse({"detail": "internal server error"}, status_code=500)(scope, receive, send_with_headers)


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoginIn(_In):
    name: str = Field(max_length=64)
    password: str = Field(max_length=1024)


class LabelBody(_In):
    episode_id: str = Field(min_length=1, max_length=128)
    slot: int = Field(ge=0, le=16)
    fence: int = Field(ge=0)
    rating: int = Field(ge=1, le=7)
    flags: list[str] = Field(default_factory=list, max_length=32)
    critique: str = Field("", max_length=queue.MAX_CRITIQUE)
    preference: Literal["response", "alternative", "tie"] | None = None
    time_spent_ms: int = Field(0, ge=0, le=86_400_000)


class SkipBody(_In):
    episode_id: str = Field(min_length=1, max_length=128)
    slot: int = Field(ge=0, le=16)
    fence: int = Field(ge=0)
    reason: str = Field(min_length=1, max_length=queue.MAX_SKIP_REASON)
    time_spent_ms: int = Field(0, ge=0, le=86_400_000)


class ReleaseBody(_In):
    episode_id: str = Field(min_length=1, max_length=128)
    slot: int = Field(ge=0, le=16)
    fence: int = Field(ge=0)


class UserIn(_In):
    name: str = Field(min_length=1, max_length=64, pattern=f"^{auth.NAME_RE}$")
    role: Literal["reviewer", "admin"]
    password: str | None = Field(None, min_length=10, max_length=1024)


class TokenIn(_In):
    name: str = Field("api", min_length=1, max_length=64)


def validation_detail(loc: tuple[str, ...], msg: str) -> dict[str, Any]:
    return {"detail": [{"type": "value_error", "loc": list(loc), "msg": msg}]}


@dataclass(frozen=True)
class Principal:
    user: auth.User
    session: auth.Session | None  # None when authenticated by API token
    api_token: str | None = None  # the bearer token, when authenticated by one


class ReviewApp:
    """Holds what the routes need; built once per process."""

    def __init__(self, settings: Settings, store: Store, registry: Any = None):
        from monitor.review.metrics import ReviewMetrics

        self.settings = settings
        self.store = store
        self.metrics = ReviewMetrics(store, registry, settings.metrics.max_streams)
        self.secret = settings.review_secret()
        self.key = settings.sampling_key()
        self.dev = settings.dev
        self.gate = auth.HashGate.of(settings.review)
        self.limits = auth.LoginLimits.of(settings.review)

    def login(self, request: Request, name: str, password: str) -> auth.Session:
        """The one login path of the API and the pages (throttled, hashing bounded by the gate)."""
        address = request.client.host if request.client else "unknown"
        try:
            sess = auth.login(
                self.store,
                name,
                password,
                address,
                limits=self.limits,
                gate=self.gate,
                hours=self.settings.review.session_hours,
            )
        except auth.AuthError as e:
            self.metrics.login_refused(e.status)
            raise
        self.metrics.logins.labels("ok").inc()
        return sess

    def claim(self, user: auth.User) -> queue.Item | None:
        return queue.claim(
            self.store, user, self.settings.review.lease_seconds, self.key, blinding=self.settings.review.blinding
        )

    def show(
        self, user: auth.User, item: queue.Item, build: Callable[[], Response], failed: Callable[[], Response]
    ) -> Response:
        """``build()`` the response for a claimed item; if that fails, set the item aside (so
        no lease is left behind and the next claim gets the next item) and answer ``failed()``."""
        try:
            return build()
        except Exception:
            log.exception("claimed item %r could not be shown; set aside", item.claim.episode_id)
            queue.set_aside(self.store, user, item.claim)
            self.metrics.claim_errors.inc()
            return failed()

    def session(self, request: Request) -> auth.Session | None:
        return auth.session_from_token(self.store, request.cookies.get(SESSION_COOKIE))

    def principal(self, request: Request) -> Principal:
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            token = header[7:].strip()
            user = auth.user_from_api_token(self.store, token)
            if user is None:
                raise HTTPException(401, "invalid API token", headers={"WWW-Authenticate": "Bearer"})
            return Principal(user, None, token)
        sess = self.session(request)
        if sess is None:
            raise HTTPException(401, "not logged in", headers={"WWW-Authenticate": "Bearer"})
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            sent = request.headers.get("x-csrf-token", "")
            if not hmac.compare_digest(sent, sess.csrf):
                raise HTTPException(403, "missing or wrong X-CSRF-Token header")
        return Principal(sess.user, sess)

    def set_session_cookie(self, response: Response, sess: auth.Session) -> None:
        response.set_cookie(
            SESSION_COOKIE,
            sess.token,
            max_age=int(sess.expires_at - time.time()),
            httponly=True,
            secure=not self.dev,
            samesite="strict",
            path="/",
        )


def create_app(settings: Settings, store: Store | None = None, registry: Any = None) -> FastAPI:
    """The review app. Refuses to start outside dev mode without a real secret key."""
    settings.review_secret()
    store = store if store is not None else Store(settings.database.url, migrate=settings.database.migrate)
    ctx = ReviewApp(settings, store, registry)
    app = FastAPI(
        title="oversight review API",
        version="1",
        openapi_url="/api/v1/openapi.json",
        docs_url=None,  # Swagger UI needs a CDN and inline scripts: not under this CSP
        redoc_url=None,
    )
    app.state.review = ctx
    headers = SECURITY_HEADERS if settings.dev else {**SECURITY_HEADERS, "Strict-Transport-Security": HSTS}
    app.add_middleware(SecurityHeaders, headers=headers)
    if settings.review.trusted_proxies:
        # Outermost: behind an ingress every request comes from the proxy's address, and login
        # throttling per address would then be per user name, which anyone could trigger.
        from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=settings.review.trusted_proxies)

    @app.exception_handler(queue.QueueError)
    async def queue_error(_request: Request, exc: queue.QueueError) -> JSONResponse:
        if exc.status == 409:
            ctx.metrics.conflicts.inc()
        if exc.status == 422:
            # Same shape as FastAPI's own validation errors, as the OpenAPI document says.
            return JSONResponse(validation_detail(("body",), str(exc)), status_code=422)
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(auth.AuthError)
    async def auth_error(_request: Request, exc: auth.AuthError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=exc.headers)

    # No /metrics here: it is served on its own listener (review.metrics_host/_port, see
    # monitor.review.server.start_metrics), so the public review port does not expose it.
    app.include_router(api_router(ctx), prefix="/api/v1")

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    def readyz() -> JSONResponse:
        ok = store.ping()
        return JSONResponse({"ready": ok, "checks": {"database": ok}}, status_code=200 if ok else 503)

    from monitor.review.pages import PageContext, make_router

    app.include_router(
        make_router(
            PageContext(
                settings=settings,
                store=store,
                secret=ctx.secret,
                key=ctx.key,
                dev=ctx.dev,
                current_session=ctx.session,
                login=ctx.login,
                claim=ctx.claim,
                show=ctx.show,
                metrics=ctx.metrics,
            )
        )
    )
    if STATIC.is_dir():
        from fastapi.staticfiles import StaticFiles

        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def api_router(ctx: ReviewApp) -> APIRouter:
    r = APIRouter()
    store, settings = ctx.store, ctx.settings
    # Plain defaults, not Annotated aliases: the annotations here are strings
    # (postponed evaluation) that FastAPI resolves in module scope.
    who = Depends(ctx.principal)

    def admin(p: Principal = who) -> Principal:
        if not p.user.is_admin:
            raise HTTPException(403, "admin only")
        return p

    is_admin = Depends(admin)

    @r.post(
        "/auth/login",
        tags=["auth"],
        responses={
            429: {"description": "too many failed logins from this address (Retry-After)"},
            503: {"description": "no password-hashing slot free (Retry-After)"},
        },
    )
    def login(body: LoginIn, request: Request, response: Response) -> dict[str, Any]:
        sess = ctx.login(request, body.name, body.password)
        old = request.cookies.get(SESSION_COOKIE)
        if old:
            auth.revoke_session(store, old)
        ctx.set_session_cookie(response, sess)
        return {"user": {"name": sess.user.name, "role": sess.user.role}, "csrf_token": sess.csrf}

    @r.post("/auth/logout", tags=["auth"])
    def logout(response: Response, p: Principal = who) -> dict[str, bool]:
        """Ends the session, or revokes the API token the request was authenticated with."""
        if p.session is not None:
            auth.revoke_session(store, p.session.token)
        elif p.api_token is not None:
            auth.revoke_api_token(store, p.api_token)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return {"logged_out": True}

    @r.get("/me", tags=["auth"])
    def me(p: Principal = who) -> dict[str, Any]:
        return {"name": p.user.name, "role": p.user.role, "flags": settings.review.flags}

    @r.post(
        "/queue/claim",
        tags=["review"],
        responses={
            204: {"description": "the queue is empty"},
            500: {"description": "the item could not be shown and was set aside; claim again"},
        },
    )
    def claim(p: Principal = who) -> Any:
        item = ctx.claim(p.user)
        if item is None:
            return Response(status_code=204)
        # Rendered here, inside show(): a failure sets the item aside instead of leaving the
        # lease behind (every later claim would return the same held lease and fail again).
        return ctx.show(p.user, item, lambda: JSONResponse(item.to_json()), claim_failed)

    def claim_failed() -> JSONResponse:
        return JSONResponse(
            {"detail": "the claimed item could not be shown and was set aside; claim again"}, status_code=500
        )

    def record(p: Principal, body: LabelBody | SkipBody, label: queue.LabelIn, outcome: str) -> dict[str, bool]:
        queue.submit(store, p.user, body.episode_id, body.slot, body.fence, label, settings.review.flags)
        ctx.metrics.labels.labels(outcome).inc()
        return {"ok": True}

    @r.post("/items/label", tags=["review"])
    def label(body: LabelBody, p: Principal = who) -> dict[str, bool]:
        lab = queue.LabelIn(
            rating=body.rating,
            flags=tuple(body.flags),
            critique=body.critique,
            preference=body.preference,
            time_spent_ms=body.time_spent_ms,
        )
        return record(p, body, lab, "labelled")

    @r.post("/items/skip", tags=["review"])
    def skip(body: SkipBody, p: Principal = who) -> dict[str, bool]:
        lab = queue.LabelIn(skipped=True, skip_reason=body.reason, time_spent_ms=body.time_spent_ms)
        return record(p, body, lab, "skipped")

    @r.post("/items/release", tags=["review"])
    def release(body: ReleaseBody, p: Principal = who) -> dict[str, bool]:
        queue.release(store, p.user, body.episode_id, body.slot, body.fence)
        return {"ok": True}

    @r.get("/queue", tags=["review"])
    def queue_state(p: Principal = who) -> list[dict[str, Any]]:
        return queue.queue_depth(store)

    @r.get("/admin/summary", tags=["admin"])
    def summary(p: Principal = is_admin) -> dict[str, Any]:
        return stats.admin_summary(store, settings)

    @r.get("/admin/estimates/series", tags=["admin"])
    def series(
        stream: str = Query(max_length=128),
        bucket_s: int = Query(3600, ge=60, le=86400 * 31),
        p: Principal = is_admin,
    ) -> list[dict[str, Any]]:
        return stats.estimate_series(store, stream, bucket_s)

    @r.get("/admin/estimates/chart.svg", tags=["admin"], response_class=Response)
    def chart(bucket_s: int = Query(3600, ge=60, le=86400 * 31), p: Principal = is_admin) -> Response:
        from monitor.review.chart import estimates_svg

        streams = {q["stream"] for q in queue.queue_depth(store)}
        rows = stats.label_rows(store)
        svg = estimates_svg({s: stats.estimate_series(store, s, bucket_s, rows) for s in sorted(streams)})
        return Response(svg, media_type="image/svg+xml")

    def attachment(body: Any, media_type: str, filename: str) -> StreamingResponse:
        return StreamingResponse(
            body, media_type=media_type, headers={"Content-Disposition": f'attachment; filename="{filename}"'}
        )

    @r.get("/admin/export/pairs.jsonl", tags=["admin"], response_class=StreamingResponse)
    def export_pairs(p: Principal = is_admin) -> StreamingResponse:
        return attachment(export.jsonl(export.pair_records(store)), "application/x-ndjson", "pairs.jsonl")

    @r.get("/admin/export/ratings.jsonl", tags=["admin"], response_class=StreamingResponse)
    def export_ratings(p: Principal = is_admin) -> StreamingResponse:
        return attachment(export.jsonl(export.rating_records(store)), "application/x-ndjson", "ratings.jsonl")

    @r.get("/admin/export/ratings.csv", tags=["admin"], response_class=StreamingResponse)
    def export_csv(p: Principal = is_admin) -> StreamingResponse:
        return attachment(export.csv_rows(export.rating_records(store)), "text/csv; charset=utf-8", "ratings.csv")

    @r.get("/admin/users", tags=["admin"])
    def users(p: Principal = is_admin) -> list[dict[str, Any]]:
        return [{"name": u.name, "role": u.role} for u in auth.list_users(store)]

    @r.post("/admin/users", tags=["admin"], status_code=201)
    def add_user(body: UserIn, p: Principal = is_admin) -> Any:
        password = body.password or auth.generate_password()
        try:
            u = auth.create_user(store, body.name, body.role, password, gate=ctx.gate)
        except ValueError as e:
            if "exists" in str(e):
                raise HTTPException(409, str(e)) from None
            return JSONResponse(validation_detail(("body", "name"), str(e)), status_code=422)
        out: dict[str, Any] = {"name": u.name, "role": u.role}
        if body.password is None:
            out["password"] = password  # shown once
        return out

    @r.post("/admin/users/{name}/tokens", tags=["admin"], status_code=201)
    def add_token(name: str, body: TokenIn, p: Principal = is_admin) -> dict[str, str]:
        u = auth.find_user(store, name)
        if u is None:
            raise HTTPException(404, "no such user")
        return {"token": auth.create_api_token(store, u, body.name)}

    return r
