"""The security headers of every review response, and the middleware that adds them.

Model outputs are attacker-controlled text shown in these pages: the Content-Security-Policy
allows no inline script or style and nothing from elsewhere, so an escaping bug is not yet an
XSS. The headers go on *every* response, a 500 for an unhandled error included.
"""

from __future__ import annotations

import logging

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
            log.exception("unhandled error answering %s %s", scope.get("method"), path)
            if started:
                raise  # headers already went out with the response's start
            await JSONResponse({"detail": "internal server error"}, status_code=500)(scope, receive, send_with_headers)
