"""The page toolkit of the review app: templates, text rendering, and what every page route needs.

The page routes themselves live in :mod:`monitor.review.routes` (``pages_auth``,
``pages_review``, ``pages_admin``); this module holds what they share: the Jinja environment
and its filters, :func:`render` and :func:`redirect`, and the dependencies that sign a request
in (:data:`SignedIn`, :data:`AdminSession`, :data:`FormSession`). A dependency refuses by
raising :class:`LoginRequired` (a redirect to the login page) or :class:`PageRefused` (an
error page); :func:`install_handlers` turns both into responses.

Security notes:

* Every template is autoescaped; model text (prompt, responses, metadata) is never
  marked safe. Fenced code blocks are split out in Python (:func:`split_fences`)
  and rendered as ``<pre><code>`` with escaped content. The messages of a conversation
  are rendered as a small, escaping Markdown subset (:mod:`monitor.review.markdown`).
* No inline script or style anywhere (the Content-Security-Policy forbids them):
  behaviour lives in ``static/review.js``, looks in ``static/app.css``; the admin
  chart is SVG with presentation attributes only (:mod:`monitor.review.chart`).
* Every state-changing form carries a CSRF token: the session's for signed-in
  forms, a signed nonce bound to an HttpOnly cookie for the login form.
* Blind review: the reviewer page shows the episode only, never another
  reviewer's label or a model score; metadata and the policy version only as far as
  the stream's blinding allows (:mod:`monitor.review.queue` applies it).
* Invisible and direction-changing characters in model text are shown as visible
  markers (:func:`monitor.review.display.reveal`), so reviewers see what was emitted.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, Undefined

from monitor.review.auth import Session, same_secret
from monitor.review.context import Ctx
from monitor.review.conversation import shown
from monitor.review.display import reveal
from monitor.review.markdown import render_markdown, split_fences

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"

# Keys that the reviewer page already uses: a flag never gets one of these.
RESERVED_KEYS = frozenset("abts")
FORM_EXPIRED = "The form expired. Reload the page and try again."


# -- text rendering -----------------------------------------------------------------------


def flag_keys(flags: list[str]) -> dict[str, str]:
    """A single-letter shortcut per flag: its first free letter (harmful -> h, refusal -> r...)."""
    taken = set(RESERVED_KEYS)
    out: dict[str, str] = {}
    for f in flags:
        for ch in f:
            if ch.isalpha() and ch not in taken:
                taken.add(ch)
                out[f] = ch
                break
    return out


# -- template filters ---------------------------------------------------------------------


def _missing(v: Any) -> bool:
    return v is None or isinstance(v, Undefined) or (isinstance(v, float) and not math.isfinite(v))


def f_num(v: Any, digits: int = 2) -> str:
    if _missing(v) or isinstance(v, bool):
        return "n/a"
    if isinstance(v, int):
        return str(v)
    try:
        return f"{float(v):.{digits}f}"
    except (TypeError, ValueError):
        return "n/a"


def f_pct(v: Any, digits: int = 1) -> str:
    if _missing(v) or isinstance(v, bool):
        return "n/a"
    try:
        return f"{100 * float(v):.{digits}f}%"
    except (TypeError, ValueError):
        return "n/a"


def f_duration(v: Any) -> str:
    if _missing(v) or isinstance(v, bool):
        return "n/a"
    try:
        s = max(0, round(float(v)))
    except (TypeError, ValueError):
        return "n/a"
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def f_utc(v: Any) -> str:
    if _missing(v) or isinstance(v, bool):
        return "n/a"
    try:
        return datetime.fromtimestamp(float(v), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (TypeError, ValueError, OverflowError, OSError):
        return "n/a"


def f_cell(v: Any) -> str:
    """A value of unknown shape (drift events, reward-model agreement) as short text."""
    if _missing(v):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, str | int | bool):
        return str(v)
    try:
        text = json.dumps(v, ensure_ascii=False, sort_keys=True, default=str)
    except (TypeError, ValueError):
        text = str(v)
    return text if len(text) <= 300 else text[:299] + "…"


def pretty_json(v: Any) -> str:
    try:
        return json.dumps(v, indent=2, ensure_ascii=False, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return str(v)


@cache
def environment() -> Environment:
    """The templates, loaded once per process."""
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATES_DIR)),
        autoescape=True,  # every template, whatever its name
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(num=f_num, pct=f_pct, duration=f_duration, utc=f_utc, cell=f_cell, reveal=reveal)
    env.globals.update(split_fences=split_fences, pretty_json=pretty_json, markdown=render_markdown, shown=shown)
    return env


# -- responses ----------------------------------------------------------------------------


def render(template: str, status: int = 200, session: Session | None = None, **values: Any) -> HTMLResponse:
    html = (
        environment().get_template(template).render(session=session, user=session.user if session else None, **values)
    )
    resp = HTMLResponse(html, status_code=status)
    resp.headers["Cache-Control"] = "no-store"
    return resp


def error_page(status: int, session: Session | None, title: str, message: str) -> HTMLResponse:
    return render("error.html", status, session, title=title, message=message)


def redirect(url: str) -> RedirectResponse:
    resp = RedirectResponse(url, status_code=303)
    resp.headers["Cache-Control"] = "no-store"
    return resp


# -- refusals -----------------------------------------------------------------------------


class LoginRequired(Exception):
    """No live session: the page answers with a redirect to the login page."""


class PageRefused(Exception):
    """The page answers with an error page (403 forbidden, 400 malformed form...)."""

    def __init__(self, status: int, session: Session | None, title: str, message: str):
        super().__init__(message)
        self.status, self.session, self.title, self.message = status, session, title, message


async def login_required(_request: Request, _exc: LoginRequired) -> Response:
    return redirect("/login")


async def page_refused(_request: Request, exc: PageRefused) -> Response:
    return error_page(exc.status, exc.session, exc.title, exc.message)


def install_handlers(app: FastAPI) -> None:
    """Answer the page dependencies' refusals (only page routes raise them)."""
    app.exception_handler(LoginRequired)(login_required)
    app.exception_handler(PageRefused)(page_refused)


# -- dependencies -------------------------------------------------------------------------


def optional_session(request: Request, ctx: Ctx) -> Session | None:
    return ctx.session(request)


OptionalSession = Annotated[Session | None, Depends(optional_session)]


async def signed_in(session: OptionalSession) -> Session:
    if session is None:
        raise LoginRequired
    return session


SignedIn = Annotated[Session, Depends(signed_in)]


async def admin_session(session: SignedIn) -> Session:
    if not session.user.is_admin:
        raise PageRefused(403, session, "Forbidden", "This page is for administrators.")
    return session


AdminSession = Annotated[Session, Depends(admin_session)]


def check_form_csrf(session: Session, token: str | None) -> None:
    """Refuses (403) a form of a signed-in page that lacks the session's CSRF token."""
    if not (token and same_secret(session.csrf, token)):
        raise PageRefused(403, session, "Forbidden", FORM_EXPIRED)


async def form_session(session: SignedIn, csrf: Annotated[str, Form()] = "") -> Session:
    """The session of a signed-in page's form, its CSRF token checked."""
    check_form_csrf(session, csrf)
    return session


FormSession = Annotated[Session, Depends(form_session)]
