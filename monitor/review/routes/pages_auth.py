"""/login and /logout: the sign-in form (CSRF by a signed nonce in a cookie) and signing out."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, Response

from monitor.review import auth
from monitor.review.context import SESSION_COOKIE, Ctx, ReviewContext
from monitor.review.pages import OptionalSession, check_form_csrf, redirect, render

router = APIRouter(include_in_schema=False)

LOGIN_CSRF_COOKIE = "oversight_login_csrf"
LOGIN_CSRF_MAX_AGE = 3600
LOGIN_ERRORS = {
    401: "Wrong name or password.",
    429: "Too many failed sign-in attempts. Try again later.",
    503: "The server is busy. Try again in a moment.",
}


def login_page(ctx: ReviewContext, status: int = 200, error: str | None = None, name: str = "") -> HTMLResponse:
    """The form with a fresh CSRF token, its nonce in an HttpOnly cookie only /login sees."""
    nonce, token = auth.new_login_csrf(ctx.secret)
    resp = render("login.html", status, csrf=token, error=error, name=name[:64])
    ctx.set_cookie(resp, LOGIN_CSRF_COOKIE, nonce, LOGIN_CSRF_MAX_AGE, path="/login")
    return resp


@router.get("/login", response_class=HTMLResponse)
def get_login(ctx: Ctx, session: OptionalSession) -> Response:
    return redirect("/") if session is not None else login_page(ctx)


@router.post("/login", response_class=HTMLResponse)
def post_login(
    request: Request,
    ctx: Ctx,
    name: Annotated[str, Form()] = "",
    password: Annotated[str, Form()] = "",
    csrf: Annotated[str, Form()] = "",
) -> Response:
    if not auth.check_login_csrf(ctx.secret, request.cookies.get(LOGIN_CSRF_COOKIE), csrf):
        return login_page(ctx, 403, "The login form expired. Please try again.", name)
    try:
        session = ctx.login(request, name, password)
    except auth.AuthError as e:
        refused = login_page(ctx, e.status, LOGIN_ERRORS.get(e.status, LOGIN_ERRORS[401]), name)
        refused.headers.update(e.headers)
        return refused
    resp = redirect("/")
    ctx.start_session(request, resp, session)
    ctx.delete_cookie(resp, LOGIN_CSRF_COOKIE, path="/login")
    return resp


@router.post("/logout")
def post_logout(ctx: Ctx, session: OptionalSession, csrf: Annotated[str, Form()] = "") -> Response:
    """Signing out needs the session's CSRF token; without a session it just goes to /login."""
    if session is not None:
        check_form_csrf(session, csrf)
        auth.revoke_session(ctx.store, session.token, now=ctx.now())
    resp = redirect("/login")
    ctx.delete_cookie(resp, SESSION_COOKIE)
    return resp
