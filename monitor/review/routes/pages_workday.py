"""/guidelines, /review/undo, /review/release, /review/leave and /admin/guidelines: the
reviewer's workday in the browser. Every form carries the session's CSRF token (the leave
beacon too: ``navigator.sendBeacon`` posts it as a form field)."""

from __future__ import annotations

import contextlib
from typing import Annotated

from fastapi import APIRouter, Form, Query
from fastapi.responses import HTMLResponse, Response

from monitor.review import guidelines
from monitor.review import queue as q
from monitor.review.context import Ctx
from monitor.review.pages import FormSession, PageRefused, SignedIn, error_page, redirect, render
from monitor.review.routes.pages_review import FLASH_COOKIE, FormLease, review_page

router = APIRouter(include_in_schema=False)


@router.get("/guidelines", response_class=HTMLResponse)
def get_guidelines(
    ctx: Ctx,
    session: SignedIn,
    stream: Annotated[str, Query(max_length=128)] = "",
    version: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
) -> Response:
    """A stream's guidelines (the newest, or ``version``), rendered with the escaping Markdown renderer."""
    g = guidelines.get(ctx.store, stream, version) if stream else None
    if g is None:
        return error_page(404, session, "No guidelines", "This stream has no guidelines (or not that version).")
    return render("guidelines.html", 200, session, g=g)


@router.post("/review/undo")
def post_undo(ctx: Ctx, session: FormSession) -> Response:
    """Withdraw the last label: the item comes back to this reviewer (or a notice that it cannot)."""
    try:
        ctx.undo(session.user)
        code = "undone"
    except q.QueueError:
        code = "undo_late"
    resp = redirect("/")
    ctx.set_cookie(resp, FLASH_COOKIE, code, 60)
    return resp


@router.post("/review/release")
def post_release(ctx: Ctx, session: FormSession, lease: FormLease) -> Response:
    """Give the item back to the queue now and pause (the next page view claims again)."""
    # Already gone (expired, released, taken): nothing left to give back.
    with contextlib.suppress(q.QueueError):
        q.release(ctx.store, session.user, lease.episode_id, lease.slot, lease.fence, now=ctx.now())
    return review_page(ctx, session, released=True)


@router.post("/review/leave", status_code=204)
def post_leave(
    ctx: Ctx, session: FormSession, lease: FormLease, until: Annotated[str, Form(max_length=40)] = ""
) -> Response:
    """The page's ``pagehide`` beacon: release the lease it showed unless it has been shown
    again since (see :func:`monitor.review.queue.leave`). Always 204: nobody reads the answer."""
    try:
        shown_until = float(until)
    except ValueError:
        return Response(status_code=204)
    q.leave(ctx.store, session.user, lease.episode_id, lease.slot, lease.fence, shown_until, now=ctx.now())
    return Response(status_code=204)


@router.post("/admin/guidelines")
def post_guidelines(
    ctx: Ctx,
    session: FormSession,
    stream: Annotated[str, Form()] = "",
    markdown: Annotated[str, Form()] = "",
) -> Response:
    """Save a stream's guidelines as its next version (admins only)."""
    if not session.user.is_admin:
        raise PageRefused(403, session, "Forbidden", "This page is for administrators.")
    try:
        guidelines.save(ctx.store, stream.strip(), markdown.replace("\r\n", "\n"), session.user, now=ctx.now())
    except guidelines.GuidelinesError as e:
        return error_page(422, session, "Guidelines not saved", str(e))
    except guidelines.GuidelinesBusy as e:
        busy = error_page(503, session, "Guidelines not saved", str(e))
        busy.headers["Retry-After"] = "1"
        return busy
    return redirect("/admin#guidelines")
