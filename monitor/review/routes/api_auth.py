"""/api/v1/auth/login, /auth/logout, /me: sessions for browsers, the caller's identity."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from monitor.review import auth
from monitor.review.context import SESSION_COOKIE, Ctx
from monitor.review.deps import Who
from monitor.review.schemas import BODY, SIGNED_IN, LoginIn, LoginOut, LogoutOut, MeOut, UserOut, refusal

router = APIRouter(tags=["auth"])


@router.post(
    "/auth/login",
    responses={
        **BODY,
        401: refusal("wrong name or password (the same answer for an unknown name)"),
        429: refusal("too many failed logins from this address (Retry-After)"),
        503: refusal("no password-hashing slot free (Retry-After)"),
    },
)
def login(body: LoginIn, request: Request, response: Response, ctx: Ctx) -> LoginOut:
    """Opens a session: the cookie, and the CSRF token its unsafe requests must send."""
    sess = ctx.login(request, body.name, body.password)
    ctx.start_session(request, response, sess)
    return LoginOut(user=UserOut(name=sess.user.name, role=sess.user.role), csrf_token=sess.csrf)


@router.post("/auth/logout", responses=SIGNED_IN)
def logout(response: Response, p: Who, ctx: Ctx) -> LogoutOut:
    """Ends the session, or revokes the API token the request was authenticated with."""
    if p.session is not None:
        auth.revoke_session(ctx.store, p.session.token, now=ctx.now())
    elif p.api_token is not None:
        auth.revoke_api_token(ctx.store, p.api_token, now=ctx.now())
    ctx.delete_cookie(response, SESSION_COOKIE)
    return LogoutOut(logged_out=True)


@router.get("/me", responses=SIGNED_IN)
def me(p: Who, ctx: Ctx) -> MeOut:
    return MeOut(name=p.user.name, role=p.user.role, flags=ctx.settings.review.flags)
