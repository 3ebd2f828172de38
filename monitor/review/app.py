"""The review web app: JSON API under /api/v1, server-rendered pages, strict security headers.

Every UI action is also an API call. Clients authenticate with the session
cookie (browsers; unsafe methods then need the ``X-CSRF-Token`` header, or the
form field on pages) or with ``Authorization: Bearer <api token>`` (machines).

:func:`create_app` is the entry point. The routes are in :mod:`monitor.review.routes` (one
module per resource), what they share in :mod:`monitor.review.context` (the app's state,
reached through a dependency), :mod:`monitor.review.deps` (who is calling the API),
:mod:`monitor.review.pages` (templates and the pages' sign-in) and
:mod:`monitor.review.schemas` (the API's request and response models).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from monitor.config import Settings
from monitor.review import auth, pages, queue
from monitor.review.context import SESSION_COOKIE, Clock, ReviewContext
from monitor.review.routes import API_ROUTERS, PAGE_ROUTERS
from monitor.review.schemas import validation_detail
from monitor.review.security import CSP, HSTS, SECURITY_HEADERS, BodyLimit, SecurityHeaders, headers_for
from monitor.review.text_guard import StorableText
from monitor.store import Store

__all__ = ["CSP", "HSTS", "SECURITY_HEADERS", "SESSION_COOKIE", "create_app"]

API_PREFIX = "/api/v1"
STATIC = Path(__file__).with_name("static")


def create_app(
    settings: Settings, store: Store | None = None, registry: Any = None, clock: Clock = time.time
) -> FastAPI:
    """The review app. Refuses to start outside dev mode without a real secret key.

    ``registry``: the Prometheus registry for the review metrics (default: a new one);
    ``clock``: the time for leases, login backoff and sessions (tests pass one they move)."""
    settings.review_secret()
    store = store if store is not None else Store.open(settings.database)
    app = FastAPI(
        title="oversight review API",
        version="1",
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=None,  # Swagger UI needs a CDN and inline scripts: not under this CSP
        redoc_url=None,
    )
    app.state.review = ReviewContext(settings, store, registry, clock)
    add_middleware(app, settings)
    add_error_handlers(app)
    # No /metrics here: it is served on its own listener (review.metrics_host/_port, see
    # monitor.review.server.start_metrics), so the public review port does not expose it.
    for router in API_ROUTERS:
        app.include_router(router, prefix=API_PREFIX)
    for router in PAGE_ROUTERS:
        app.include_router(router)
    if STATIC.is_dir():
        from fastapi.staticfiles import StaticFiles

        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def add_middleware(app: FastAPI, settings: Settings) -> None:
    # Innermost: it reads the body whole, so inside the limit, and answers the limit's 413.
    app.add_middleware(StorableText)
    # Its own 413 goes out through the security headers.
    app.add_middleware(BodyLimit, limit=settings.review.max_request_bytes)
    # Added before the proxy-headers middleware, so inside it: every response gets the headers.
    app.add_middleware(SecurityHeaders, headers=headers_for(settings.dev))
    if settings.review.trusted_proxies:
        # Outermost: behind an ingress every request comes from the proxy's address, and login
        # throttling per address would then be per user name, which anyone could trigger.
        from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=settings.review.trusted_proxies)


async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """A refused request body, in FastAPI's shape less the refused values. FastAPI's own handler
    copies each one (``input``) into the answer: a NaN, an infinity or a lone surrogate, which
    Python's JSON parser accepts, then failed to encode (a 500 with a traceback, before any
    sign-in), and a 60 MB field came back as a 60 MB answer."""
    detail = [
        {
            "type": str(e.get("type", "")),
            "loc": [_shown(part) for part in e.get("loc", ())],
            "msg": _shown(e.get("msg", "")),
        }
        for e in exc.errors()[:20]
    ]
    return JSONResponse({"detail": detail}, status_code=422)


def _shown(value: Any) -> Any:
    """A part of an error as it may be sent back: a number as is, text cut to 200 characters and
    made encodable (a field name a client chose may hold a lone surrogate)."""
    if isinstance(value, int):
        return value
    return str(value)[:200].encode("utf-8", "replace").decode("utf-8")


async def queue_error(request: Request, exc: queue.QueueError) -> JSONResponse:
    if exc.status == 409:
        request.app.state.review.metrics.conflicts.inc()
    # A message may quote what the client sent (an unknown flag): made encodable like any echo.
    if exc.status == 422:
        # Same shape as FastAPI's own validation errors, as the OpenAPI document says.
        return JSONResponse(validation_detail(("body",), _shown(exc)), status_code=422)
    return JSONResponse({"detail": _shown(exc)}, status_code=exc.status)


async def auth_error(_request: Request, exc: auth.AuthError) -> JSONResponse:
    return JSONResponse({"detail": _shown(exc)}, status_code=exc.status, headers=exc.headers)


def add_error_handlers(app: FastAPI) -> None:
    app.exception_handler(RequestValidationError)(validation_error)
    app.exception_handler(queue.QueueError)(queue_error)
    app.exception_handler(auth.AuthError)(auth_error)
    pages.install_handlers(app)
