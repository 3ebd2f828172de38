"""Server-rendered HTML pages of the review app: login, the reviewer's item, the admin dashboard.

Security notes:

* Every template is autoescaped; model text (prompt, responses, metadata) is never
  marked safe. Fenced code blocks are split out in Python (:func:`split_fences`)
  and rendered as ``<pre><code>`` with escaped content.
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

import hmac
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, Undefined
from markupsafe import Markup

from monitor.config import Settings
from monitor.review import auth
from monitor.review import queue as q
from monitor.review.auth import Session, User
from monitor.review.display import reveal
from monitor.store import Store

HERE = Path(__file__).resolve().parent
TEMPLATES_DIR = HERE / "templates"
STATIC_DIR = HERE / "static"

SESSION_COOKIE = "oversight_session"
LOGIN_CSRF_COOKIE = "oversight_login_csrf"
FLASH_COOKIE = "oversight_flash"
LOGIN_CSRF_MAX_AGE = 3600

# Flash messages travel as a fixed code in a cookie, never as free text.
FLASHES = {
    "expired": "Your lease expired; here is the next item.",
    "gone": "That item is no longer available; here is the next item.",
    "skipped": "Skipped; the item goes back to the queue for someone else.",
}
# Keys that the reviewer page already uses: a flag never gets one of these.
RESERVED_KEYS = frozenset("abts")
EXPORTS = (
    ("/api/v1/admin/export/pairs.jsonl", "Preference pairs (JSONL)"),
    ("/api/v1/admin/export/ratings.jsonl", "Ratings (JSONL)"),
    ("/api/v1/admin/export/ratings.csv", "Ratings (CSV)"),
)
RATING_ANCHORS = {1: "worst", 4: "neutral", 7: "best"}
LOGIN_ERRORS = {
    401: "Wrong name or password.",
    429: "Too many failed sign-in attempts. Try again later.",
    503: "The server is busy. Try again in a moment.",
}


@dataclass(frozen=True)
class PageContext:
    """What the pages need from the app.

    ``admin_summary`` and ``estimate_series`` default to the functions in
    :mod:`monitor.review.stats` (imported on first use).
    """

    settings: Settings
    store: Store
    secret: bytes  # signs the login CSRF token
    key: bytes  # sampling key: keyed order of the two responses of a pair
    dev: bool  # cookies without Secure (plain-HTTP development server)
    current_session: Callable[[Request], Session | None]
    login: Callable[[Request, str, str], Session]  # raises auth.AuthError (401, 429, 503)
    claim: Callable[[User], q.Item | None]  # with the stream's blinding
    # show(user, item, build, failed): build() the response for a claimed item; if that fails,
    # set the item aside and answer failed().
    show: Callable[[User, q.Item, Callable[[], Response], Callable[[], Response]], Response]
    admin_summary: Callable[[], dict[str, Any]] | None = None
    estimate_series: Callable[[str], list[dict[str, Any]]] | None = None
    metrics: Any = None  # monitor.review.metrics.ReviewMetrics: login/label/conflict counters


# -- text rendering -----------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    code: bool
    text: str
    lang: str = ""


_OPEN_FENCE = re.compile(r"^[ \t]{0,3}(`{3,})([^`\r\n]*)\r?\n?$")
_LANG = re.compile(r"[A-Za-z0-9_+#.-]{1,32}")


def split_fences(text: str) -> list[Segment]:
    """Split model text into prose and fenced code blocks (CommonMark-style backtick fences).

    Only the structure is parsed: the text of every segment is returned verbatim for the
    template to escape. An unclosed fence runs to the end of the text.
    """
    segments: list[Segment] = []
    buf: list[str] = []
    fence: str | None = None
    lang = ""

    def flush(code: bool) -> None:
        chunk = "".join(buf)
        buf.clear()
        if code:
            segments.append(Segment(True, chunk.removesuffix("\n").removesuffix("\r"), lang))
        elif chunk.strip():
            segments.append(Segment(False, chunk.removesuffix("\n").removesuffix("\r")))

    for line in text.splitlines(keepends=True):
        if fence is None:
            m = _OPEN_FENCE.match(line)
            if m:
                flush(False)
                fence = m.group(1)
                info = m.group(2).strip().split(maxsplit=1)
                lang = info[0] if info and _LANG.fullmatch(info[0]) else ""
                continue
            buf.append(line)
        else:
            stripped = line.strip()
            if stripped.startswith(fence) and not stripped.strip("`") and len(line) - len(line.lstrip(" ")) <= 3:
                flush(True)
                fence = None
                lang = ""
                continue
            buf.append(line)
    flush(fence is not None)
    if not segments:
        segments.append(Segment(False, text))
    return segments


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


def _env() -> Environment:
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATES_DIR)),
        autoescape=True,  # every template, whatever its name
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(num=f_num, pct=f_pct, duration=f_duration, utc=f_utc, cell=f_cell, reveal=reveal)
    env.globals.update(split_fences=split_fences, pretty_json=pretty_json)
    return env


# -- the router ---------------------------------------------------------------------------


def make_router(ctx: PageContext) -> APIRouter:
    env = _env()
    settings, store = ctx.settings, ctx.store
    rc = settings.review
    flags = list(rc.flags)
    keys = flag_keys(flags)
    router = APIRouter(include_in_schema=False)

    def render(
        request: Request, template: str, status: int = 200, session: Session | None = None, **values: Any
    ) -> HTMLResponse:
        html = env.get_template(template).render(session=session, user=session.user if session else None, **values)
        resp = HTMLResponse(html, status_code=status)
        resp.headers["Cache-Control"] = "no-store"
        return resp

    def set_cookie(resp: Response, name: str, value: str, max_age: int, path: str = "/") -> None:
        resp.set_cookie(name, value, max_age=max_age, path=path, httponly=True, samesite="strict", secure=not ctx.dev)

    def delete_cookie(resp: Response, name: str, path: str = "/") -> None:
        resp.delete_cookie(name, path=path, httponly=True, samesite="strict", secure=not ctx.dev)

    def redirect(url: str) -> RedirectResponse:
        resp = RedirectResponse(url, status_code=303)
        resp.headers["Cache-Control"] = "no-store"
        return resp

    def login_page(request: Request, status: int = 200, error: str | None = None, name: str = "") -> HTMLResponse:
        nonce, token = auth.new_login_csrf(ctx.secret)
        resp = render(request, "login.html", status, csrf=token, error=error, name=name[:64])
        set_cookie(resp, LOGIN_CSRF_COOKIE, nonce, LOGIN_CSRF_MAX_AGE, path="/login")
        return resp

    def count(counter: str, label: str | None = None) -> None:
        m = getattr(ctx.metrics, counter, None) if ctx.metrics is not None else None
        if m is not None:
            (m.labels(label) if label is not None else m).inc()

    def csrf_ok(session: Session, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(session.csrf.encode(), (token or "").encode())

    def forbidden(request: Request, session: Session | None, message: str) -> HTMLResponse:
        return render(request, "error.html", 403, session, title="Forbidden", message=message)

    def review_page(
        request: Request,
        session: Session,
        status: int = 200,
        error: str | None = None,
        notice: str | None = None,
        form: dict[str, Any] | None = None,
    ) -> Response:
        item = ctx.claim(session.user)

        def page() -> HTMLResponse:
            pair: list[dict[str, Any]] = []
            if item is not None and item.alternative is not None:
                shown = [("response", item.response), ("alternative", item.alternative)]
                if item.alternative_first:
                    shown.reverse()
                pair = [{"value": v, "text": text, "letter": "AB"[i]} for i, (v, text) in enumerate(shown)]
            return render(
                request,
                "review.html",
                status,
                session,
                item=item,
                pair=pair,
                invisible=sum(item.invisible_characters().values()) if item is not None else 0,
                flags=flags,
                flag_keys=keys,
                anchors=RATING_ANCHORS,
                error=error,
                notice=notice,
                form=form or {},
                now=time.time(),
                lease_minutes=max(1, round(rc.lease_seconds / 60)),
                max_critique=q.MAX_CRITIQUE,
                max_skip=q.MAX_SKIP_REASON,
            )

        def failed() -> HTMLResponse:
            return render(
                request,
                "error.html",
                500,
                session,
                title="This item could not be shown",
                message="It was set aside for an administrator. Reload the page for the next item.",
            )

        return page() if item is None else ctx.show(session.user, item, page, failed)

    @router.get("/login", response_class=HTMLResponse)
    def get_login(request: Request) -> Response:
        if ctx.current_session(request) is not None:
            return redirect("/")
        return login_page(request)

    @router.post("/login", response_class=HTMLResponse)
    def post_login(
        request: Request,
        name: Annotated[str, Form()] = "",
        password: Annotated[str, Form()] = "",
        csrf: Annotated[str, Form()] = "",
    ) -> Response:
        nonce = request.cookies.get(LOGIN_CSRF_COOKIE)
        if not auth.check_login_csrf(ctx.secret, nonce, csrf):
            return login_page(request, 403, "The login form expired. Please try again.", name)
        try:
            session = ctx.login(request, name, password)
        except auth.AuthError as e:
            refused = login_page(request, e.status, LOGIN_ERRORS.get(e.status, LOGIN_ERRORS[401]), name)
            refused.headers.update(e.headers)
            return refused
        old = request.cookies.get(SESSION_COOKIE)
        if old:
            auth.revoke_session(store, old)
        resp = redirect("/")
        set_cookie(resp, SESSION_COOKIE, session.token, max(1, int(session.expires_at - time.time())))
        delete_cookie(resp, LOGIN_CSRF_COOKIE, path="/login")
        return resp

    @router.post("/logout")
    def post_logout(request: Request, csrf: Annotated[str, Form()] = "") -> Response:
        session = ctx.current_session(request)
        if session is not None:
            if not csrf_ok(session, csrf):
                return forbidden(request, session, "The form expired. Reload the page and try again.")
            auth.revoke_session(store, session.token)
        resp = redirect("/login")
        delete_cookie(resp, SESSION_COOKIE)
        return resp

    @router.get("/", response_class=HTMLResponse)
    def get_review(request: Request) -> Response:
        session = ctx.current_session(request)
        if session is None:
            return redirect("/login")
        code = request.cookies.get(FLASH_COOKIE)
        resp = review_page(request, session, notice=FLASHES.get(code or ""))
        if code is not None:
            delete_cookie(resp, FLASH_COOKIE)
        return resp

    def lease_of(episode_id: str, slot: str, fence: str) -> tuple[str, int, int] | None:
        try:
            return episode_id, int(slot), int(fence)
        except ValueError:
            return None

    def spent(ms: str) -> int:
        try:
            return min(max(int(float(ms)), 0), 86_400_000)
        except (ValueError, OverflowError):
            return 0

    def after_error(request: Request, session: Session, e: q.QueueError, form: dict[str, Any]) -> Response:
        if e.status in (404, 409):
            if e.status == 409:
                count("conflicts")
            resp = redirect("/")
            set_cookie(resp, FLASH_COOKIE, "expired" if e.status == 409 else "gone", 60)
            return resp
        return review_page(request, session, 422, error=str(e), form=form)

    def form_lease(
        request: Request, episode_id: str, slot: str, fence: str, csrf: str
    ) -> Response | tuple[Session, tuple[str, int, int]]:
        """The signed-in session and the lease a review form names, or the response refusing it."""
        session = ctx.current_session(request)
        if session is None:
            return redirect("/login")
        if not csrf_ok(session, csrf):
            return forbidden(request, session, "The form expired. Reload the page and try again.")
        lease = lease_of(episode_id, slot, fence)
        if lease is None:
            return render(request, "error.html", 400, session, title="Bad request", message="Malformed form.")
        return session, lease

    @router.post("/review/submit")
    def post_submit(
        request: Request,
        episode_id: Annotated[str, Form()] = "",
        slot: Annotated[str, Form()] = "",
        fence: Annotated[str, Form()] = "",
        csrf: Annotated[str, Form()] = "",
        rating: Annotated[str, Form()] = "",
        flags_: Annotated[list[str], Form(alias="flags")] = [],  # noqa: B006 - FastAPI copies defaults
        critique: Annotated[str, Form()] = "",
        preference: Annotated[str, Form()] = "",
        time_spent_ms: Annotated[str, Form()] = "",
    ) -> Response:
        checked = form_lease(request, episode_id, slot, fence, csrf)
        if isinstance(checked, Response):
            return checked
        session, lease = checked
        form = {"rating": rating, "flags": flags_, "critique": critique, "preference": preference}
        try:
            r: int | None = int(rating) if rating.strip() else None
        except ValueError:
            return review_page(request, session, 422, error="rating must be an integer from 1 to 7", form=form)
        label = q.LabelIn(
            rating=r,
            flags=tuple(flags_),
            critique=critique.replace("\r\n", "\n"),
            preference=preference or None,
            time_spent_ms=spent(time_spent_ms),
        )
        try:
            q.submit(store, session.user, *lease, label, flags)
        except q.QueueError as e:
            return after_error(request, session, e, form)
        count("labels", "labelled")
        return redirect("/")

    @router.post("/review/skip")
    def post_skip(
        request: Request,
        episode_id: Annotated[str, Form()] = "",
        slot: Annotated[str, Form()] = "",
        fence: Annotated[str, Form()] = "",
        csrf: Annotated[str, Form()] = "",
        skip_reason: Annotated[str, Form()] = "",
        time_spent_ms: Annotated[str, Form()] = "",
    ) -> Response:
        checked = form_lease(request, episode_id, slot, fence, csrf)
        if isinstance(checked, Response):
            return checked
        session, lease = checked
        label = q.LabelIn(skipped=True, skip_reason=skip_reason.strip(), time_spent_ms=spent(time_spent_ms))
        try:
            q.submit(store, session.user, *lease, label, flags)
        except q.QueueError as e:
            return after_error(request, session, e, {"skip_reason": skip_reason})
        count("labels", "skipped")
        resp = redirect("/")
        set_cookie(resp, FLASH_COOKIE, "skipped", 60)
        return resp

    @router.get("/admin", response_class=HTMLResponse)
    def get_admin(request: Request) -> Response:
        session = ctx.current_session(request)
        if session is None:
            return redirect("/login")
        if not session.user.is_admin:
            return forbidden(request, session, "This page is for administrators.")
        if ctx.admin_summary is not None:
            summary = ctx.admin_summary()
        else:
            from monitor.review.stats import admin_summary

            summary = admin_summary(store, settings)
        if ctx.estimate_series is not None:
            series_of = ctx.estimate_series
        else:
            from monitor.review.stats import estimate_series, label_rows

            rows = label_rows(store)

            def series_of(stream: str) -> list[dict[str, Any]]:
                return estimate_series(store, stream, rows=rows)

        from monitor.review.chart import MAX_STREAMS, estimates_svg

        estimates = summary.get("estimates") or []
        streams: list[str] = [
            e["stream"] for e in estimates if isinstance(e, dict) and isinstance(e.get("stream"), str)
        ]
        series = {s: series_of(s) for s in streams[:MAX_STREAMS]}
        # Our own SVG: every text in it is escaped by the builder.
        chart = Markup(estimates_svg(series))  # noqa: S704
        drift = list(summary.get("drift_events") or [])[-50:]
        drift_cols: list[str] = []
        for ev in drift:
            if isinstance(ev, dict):
                drift_cols.extend(k for k in ev if k not in drift_cols)
        rm = summary.get("rm_agreement")
        reqs = [r for r in (summary.get("requests") or []) if isinstance(r, dict)]
        return render(
            request,
            "admin.html",
            200,
            session,
            queue=summary.get("queue") or [],
            throughput=summary.get("throughput") or [],
            agreement=summary.get("agreement") or {},
            rm=rm if isinstance(rm, dict) else ({"value": rm} if rm is not None else None),
            drift=drift,
            drift_cols=drift_cols[:8],
            requests=reqs,
            request_cols=["id", "kind", "stream", "state", "attempts", "updated_at", "last_error"],
            estimates=estimates,
            flags=flags,
            chart=chart,
            exports=EXPORTS,
        )

    return router
