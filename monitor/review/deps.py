"""Who is calling the API: FastAPI dependencies for the routes under /api/v1.

A caller authenticates with ``Authorization: Bearer <api token>`` (machines) or with the
session cookie (browsers). A cookie is sent by the browser whatever page asks, so a cookie
session's unsafe requests must also carry the session's CSRF token in ``X-CSRF-Token``; a
Bearer token is never sent by a browser on its own and needs none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from monitor.review import auth
from monitor.review.context import Ctx

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
# Every 401 says how to authenticate: browsers are sent to the login page, not asked for a password.
CHALLENGE = {"WWW-Authenticate": "Bearer"}


@dataclass(frozen=True)
class Principal:
    user: auth.User
    session: auth.Session | None  # None when authenticated by API token
    api_token: str | None = None  # the bearer token, when authenticated by one


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    return header[7:].strip() if header.lower().startswith("bearer ") else None


def check_csrf_header(request: Request, session: auth.Session) -> None:
    """Refuses (403) an unsafe request of a cookie session without the session's CSRF token."""
    if request.method in SAFE_METHODS:
        return
    sent = request.headers.get("x-csrf-token", "")
    if not auth.same_secret(session.csrf, sent):
        raise HTTPException(403, "missing or wrong X-CSRF-Token header")


def principal(request: Request, ctx: Ctx) -> Principal:
    """The caller: by Bearer token if the request has one, else by session cookie (with CSRF)."""
    token = bearer_token(request)
    if token is not None:
        user = auth.user_from_api_token(ctx.store, token)
        if user is None:
            raise HTTPException(401, "invalid API token", headers=CHALLENGE)
        return Principal(user, None, token)
    sess = ctx.session(request)
    if sess is None:
        raise HTTPException(401, "not logged in", headers=CHALLENGE)
    check_csrf_header(request, sess)
    return Principal(sess.user, sess)


Who = Annotated[Principal, Depends(principal)]


async def admin(p: Who) -> Principal:
    if not p.user.is_admin:
        raise HTTPException(403, "admin only")
    return p


Admin = Annotated[Principal, Depends(admin)]
