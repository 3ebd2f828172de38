"""/api/v1/progress, /items/undo, /guidelines and /admin/guidelines: the reviewer's workday.

Progress counts the caller's labels today and the items waiting for them; undo withdraws the
caller's last label within ``review.undo_window_s`` and leases the item back; guidelines are
per stream, versioned (an admin's save is a new version; reviewers read them).
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Query
from fastapi.exceptions import RequestValidationError

from monitor.review import guidelines, queue
from monitor.review.context import Ctx
from monitor.review.deps import Admin, Who
from monitor.review.schemas import (
    ADMIN_ONLY,
    BODY,
    SIGNED_IN,
    UNDO,
    GuidelinesIn,
    GuidelinesOut,
    ProgressOut,
    UndoneOut,
    refusal,
)

router = APIRouter(tags=["review"], responses=SIGNED_IN)
admin_router = APIRouter(prefix="/admin", tags=["admin"], responses=ADMIN_ONLY)


@router.get("/progress")
def progress(p: Who, ctx: Ctx) -> ProgressOut:
    """The caller's labels and skips today (UTC), the items waiting that they could claim, and
    the seconds left to undo their last label."""
    return ProgressOut.model_validate(ctx.progress(p.user))


@router.post("/items/undo", responses=UNDO)
def undo(p: Who, ctx: Ctx) -> UndoneOut:
    """Withdraws the caller's last label (or skip) within the undo window; the item is leased
    back to them under a new fence, and the lease they held on another item is released."""
    try:
        c = ctx.undo(p.user)
    except queue.QueueError as e:
        raise HTTPException(e.status, str(e)) from None
    return UndoneOut(episode_id=c.episode_id, slot=c.slot, fence=c.fence, lease_expires_at=c.lease_expires_at)


@router.get("/guidelines", responses={404: refusal("the stream has no guidelines (or not that version)")})
def get_guidelines(
    _p: Who,
    ctx: Ctx,
    stream: str = Query(min_length=1, max_length=128),
    version: int | None = Query(None, ge=1, le=2**31 - 1),
) -> GuidelinesOut:
    """A stream's guidelines: the newest version, or ``version``."""
    g = guidelines.get(ctx.store, stream, version)
    if g is None:
        raise HTTPException(404, "no guidelines for this stream" if version is None else "no such version")
    return GuidelinesOut.model_validate(g.to_json())


@admin_router.post(
    "/guidelines",
    status_code=201,
    responses={**BODY, 503: refusal("concurrent saves of the stream took every version number tried (Retry-After)")},
)
def set_guidelines(body: GuidelinesIn, p: Admin, ctx: Ctx) -> GuidelinesOut:
    """Saves the stream's guidelines as its next version (the older ones are kept)."""
    try:
        g = guidelines.save(ctx.store, body.stream, body.markdown, p.user, now=ctx.now())
    except guidelines.GuidelinesError as e:
        raise RequestValidationError([{"type": "value_error", "loc": ("body", "markdown"), "msg": str(e)}]) from None
    except guidelines.GuidelinesBusy as e:
        raise HTTPException(503, str(e), headers={"Retry-After": "1"}) from None
    return GuidelinesOut.model_validate(g.to_json())
