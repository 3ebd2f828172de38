"""The security headers of every review response, and the middleware that adds them.

Model outputs are attacker-controlled text shown in these pages: the Content-Security-Policy
allows no inline script or style and nothing from elsewhere, so an escaping bug is not yet an
XSS. The headers go on *every* response, a 500 for an unhandled error included.
"""

from __future__ import annotations

import logging

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

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


def headers_for(dev: bool) -> dict[str, str]:
    """The headers every response carries: HSTS only outside dev mode (plain HTTP in development)."""
    return SECURITY_HEADERS if dev else {**SECURITY_HEADERS, "Strict-Transport-Security": HSTS}


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
            # %r: the path is the client's text, and a decoded newline would forge a log line.
            log.exception("unhandled error answering %s %r", scope.get("method"), path)
            if started:
                raise  # headers already went out with the response's start
            await JSONResponse({"detail": "internal server error"}, status_code=500)(scope, receive, send_with_headers)


class BodyLimit:
    """Refuses (413) a request body over ``limit`` bytes (``review.max_request_bytes``): at once by
    its Content-Length, else as it arrives. No review request needs more than a guidelines
    document (50,000 characters), and without a cap a sign-in with a 60 MB password was read,
    parsed and held whole (about 125 MB a request), before any user was known.

    Past the limit the app's ``receive`` raises HTTPException(413): FastAPI lets one raised while
    it reads a body through, and answers it as any other refusal."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await JSONResponse({"detail": self.detail()}, status_code=413)(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise HTTPException(413, self.detail())
            return message

        await self.app(scope, limited, send)

    def detail(self) -> str:
        return f"request body over {self.limit} bytes (review.max_request_bytes)"
