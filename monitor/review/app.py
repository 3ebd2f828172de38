"""The review web app: JSON API under /api/v1, server-rendered pages, strict security headers.

Every UI action is also an API call. Clients authenticate with the session
cookie (browsers; unsafe methods then need the ``X-CSRF-Token`` header, or the
form field on pages) or with ``Authorization: Bearer <api token>`` (machines).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from monitor.config import Settings
from monitor.review import auth, export, queue, stats
from monitor.store import Store

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
STATIC = Path(__file__).with_name("static")


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

    def session(self, request: Request) -> auth.Session | None:
        return auth.session_from_token(self.store, request.cookies.get(SESSION_COOKIE))

    def principal(self, request: Request) -> Principal:
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            user = auth.user_from_api_token(self.store, header[7:].strip())
            if user is None:
                raise HTTPException(401, "invalid API token", headers={"WWW-Authenticate": "Bearer"})
            return Principal(user, None)
        sess = self.session(request)
        if sess is None:
            raise HTTPException(401, "not logged in", headers={"WWW-Authenticate": "Bearer"})
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            import hmac

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

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        for k, v in SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        if not request.url.path.startswith("/static/"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response

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
        ctx.metrics.logins.labels("rate_limited" if exc.status == 429 else "failed").inc()
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)

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

    @r.post("/auth/login", tags=["auth"])
    def login(body: LoginIn, request: Request, response: Response) -> dict[str, Any]:
        cfg = settings.review
        address = request.client.host if request.client else "unknown"
        sess = auth.login(
            store,
            body.name,
            body.password,
            address,
            max_failures=cfg.login_max_failures,
            window_s=cfg.login_window_s,
            hours=cfg.session_hours,
            max_failures_per_address=cfg.login_max_failures_per_address,
        )
        old = request.cookies.get(SESSION_COOKIE)
        if old:
            auth.revoke_session(store, old)
        ctx.set_session_cookie(response, sess)
        ctx.metrics.logins.labels("ok").inc()
        return {"user": {"name": sess.user.name, "role": sess.user.role}, "csrf_token": sess.csrf}

    @r.post("/auth/logout", tags=["auth"])
    def logout(response: Response, p: Principal = who) -> dict[str, bool]:
        if p.session is not None:
            auth.revoke_session(store, p.session.token)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return {"logged_out": True}

    @r.get("/me", tags=["auth"])
    def me(p: Principal = who) -> dict[str, Any]:
        return {"name": p.user.name, "role": p.user.role, "flags": settings.review.flags}

    @r.post("/queue/claim", tags=["review"], responses={204: {"description": "the queue is empty"}})
    def claim(p: Principal = who) -> Any:
        item = queue.claim(store, p.user, settings.review.lease_seconds, ctx.key)
        if item is None:
            return Response(status_code=204)
        return item.to_json()

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
            u = auth.create_user(store, body.name, body.role, password)
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
