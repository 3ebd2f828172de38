"""/ (the reviewer's current item), /review/submit and /review/skip: reviewing in the browser.

Every page view claims (or re-shows) the reviewer's lease; the forms carry the lease and the
session's CSRF token. A stale lease sends the reviewer on to the next item with a notice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, Response

from monitor.review import guidelines, hints
from monitor.review import queue as q
from monitor.review.auth import Session
from monitor.review.context import Ctx, ReviewContext
from monitor.review.pages import FormSession, PageRefused, SignedIn, error_page, flag_keys, redirect, render

router = APIRouter(include_in_schema=False)

FLASH_COOKIE = "oversight_flash"
# Flash messages travel as a fixed code in a cookie, never as free text.
FLASHES = {
    "expired": "Your lease expired; here is the next item.",
    "gone": "That item is no longer available; here is the next item.",
    "skipped": "Skipped; the item goes back to the queue for someone else.",
    "undone": "Your last label was withdrawn; here is the item again.",
    "undo_late": "That label can no longer be undone.",
}
RATING_ANCHORS = {1: "worst", 4: "neutral", 7: "best"}
MAX_TIME_SPENT_MS = 86_400_000


@dataclass(frozen=True)
class Lease:
    episode_id: str
    slot: int
    fence: int


async def form_lease(
    session: FormSession,
    episode_id: Annotated[str, Form()] = "",
    slot: Annotated[str, Form()] = "",
    fence: Annotated[str, Form()] = "",
) -> Lease:
    """The lease a review form names (after its session and CSRF token are checked)."""
    slot_n, fence_n = form_int(slot), form_int(fence)
    if slot_n is None or fence_n is None:
        raise PageRefused(400, session, "Bad request", "Malformed form.")
    return Lease(episode_id, slot_n, fence_n)


def form_int(text: str) -> int | None:
    """A slot or fence of a form: ASCII digits that fit SQL's 64-bit integer, else None. ``int()``
    took "٥" for 5 and any length of digits, and 10**30 reached SQLite (OverflowError, a 500)."""
    if not (text.isascii() and text.isdigit() and len(text) <= 18):
        return None
    return int(text)


FormLease = Annotated[Lease, Depends(form_lease)]


def spent(ms: str) -> int:
    """The form's time spent, clipped to a day; garbage is 0 (the browser measures it, not the reviewer)."""
    try:
        return min(max(int(float(ms)), 0), MAX_TIME_SPENT_MS)
    except (ValueError, OverflowError):
        return 0


def pair_of(item: q.Item | None) -> list[dict[str, Any]]:
    """The two responses of a pairwise item, in the item's keyed order, lettered A and B."""
    if item is None or item.alternative is None:
        return []
    shown = [("response", item.response), ("alternative", item.alternative)]
    if item.alternative_first:
        shown.reverse()
    return [{"value": v, "text": text, "letter": "AB"[i]} for i, (v, text) in enumerate(shown)]


def item_page(ctx: ReviewContext, session: Session, item: q.Item | None, status: int, **messages: Any) -> HTMLResponse:
    """The review page for ``item`` (None: the queue is empty); ``messages``: error, notice, form."""
    flags = list(ctx.settings.review.flags)
    guide = guidelines.get(ctx.store, item.stream) if item is not None else None
    return render(
        "review.html",
        status,
        session,
        item=item,
        pair=pair_of(item),
        invisible=item.shown_invisibles() if item is not None else 0,
        flags=flags,
        flag_keys=flag_keys(flags),
        anchors=RATING_ANCHORS,
        error=messages.get("error"),
        notice=messages.get("notice"),
        form=messages.get("form") or {},
        now=ctx.now(),
        lease_minutes=max(1, round(ctx.settings.review.lease_seconds / 60)),
        max_critique=q.MAX_CRITIQUE,
        max_skip=q.MAX_SKIP_REASON,
        progress=ctx.progress(session.user),
        guidelines=guide,
        released=messages.get("released", False),
        hints=hints.shown(ctx.hints_for(session.user, item), item) if item is not None else [],
    )


def review_page(ctx: ReviewContext, session: Session, status: int = 200, **messages: Any) -> Response:
    """Claim (or re-show) the reviewer's item and render it; an item that fails to render is set aside."""
    # A page view renews a held lease: the leave beacon of an earlier view of it (a reload)
    # then no longer matches, and does not release the lease this page shows.
    item = None if messages.get("released") else ctx.claim(session.user, renew=True)

    def page() -> Response:
        return item_page(ctx, session, item, status, **messages)

    def failed() -> Response:
        message = "It was set aside for an administrator. Reload the page for the next item."
        return error_page(500, session, "This item could not be shown", message)

    return page() if item is None else ctx.show(session.user, item, page, failed)


def after_refusal(ctx: ReviewContext, session: Session, e: q.QueueError, form: dict[str, Any]) -> Response:
    """A lost lease (409) or a vanished item (404) moves on to the next item with a notice;
    an invalid label (422) shows the same item again with the reviewer's input kept."""
    if e.status not in (404, 409):
        return review_page(ctx, session, 422, error=str(e), form=form)
    if e.status == 409:
        ctx.metrics.conflicts.inc()
    resp = redirect("/")
    ctx.set_cookie(resp, FLASH_COOKIE, "expired" if e.status == 409 else "gone", 60)
    return resp


@router.get("/", response_class=HTMLResponse)
def get_review(request: Request, ctx: Ctx, session: SignedIn) -> Response:
    code = request.cookies.get(FLASH_COOKIE)
    resp = review_page(ctx, session, notice=FLASHES.get(code or ""))
    if code is not None:
        ctx.delete_cookie(resp, FLASH_COOKIE)  # a notice shows once
    return resp


@router.post("/review/submit")
def post_submit(
    ctx: Ctx,
    session: FormSession,
    lease: FormLease,
    rating: Annotated[str, Form()] = "",
    flags: Annotated[list[str], Form()] = [],  # noqa: B006 - FastAPI copies defaults
    critique: Annotated[str, Form()] = "",
    preference: Annotated[str, Form()] = "",
    time_spent_ms: Annotated[str, Form()] = "",
) -> Response:
    form = {"rating": rating, "flags": flags, "critique": critique, "preference": preference}
    text = rating.strip()
    r = form_int(text) if text else None
    if text and r is None:
        return review_page(ctx, session, 422, error="rating must be an integer from 1 to 7", form=form)
    label = q.LabelIn(
        rating=r,
        flags=tuple(flags),
        critique=critique.replace("\r\n", "\n"),
        preference=preference or None,
        time_spent_ms=spent(time_spent_ms),
    )
    return submit(ctx, session, lease, label, form, "labelled") or redirect("/")


@router.post("/review/skip")
def post_skip(
    ctx: Ctx,
    session: FormSession,
    lease: FormLease,
    skip_reason: Annotated[str, Form()] = "",
    time_spent_ms: Annotated[str, Form()] = "",
) -> Response:
    label = q.LabelIn(skipped=True, skip_reason=skip_reason.strip(), time_spent_ms=spent(time_spent_ms))
    refused = submit(ctx, session, lease, label, {"skip_reason": skip_reason}, "skipped")
    if refused is not None:
        return refused
    resp = redirect("/")
    ctx.set_cookie(resp, FLASH_COOKIE, "skipped", 60)
    return resp


def submit(
    ctx: ReviewContext, session: Session, lease: Lease, label: q.LabelIn, form: dict[str, Any], outcome: str
) -> Response | None:
    """Store the label under the lease and count it; the page to answer instead if it was refused."""
    try:
        ctx.submit(session.user, lease.episode_id, lease.slot, lease.fence, label, outcome)
    except q.QueueError as e:
        return after_refusal(ctx, session, e, form)
    return None
